"""Every name autotune stores, reads back or shares between processes, defined once.

A study outlives the code that ran it: a rerun resumes it, `autotune sync`, `export` and
`report` read it, other workers join it, and `tests/test_stored.py` reads a study stored by an
older version. What it keeps is found again by these strings, so their values never change:
the Optuna user attrs of the study and of its trials, the MLflow tags autotune searches for
and logs, the environment variables a launcher hands its workers, the files under the output
folder, and the exit codes the CLI promises. It imports nothing of autotune's and no library, so
every module may use it.
"""

from __future__ import annotations

from pathlib import Path

# --- environment variables ---------------------------------------------------------------------
# the storage URL and the tracking URI can come from the environment, so that a password never
# has to be in a spec, and every node of a cluster can run the same spec
STORAGE_ENV = "AUTOTUNE_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# how many workers the launcher started on a worker's GPU: they share its memory
DEVICE_WORKERS_ENV = "AUTOTUNE_WORKERS_ON_DEVICE"
WORKER_ENV = "AUTOTUNE_WORKER"  # a worker's index, for its log lines
DEVICES_ENV = "CUDA_VISIBLE_DEVICES"  # the GPUs a process sees (a worker: its own)

# --- exit codes of the CLI ---------------------------------------------------------------------
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
EXIT_WRITE = 3  # the output folder or the disk could not be written

# --- study user attrs --------------------------------------------------------------------------
# what the study was run with, checked on every resume (storage.check_stored) and read by the
# export: the model's identity (the spec's own field names), the metric and the data's shape
METRIC_ATTR = "metric"
INPUT_SHAPE_ATTR = "input_shape"
N_CLASSES_ATTR = "n_classes"
SEARCH_SPACE_ATTR = "search_space"  # the search space's name
# the BN layer of each block of an imported model, in block order: what recommended.yaml says
# even when the model's factory fails at the export
BLOCKS_AT = "blocks_at"
STANDARDISED_ATTR = "standardised"  # whether autotune standardised the inputs (input_stats.pt)
PARENT_ATTR = "mlflow_parent_run_id"  # the MLflow parent run's id, stored by the study's creator
ROBUST_ATTR = "robust"  # the robust recommendation's ranking and choice
# what the trials train with (search.settings): on the study, checked on every rerun; on each
# trial, the train and data settings it ran with
TRAINED_WITH_ATTR = "trained_with"
TEST_ATTR = "test"  # the recommendation scored on the test split, at the end (run.held_out)
# a finished trial's run once sync has logged it again: one study attr per trial (a finished
# trial's own attrs cannot change, and its "mlflow_run_id" names the run sync replaced, or none)
RELOGGED_RUN = "mlflow_run_id.trial_{}"

# --- trial user attrs --------------------------------------------------------------------------
# the user attr the objective sets first, to its trial's number (a retried trial inherits the
# attrs of the one it retries, so the number tells whether this trial itself got that far)
STARTED = "started"
CONFIG_ATTR = "config"  # the blocks' configuration, TrialConfig.to_dicts()
RECALIBRATE_ATTR = "recalibrate_bn"
WORKER_ATTR = "worker"  # host:pid of the process that ran it
RUN_ID_ATTR = "mlflow_run_id"  # its child run ("" when MLflow did not answer)
PREDICTED_SHIFT_ATTR = "predicted_shift"
# Δ's factors predicted again from its own weights after its first epoch (2 epochs or more)
TRAINED_PREDICTION_ATTR = "predicted_shift_after_epoch_1"
DELTA_KEY = "predicted_delta"  # the worst predicted Δ: what the VarianceShiftPruner's gate reads
MEASURED_SHIFT_ATTR = "measured_shift"
FINAL_ATTR = "final"  # the metrics it ended with
HISTORY_ATTR = "history"  # the epochs it reported: what sync logs of a finished trial
WEIGHTS_DIGEST = "weights_sha256"  # the sha256 of its saved weights (also a robust row's key)
EXPLORED_ATTR = "explored"  # past the gate, trained anyway
PRUNED_EPOCH_ATTR = "pruned_epoch"  # 0: pruned before training
PRUNED_REASON_ATTR = "pruned_reason"
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED_ATTR = "interrupted"  # stopped by Ctrl-C or SIGTERM
SURPLUS_ATTR = "surplus"  # not started: other workers took the budget's last slots

# --- MLflow tags -------------------------------------------------------------------------------
STUDY_TAG = "autotune.study"  # on the parent and every child run: the study's name
ROLE_TAG = "autotune.role"  # PARENT_ROLE or TRIAL_ROLE
PARENT_ROLE, TRIAL_ROLE = "parent", "trial"
DIAGNOSIS_ROLE = "diagnosis"  # a run of `autotune diagnose --mlflow`, in no study
TRIAL_TAG = "autotune.trial"  # a child run's trial number
STATE_TAG = "autotune.state"  # COMPLETE, PRUNED, FAIL, INTERRUPTED (RUNNING while it runs)
PARTIAL = "autotune.partial"  # the tag of a run that missed some of its trial's calls
WORKER_TAG = "autotune.worker"
EXPLORED_TAG = "autotune.explored"
PRUNED_EPOCH_TAG = "autotune.pruned_epoch"
PRUNED_REASON_TAG = "autotune.pruned_reason"
FAIL_REASON_TAG = "autotune.fail_reason"
# the parent run's tag of how far the study got: finished trials / budget, e.g. 7/20
BUDGET_TAG = "autotune.finished"
BEST_TRIAL_TAG = "autotune.best_trial"
# the recommendation on the parent run, under the names the child runs use for their params
RECOMMENDED_TAG = "autotune.recommended.{}"
# what is recommended: "trial 7", or a baseline as good and simpler ("bn_only")
RECOMMENDATION_TAG = "autotune.recommendation"
# on the recommendation's logged model: its files' digest, so that a study ended again logs it once
MODEL_DIGEST_TAG = "autotune.files_sha256"

# --- files -------------------------------------------------------------------------------------
# under the output folder, unless the spec names a storage or a tracking URI of its own
STORAGE_FILE = "autotune.db"
TRACKING_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside a local tracking store's file
INPUT_STATS = "input_stats.pt"
RECOMMENDED_YAML = "recommended.yaml"
RECOMMENDED_JSON = "recommended.json"
BEST_MODEL = "best_model.py"
WEIGHTS_DIR = "weights"
FIGURES_DIR = "figures"  # under the output folder, and under the parent run's artifacts
REPORT = "report.html"
WORKERS_DIR = "workers"


def trial_weights(output_dir: Path, number: int) -> Path:
    """Where trial `number`'s weights are saved: <output>/weights/trial_<n>.pt."""
    return output_dir / WEIGHTS_DIR / f"trial_{number}.pt"


def baseline_weights(output_dir: Path, name: str) -> Path:
    """Where a baseline's weights are saved, trained with the spec's seed by the robust
    recommendation: <output>/weights/<name>.pt (bn_only.pt, ...)."""
    return output_dir / WEIGHTS_DIR / f"{name}.pt"


def worker_log(output_dir: Path, index: int) -> Path:
    """Worker `index`'s log under --workers: <output>/workers/worker-<i>.log."""
    return output_dir / WORKERS_DIR / f"worker-{index}.log"

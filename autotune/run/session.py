"""A process's hold on a study: the input checked, the study opened (created, resumed or joined)
and its MLflow parent run found or started, all before any trial; and what the process's work on
the study came to (`StudyOutcome`), which the trial loop fills and the end of the study reads.

Everything that can be wrong with the input fails in `open_session`, before any training. Of
many workers starting at once exactly one creates the study: only it seeds the first trials
(`enqueue_low_shift`) and creates the parent run, whose id it stores in the study; the others
wait for that id (PARENT_WAIT_SECONDS), so that all of them log under one parent.

torch and Lightning take seconds to import: they are imported inside the functions that load
the data or predict, so `autotune run` says what is wrong with its spec before that.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from autotune.core.baselines import baselines
from autotune.core.errors import SpecError, first_line
from autotune.core.names import (
    BLOCKS_AT,
    INPUT_STATS,
    PARENT_ATTR,
    SEARCH_SPACE_ATTR,
    STANDARDISED_ATTR,
)
from autotune.core.redaction import redact
from autotune.core.space import SearchSpace
from autotune.core.spec import Spec
from autotune.core.writes import check_writable
from autotune.run.preflight import check_runnable, resolve_space
from autotune.search.optuna_private import reload_study
from autotune.search.pruners import shift_distance
from autotune.search.run_fields import flatten
from autotune.search.settings import settled
from autotune.search.storage import POLL_SECONDS, open_study, raise_if_disk
from autotune.search.tracking import Tracker

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule  # imported where the data is loaded

# how long a worker that joins a new study waits for its creator to name the MLflow parent run
PARENT_WAIT_SECONDS = 30.0


@dataclass
class StudyOutcome:
    """What a process's work on a study came to: the study's finished trials against its
    budget, how the loop stopped, and the files the end of the study wrote."""

    study: optuna.Study
    finished: int
    budget: int
    interrupted: bool = False
    stopped_by_failures: bool = False
    outputs: list[Path] = field(default_factory=list)
    # the trials this process had sampled and was running when a signal stopped them
    cut_short: list[int] = field(default_factory=list)
    experiment_id: str | None = None  # the MLflow experiment its end logged to


@dataclass
class Session:
    """A process's hold on a study: the checked input, the opened study and its tracker."""

    spec: Spec
    space: SearchSpace
    datamodule: LightningDataModule
    study: optuna.Study
    tracker: Tracker
    budget: int
    created: bool


def open_session(
    spec: Spec,
    *,
    n_trials: int | None = None,
    notify: Callable[[str], None] | None = None,
    allow_changes: bool = False,
) -> Session:
    """Check the input, open (or create) the study and find (or create) its MLflow parent run.

    Everything that can be wrong with the input fails here, before any training; a spec that
    changes what the stored study's trials train with too, unless allow_changes."""
    from autotune.nn.data import load_data  # torch: imported once the spec has been read

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    datamodule = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    space = resolve_space(spec, datamodule)
    check_runnable(spec, space, datamodule)
    prepare_output(spec)
    if spec.recommend.current is not None:  # read now, not after the whole study
        baselines(spec, space)
    study, created = open_study(spec, space, datamodule, allow_changes=allow_changes, notify=notify)
    spec, loaded = settled(spec, study), spec
    if spec.data.test_share != loaded.data.test_share:  # stored before test splits: none
        datamodule = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    try:
        tracker = _start_parent_run(study, spec, space, datamodule, created, notify)
    except BaseException:
        # a creator that fails before its parent run is stored (a write fault, MLflow away)
        # says so: the rerun makes the parent at once instead of waiting for this process
        if created and PARENT_ATTR not in study.user_attrs:
            with contextlib.suppress(Exception):
                study.set_user_attr(PARENT_ATTR, None)
        raise
    pruner = spec.study.pruner
    if created and pruner.name == "variance_shift" and pruner.seed_trials:
        enqueue_low_shift(study, spec, space, datamodule, pruner.seed_trials)
    budget = n_trials if n_trials is not None else spec.study.n_trials
    return Session(spec, space, datamodule, study, tracker, budget, created)


def _start_parent_run(
    study: optuna.Study,
    spec: Spec,
    space: SearchSpace,
    datamodule: LightningDataModule,
    created: bool,
    notify: Callable[[str], None] | None,
) -> Tracker:
    """The study's attrs for this run, the input statistics saved, and the MLflow parent run
    found or started (its id stored in the study by its creator): the Tracker."""
    if study.user_attrs.get(SEARCH_SPACE_ATTR) != space.name:
        study.set_user_attr(SEARCH_SPACE_ATTR, space.name)
    blocks_at = [slot.label for slot in space.slots]
    if spec.model.imported and study.user_attrs.get(BLOCKS_AT) != blocks_at:
        study.set_user_attr(BLOCKS_AT, blocks_at)
    study.set_user_attr(STANDARDISED_ATTR, save_input_stats(datamodule, spec.output_dir))

    # the parent run before any trial exists: a joining worker that finds trials takes the
    # study for an older one and does not wait for the creator's parent run id
    try:
        tracker = Tracker(
            spec.tracking_uri,
            spec.experiment_name,
            spec.study.name,
            enabled=spec.mlflow.enabled,
            notify=notify,
        )
    except Exception as exc:  # MlflowException: a bad URI, a refused local store
        raise_if_disk(exc, spec.tracking_uri)
        where = f"mlflow.tracking_uri: {redact(spec.tracking_uri)}"
        raise SpecError(f"{where}: {redact(first_line(exc))}") from None
    known = None if created or not tracker.enabled else _parent_run_id(study)
    params = flatten(spec.model_dump(mode="json", by_alias=True))  # model.import, not import_
    for i, slot in enumerate(space.slots if spec.model.imported else ()):
        params[f"model.block{i}"] = slot.label  # which BN layer block i is, beside its params
    parent = tracker.start_study(params, known=known)
    if parent is not None and parent != known:
        study.set_user_attr(PARENT_ATTR, parent)
    return tracker


def _parent_run_id(study: optuna.Study) -> str | None:
    """The MLflow parent run id the study's creator stored. A worker that joins a study created a
    moment ago waits for it, so that all workers log under one parent; None where the creator
    made none (it failed first, or the study is older than MLflow logging)."""
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while PARENT_ATTR not in study.user_attrs:
        if study.get_trials(deepcopy=False) or time.monotonic() > deadline:
            return None  # an older study run without MLflow, or a creator that gave up
        time.sleep(POLL_SECONDS / 4)
        study = reload_study(study)
    return study.user_attrs[PARENT_ATTR]


def enqueue_low_shift(
    study: optuna.Study, spec: Spec, space: SearchSpace, datamodule: LightningDataModule, n: int
) -> list[dict[str, Any]]:
    """Enqueue the first n trials: the least shifted of 10·n random configurations, predicted
    (not trained). Returns the enqueued parameters, least shifted first.

    Meant for the one process that starts a study: workers that start an empty study at the same
    moment may each enqueue them."""
    from autotune.nn.fitting import predict  # Lightning: seconds to import

    candidates = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.train.seed))
    scored = []
    for _ in range(10 * n):
        trial = candidates.ask()
        config = space.sample(trial)
        try:
            worst = predict(spec, config, datamodule).summary.worst_delta
        except Exception:  # a candidate that cannot be predicted is simply not chosen
            continue
        scored.append((shift_distance(worst), trial.number, trial.params))
    chosen = [params for _, _, params in sorted(scored, key=lambda row: row[:2])[:n]]
    for params in chosen:
        study.enqueue_trial(params, skip_if_exists=True)
    return chosen


def prepare_output(spec: Spec) -> None:
    """Create the output folder and write a file into it, or say in one line (WriteError) why
    it takes none: before the storage or any trial touches it."""
    check_writable(spec.output_dir)


def save_input_stats(datamodule: LightningDataModule, output_dir: Path) -> bool:
    """How raw inputs become model inputs ((x - mean) / std, label order), for production use.

    Returns whether autotune standardised the inputs (a user DataModule prepares its own).
    Raises WriteError when the file cannot be written.
    """
    from autotune.nn.weights import save_tensors  # torch

    stats = getattr(datamodule, "input_stats", None)
    if stats is not None:
        save_tensors(stats, output_dir / INPUT_STATS)
    return stats is not None

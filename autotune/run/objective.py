"""The Optuna objective: one trial from its sampled configuration to its record in Optuna and
MLflow, and the words for the gate's verdict before training (`gate_reason`).

The fit itself is `autotune.nn.fitting`, looked up there at each call (`fitting.fit`,
`fitting.predict`), so that a test or the overhead benchmark replaces it in one place.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import optuna

from autotune.core.direction import better, maximizes
from autotune.core.errors import UserCodeError, WriteError
from autotune.core.names import (
    CONFIG_ATTR,
    DELTA_KEY,
    EXPLORED_ATTR,
    EXPLORED_TAG,
    FAIL_REASON_ATTR,
    FAIL_REASON_TAG,
    FINAL_ATTR,
    HISTORY_ATTR,
    INTERRUPTED_ATTR,
    MEASURED_SHIFT_ATTR,
    PREDICTED_SHIFT_ATTR,
    PRUNED_EPOCH_ATTR,
    PRUNED_EPOCH_TAG,
    PRUNED_REASON_ATTR,
    PRUNED_REASON_TAG,
    RECALIBRATE_ATTR,
    RUN_ID_ATTR,
    STARTED,
    SURPLUS_ATTR,
    TRAINED_PREDICTION_ATTR,
    TRAINED_WITH_ATTR,
    WEIGHTS_DIGEST,
    WORKER_ATTR,
    WORKER_TAG,
    trial_weights,
)
from autotune.core.redaction import redact
from autotune.core.signals import TrialInterrupted
from autotune.core.space import TrialConfig
from autotune.core.spec import Spec
from autotune.core.user_code import raised_line
from autotune.nn import fitting
from autotune.nn.prediction import NetworkPrediction
from autotune.nn.shift import measured_record
from autotune.nn.weights import save_tensors
from autotune.search.optuna_private import frozen_trial
from autotune.search.pruners import VarianceShiftPruner, Verdict, pruning_rule
from autotune.search.run_fields import (
    after_epoch_1,
    measured_metrics,
    predicted_metrics,
    split_one_off,
)
from autotune.search.settings import trial_settings

# which process ran a trial, when several share a study: host and process id
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class SurplusTrial(RuntimeError):
    """Two workers asked for the study's last slot at once: the later trial does not start."""


def _user_code(spec: Spec) -> str:
    """The user's code a spec names, for a message: `model.import 'pkg.mod:build'` and or
    `data.datamodule ...`; `the trial's code` when it names none."""
    named = [
        f"{field} {target!r}"
        for field, target in (
            ("model.import", spec.model.import_),
            ("data.datamodule", spec.data.datamodule),
        )
        if target
    ]
    return " or ".join(named) or "the trial's code"


def _verdict(trial: optuna.Trial) -> Verdict | None:
    """The variance-shift gate's verdict on this trial before training; None: no such gate."""
    pruner = trial.study.pruner
    if not isinstance(pruner, VarianceShiftPruner):
        return None
    return pruner.verdict(trial.study, frozen_trial(trial))


def gate_reason(verdict: Verdict | None, prediction: NetworkPrediction) -> str:
    """Why a trial stopped before training: its worst predicted Δ, and the gate's reason."""
    summary = prediction.summary
    text = f"pruned before training: predicted Δ {summary.worst_delta:.3f} at {summary.worst_layer}"
    return text if verdict is None else f"{text}, {verdict.reason}"


class Objective:
    """The Optuna objective: sample a configuration, fit it, log it, hand back the metric.

    Every trial leaves a child run in MLflow with its final state, and its configuration in the
    trial's user attrs (`config`), so `export` can rebuild it without the search space. The
    weights of every trial that beats the best so far are saved to <output>/weights/.
    """

    def __init__(
        self,
        spec: Spec,
        space: Any,
        datamodule: pl.LightningDataModule,
        tracker: Any,
        *,
        stop: threading.Event | None = None,
        on_epoch: Callable[[optuna.Trial, int, dict[str, float]], None] | None = None,
        on_start: Callable[[optuna.Trial], None] | None = None,
        admit: Callable[[optuna.Trial], bool] | None = None,
    ):
        """`admit(trial)`: whether the study's budget has room for this trial (several workers
        share it); a trial it refuses ends FAIL before anything runs, marked `surplus`.
        `on_start(trial)`: told once the trial's configuration is sampled, before it predicts."""
        self.spec, self.space, self.datamodule, self.tracker = spec, space, datamodule, tracker
        self.stop = stop or threading.Event()
        self.on_epoch, self.on_start = on_epoch, on_start
        self.admit = admit
        self.settings = trial_settings(spec)  # what every trial records it trained with
        # the trials a signal stopped after their configuration was sampled
        self.cut_short: list[int] = []
        # a write the disk refused in a trial: the loop stops after it (see loop.run_trials)
        self.fault: WriteError | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(STARTED, trial.number)
        self._refuse_if_stopped_or_surplus(trial)
        config, run_id = self._start(trial)
        if self.on_start is not None:
            self.on_start(trial)
        # the epochs reported so far: a pruned trial's record, and what `autotune sync` logs
        history: list[dict[str, float]] = []
        try:
            return self._trial(trial, config, run_id, history)
        except optuna.TrialPruned as exc:
            epoch = int(history[-1]["epoch"]) if history else 0
            reason = str(exc)
            rule = pruning_rule(trial.study.pruner, trial.number)  # read, so never kept
            if epoch and rule:  # stopped in training: say by which of the pruner's rules
                reason = f"{reason}, {rule}"
            self._pruned(trial, run_id, epoch, reason)
            raise
        except (TrialInterrupted, KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and not self._interrupt(exc):
                # the user's code called sys.exit(): the trial fails, the study goes on
                failure = UserCodeError(f"{_user_code(self.spec)} raised {raised_line(exc)}")
                self._fail(trial, run_id, failure)
                raise failure from None
            # Ctrl-C or SIGTERM, or Lightning's sys.exit(1) on a second Ctrl-C: an interrupt
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            self.cut_short.append(trial.number)
            self.tracker.end_trial(run_id, "INTERRUPTED")
            raise KeyboardInterrupt from None
        except WriteError as exc:  # the disk: every later trial would fail the same way
            self.fault = exc
            self._fail(trial, run_id, exc)
            raise
        except Exception as exc:  # whatever raised, the trial's run is not left RUNNING
            self._fail(trial, run_id, exc)
            raise
        finally:
            trial.set_user_attr(HISTORY_ATTR, history)

    def _refuse_if_stopped_or_surplus(self, trial: optuna.Trial) -> None:
        """Raise before anything runs: KeyboardInterrupt when a signal came between trials,
        SurplusTrial when the study's budget has no room left for this trial."""
        if self.stop.is_set():  # the signal came between trials: start nothing new
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            if trial.params:  # a queued retry, its configuration given: still to be run
                self.cut_short.append(trial.number)
            raise KeyboardInterrupt
        if self.admit is not None and not self.admit(trial):
            reason = "not started: other workers took the study's last trials at the same time"
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            raise SurplusTrial(reason)

    def _start(self, trial: optuna.Trial) -> tuple[TrialConfig, str | None]:
        """Sample the configuration, record it and this worker in the trial's attrs, start the
        trial's MLflow run; return the configuration and the run's id (None: no run)."""
        config = self.space.sample(trial)
        trial.set_user_attr(CONFIG_ATTR, config.to_dicts())
        trial.set_user_attr(RECALIBRATE_ATTR, config.recalibrate_bn)
        trial.set_user_attr(TRAINED_WITH_ATTR, self.settings)
        trial.set_user_attr(WORKER_ATTR, WORKER)
        run_id = self.tracker.start_trial(trial.number, config.to_params(), {WORKER_TAG: WORKER})
        # a trial run again after its worker died inherits that trial's attrs: renew them
        if run_id is not None or RUN_ID_ATTR in trial.user_attrs:
            trial.set_user_attr(RUN_ID_ATTR, run_id or "")
        for flag in (EXPLORED_ATTR, INTERRUPTED_ATTR):
            if trial.user_attrs.get(flag):
                trial.set_user_attr(flag, False)
        return config, run_id

    def _trial(
        self,
        trial: optuna.Trial,
        config: TrialConfig,
        run_id: str | None,
        history: list[dict[str, float]],
    ) -> float:
        """Predict, gate, train, measure, record. __call__ records how it ended if it raises."""
        # 1. before any training: what the theory expects of this configuration
        prediction = fitting.predict(self.spec, config, self.datamodule)
        trial.set_user_attr(PREDICTED_SHIFT_ATTR, prediction.to_dict())
        trial.set_user_attr(DELTA_KEY, prediction.summary.worst_delta)
        params, tags = split_one_off(predicted_metrics(prediction.to_dict()))
        self.tracker.log_values(run_id, params=params, tags=tags)
        # 2. the pruner's gate, before the first epoch: one verdict decides, names the reason
        #    and marks an exploring trial (asked twice, a trial finishing elsewhere between the
        #    two could change it); another pruner is asked as Optuna asks it
        verdict = _verdict(trial)
        pruner = trial.study.pruner
        if verdict is None:
            stop = trial.should_prune()
        else:
            assert isinstance(pruner, VarianceShiftPruner)  # only it gives a verdict
            stop = pruner.stops(verdict, trial.number)
        if stop:
            raise optuna.TrialPruned(gate_reason(verdict, prediction))
        if verdict is not None and verdict.past:  # past the line, trained anyway: mark it
            trial.set_user_attr(EXPLORED_ATTR, True)
            self.tracker.log_values(run_id, tags={EXPLORED_TAG: True})

        def report(epoch: int, metrics: dict[str, float]) -> None:
            history.append({"epoch": epoch, **metrics})
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            if self.on_epoch is not None:
                self.on_epoch(trial, epoch, metrics)

        def repredicted(prediction: NetworkPrediction) -> None:
            # after the first epoch, from the trial's own weights: the same metrics, at step 1
            stored = prediction.to_dict()
            trial.set_user_attr(TRAINED_PREDICTION_ATTR, stored)
            self.tracker.log_values(run_id, tags=after_epoch_1(predicted_metrics(stored)))

        # 3. train, then what was measured after training
        result = fitting.fit(
            self.spec,
            config,
            self.datamodule,
            trial=trial,
            on_epoch=report,
            stop=self.stop,
            on_trained_prediction=repredicted,
        )
        self._record_measurements(trial, run_id, result)
        self._save_if_best(trial, result)
        self.tracker.end_trial(run_id, "COMPLETE")
        return result.value

    def _interrupt(self, exc: SystemExit) -> bool:
        """Whether a SystemExit is an interrupt: Lightning's sys.exit(1) on a second Ctrl-C (the
        first set `stop`), or on a Ctrl-C that no handler of ours turned into `stop`."""
        return self.stop.is_set() or isinstance(exc.__context__, KeyboardInterrupt)

    def _pruned(self, trial: optuna.Trial, run_id: str | None, epoch: int, reason: str) -> None:
        """The epoch a trial was stopped after (0: before training) and why, in both stores."""
        trial.set_user_attr(PRUNED_EPOCH_ATTR, epoch)
        trial.set_user_attr(PRUNED_REASON_ATTR, reason)
        tags = {PRUNED_EPOCH_TAG: epoch, PRUNED_REASON_TAG: reason}
        self.tracker.end_trial(run_id, "PRUNED", tags)

    def _fail(self, trial: optuna.Trial, run_id: str | None, exc: Exception) -> None:
        reason = redact(f"{type(exc).__name__}: {exc}")  # the user's code may name a URL
        trial.set_user_attr(FAIL_REASON_ATTR, reason)
        self.tracker.end_trial(run_id, "FAIL", {FAIL_REASON_TAG: reason})

    def _record_measurements(
        self, trial: optuna.Trial, run_id: str | None, result: fitting.TrialResult
    ) -> None:
        """Measured Δ per BN layer and its two factors, their summaries, and the final metrics:
        Optuna and MLflow."""
        measured = measured_record(result.measured)
        trial.set_user_attr(MEASURED_SHIFT_ATTR, measured)
        trial.set_user_attr(FINAL_ATTR, result.final)
        params, tags = split_one_off(measured_metrics(measured, result.final))
        self.tracker.log_values(run_id, params=params, tags=tags)

    def _save_if_best(self, trial: optuna.Trial, result: fitting.TrialResult) -> None:
        study = trial.study
        try:
            best = study.best_value
        except ValueError:  # no trial has completed yet
            best = None
        # or_equal: a trial that ties the best may be the one Optuna names best; keep its weights
        if best is None or better(result.value, best, maximizes(study), or_equal=True):
            # whole or not there: never a file cut short (WriteError when the disk refuses)
            path = trial_weights(self.spec.output_dir, trial.number)
            digest = save_tensors(result.model.state_dict(), path)
            # the export checks the file is this trial's: another study may share the folder
            trial.set_user_attr(WEIGHTS_DIGEST, digest)

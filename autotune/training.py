"""One trial: build the network, fit it in Lightning, report every epoch, honour pruning.

The LightningModule keeps its running sums on the device and the metrics reach the host once per
epoch (one sync), where `EpochReporter` hands them to Optuna (report / should_prune) and MLflow.
Lightning's own logger, progress bar, checkpoints and model summary are off inside trials.

Around the fit, the variance shift: before training, each BN layer's Δ is predicted from the
freshly built network and a probe batch (autotune.prediction); after training, BN is recalibrated
with dropout off when the configuration asks for it and the validation metrics are taken again.
Δ is measured the paper's way (autotune.shift) in the last validation pass that runs the final
network (the last epoch's, or the one after recalibration), not in a pass of its own unless
validation ran in another precision or compiled, and the accuracy of train mode is compared with
eval mode's on the validation data.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F

from autotune.data import hold_on_device
from autotune.errors import UserCodeError, WriteError
from autotune.export import save_tensors
from autotune.models import build_model
from autotune.names import (
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
    WEIGHTS_DIGEST,
    WORKER_ATTR,
    WORKER_TAG,
    trial_weights,
)
from autotune.prediction import NetworkPrediction, predict_shift, probe_batch
from autotune.pruners import VarianceShiftPruner
from autotune.redaction import redact
from autotune.shift import (
    LayerShift,
    recalibrate_bn,
    shift_observed,
    summarize,
    train_mode_accuracy,
)
from autotune.space import TrialConfig
from autotune.spec import Spec, TrainSpec
from autotune.tracking import measured_metrics, predicted_metrics
from autotune.user_code import describe

EpochCallback = Callable[[int, dict[str, float]], None]
# batches of the training data BN recalibration sees: enough for exact population statistics of
# small sets, bounded for big ones (fvcore's precise BN uses 200)
RECALIBRATION_BATCHES = 200
# which process ran a trial, when several share a study: host and process id
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial fails, the study goes on."""


class TrialInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived during a trial; raised at the next batch boundary."""


class SurplusTrial(RuntimeError):
    """Two workers asked for the study's last slot at once: the later trial does not start."""


class Classifier(pl.LightningModule):
    """Cross-entropy training of `model`; per-epoch train_loss, val_loss and val_acc."""

    def __init__(self, model: nn.Module, train: TrainSpec) -> None:
        super().__init__()
        self.model = model
        self.train_spec = train
        self._sums: dict[str, torch.Tensor] = {}
        # compiled for the fit only. A bound method, not a module: the compiled wrapper stays
        # out of the module tree, so the state_dict keys and the measurements after training
        # see the plain network
        self._forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if train.compile else model
        ).__call__
        # rows are counted on the host: a count made a tensor would be a copy to the device
        # every step, and a copy from pageable memory waits for the device
        self._rows: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_spec.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0) + value.detach()

    def on_train_epoch_start(self) -> None:
        self._sums, self._rows = {}, {}

    def _count(self, name: str, rows: int) -> None:
        self._rows[name] = self._rows.get(name, 0) + rows

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self._accumulate("train_loss", loss * len(y))
        self._count("train_n", len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._accumulate("val_loss", F.cross_entropy(logits, y, reduction="sum"))
        self._accumulate("val_correct", (logits.argmax(dim=1) == y).sum())
        self._count("val_n", len(y))

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's metrics, brought to the host in one sync. Call after validation."""
        names = ("train_loss", "val_loss", "val_correct")
        values = torch.stack([self._sums[n].float() for n in names]).tolist()
        sums = {**dict(zip(names, values, strict=True)), **self._rows}
        return {
            "train_loss": sums["train_loss"] / sums["train_n"],
            "val_loss": sums["val_loss"] / sums["val_n"],
            "val_acc": sums["val_correct"] / sums["val_n"],
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.train_spec, self.parameters())


def make_optimizer(spec: TrainSpec, params: Any) -> torch.optim.Optimizer:
    """The optimizer the spec's `train` section names, over `params`."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    optimizer = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=spec.lr, weight_decay=spec.weight_decay)


class EpochReporter(pl.Callback):
    """After each epoch: check the loss is finite, tell the listeners, let Optuna prune."""

    def __init__(
        self,
        trial: optuna.Trial | None,
        metric: str,
        on_epoch: EpochCallback | None,
        stop: threading.Event,
    ) -> None:
        self.trial, self.metric, self.on_epoch, self.stop = trial, metric, on_epoch, stop

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.stop.is_set():
            raise TrialInterrupted("interrupted by a signal")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs completed: 1 after the first
        # validation has run by now (Lightning validates before on_train_epoch_end)
        metrics = module.epoch_metrics()  # type: ignore[operator]
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(
                f"training loss became {metrics['train_loss']} in epoch {epoch}"
            )
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)
        if self.trial is None:
            return
        self.trial.report(metrics[self.metric], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after epoch {epoch}: {self.metric}={metrics[self.metric]:.4f}"
            )


class LastValidationShift(pl.Callback):
    """Measures Δ during the last epoch's validation pass, which runs the final weights in eval
    mode over the validation data: what measure_shift would run again after the fit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.shifts: dict[str, LayerShift] | None = None
        self._observing = ExitStack()

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == trainer.max_epochs and not trainer.sanity_checking:
            self.shifts = self._observing.enter_context(shift_observed(self.model))

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._observing.close()  # fills self.shifts

    def on_exception(
        self, trainer: pl.Trainer, module: pl.LightningModule, error: BaseException
    ) -> None:
        # the hooks come off whatever stopped the fit; with the error passed on, no Δ is taken
        # from a pass cut short (nor a device sync made in the middle of handling it)
        self._observing.__exit__(type(error), error, error.__traceback__)


@dataclass
class TrialResult:
    """What a finished trial hands back: the metric after the last epoch (and after BN
    recalibration when the configuration asks for it), the trained model on the CPU, the
    per-epoch metrics, and what was measured after training."""

    value: float
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    measured: dict[str, LayerShift] = field(default_factory=dict)


def fit(
    spec: Spec,
    config: TrialConfig,
    datamodule: pl.LightningDataModule,
    *,
    trial: optuna.Trial | None = None,
    on_epoch: EpochCallback | None = None,
    stop: threading.Event | None = None,
    batchnorm: bool = True,
) -> TrialResult:
    """Train one configuration; return its final metric (after BN recalibration when the
    configuration asks for it), the trained model and what was measured after training.
    batchnorm=False trains the network with its BN layers removed (a baseline).

    Raises optuna.TrialPruned when the trial's pruner says so, NonFiniteLossError when the loss
    diverges and TrialInterrupted when `stop` is set.
    """
    # 1. the same seed for every trial: trials differ by their configuration, not their luck
    model = build_seeded(spec, config, datamodule, batchnorm=batchnorm)
    if spec.train.channels_last:  # 4-d weights only: a Linear's stay as they are
        model = model.to(memory_format=torch.channels_last)
    module = Classifier(model, spec.train)
    history: list[dict[str, float]] = []

    def record(epoch: int, metrics: dict[str, float]) -> None:
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    # 2. a quiet Trainer: no logger, checkpoints, progress bar or summary inside a trial
    reporter = EpochReporter(trial, spec.study.metric, record, stop or threading.Event())
    # Δ is measured in the last validation pass when nothing changes the network after it and
    # that pass runs it as measure_shift would: in float32, uncompiled
    in_validation = (
        not config.recalibrate_bn and spec.train.precision == "32-true" and not spec.train.compile
    )
    observer = LastValidationShift(model) if in_validation else None
    trainer = pl.Trainer(
        accelerator=spec.train.accelerator,
        devices=1,
        precision=spec.train.precision,
        max_epochs=spec.train.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[reporter] if observer is None else [reporter, observer],
    )
    # 3. an in-memory dataset moves to the device once per process; later trials find it there
    hold_on_device(datamodule, trainer.strategy.root_device)
    # 4. fit; pruning and failures leave through exceptions. Lightning turns a SIGTERM into
    #    SIGTERMException (a SystemExit): the same as our own interrupt
    try:
        trainer.fit(module, datamodule=datamodule)
    except SIGTERMException:
        raise TrialInterrupted("interrupted by SIGTERM") from None
    # 5. after training, on the device it trained on (Lightning's teardown moved the model to
    #    the CPU): recalibrate, validate again, measure
    model.to(trainer.strategy.root_device)
    measured = None if observer is None else observer.shifts
    final, measured = after_training(model, config, datamodule, history[-1], measured)
    return TrialResult(final[spec.study.metric], model.cpu(), history, final, measured)


def build_seeded(
    spec: Spec,
    config: TrialConfig,
    datamodule: pl.LightningDataModule,
    *,
    batchnorm: bool = True,
) -> nn.Module:
    """The configuration's network, initialised from the spec's seed: the same weights each time."""
    pl.seed_everything(spec.train.seed, workers=False, verbose=False)
    shape, n_classes = datamodule.input_shape, datamodule.n_classes  # type: ignore[attr-defined]
    return build_model(
        spec.model, config, shape, n_classes, batchnorm=batchnorm, base_dir=spec.base_dir
    )


def predict(
    spec: Spec, config: TrialConfig, datamodule: pl.LightningDataModule
) -> NetworkPrediction:
    """Each BN layer's Δ, predicted before training from the network the trial will train."""
    model = build_seeded(spec, config, datamodule)
    cuda = spec.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"  # the probe runs where training will
    probe = probe_batch(datamodule.train_dataloader())
    return predict_shift(model, probe, device=device, traced=spec.model.imported)


def after_training(
    model: nn.Module,
    config: TrialConfig,
    datamodule: pl.LightningDataModule,
    last_epoch: dict[str, float],
    measured: dict[str, LayerShift] | None = None,
) -> tuple[dict[str, float], dict[str, LayerShift]]:
    """The metrics the trial ends with, and Δ per BN layer, measured on the validation data.

    The metrics are the last epoch's or, when the configuration recalibrates BN, the validation
    metrics taken again after recalibration (train_loss stays the epoch's), with Δ observed in
    that same pass. `measured`: Δ already observed in the last epoch's validation; None when
    that validation did not run the float32 network (another precision, or compiled) or was not
    observed, and then a float32 validation pass here gives Δ and eval mode's accuracy. Last,
    the accuracy in train mode on the validation data (one more pass over it), against eval
    mode's.
    """
    final = {k: v for k, v in last_epoch.items() if k != "epoch"}
    if config.recalibrate_bn:
        final["val_acc_before_recalibration"] = final["val_acc"]
        recalibrate_bn(model, _first(datamodule.train_dataloader(), RECALIBRATION_BATCHES))
        with shift_observed(model) as measured:
            final.update(evaluate(model, datamodule.val_dataloader()))
        eval_mode = final["val_acc"]
    elif measured is None:
        with shift_observed(model) as measured:
            eval_mode = evaluate(model, datamodule.val_dataloader())["val_acc"]
    else:
        eval_mode = final["val_acc"]
    final["train_mode_acc"] = train_mode_accuracy(model, datamodule.val_dataloader())
    final["eval_mode_acc"] = eval_mode
    final["mode_acc_gap"] = eval_mode - final["train_mode_acc"]
    return final, measured


def evaluate(model: nn.Module, batches: Any) -> dict[str, float]:
    """val_loss and val_acc of `model` in eval mode over `batches`, one host sync at the end."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss = correct = count = torch.zeros((), device=device)
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = loss + F.cross_entropy(logits, y, reduction="sum")
            correct = correct + (logits.argmax(dim=1) == y).sum()
            count = count + len(y)
    model.train(was_training)
    total_loss, total_correct, n = torch.stack([loss, correct, count]).tolist()
    return {"val_loss": total_loss / n, "val_acc": total_correct / n}


def _first(batches: Any, limit: int) -> Iterator[Any]:
    """At most `limit` batches of an iterable."""
    for i, batch in enumerate(batches):
        if i >= limit:
            return
        yield batch


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C or SIGTERM into an event the running trial checks between batches.

    A second Ctrl-C interrupts at once; a second SIGTERM changes nothing (a scheduler such as
    SLURM signals every process of a job, so a worker hears its launcher's SIGTERM and its own).
    Outside the main thread signals cannot be caught, and the event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def _explores(trial: optuna.Trial, prediction: NetworkPrediction) -> bool:
    """Whether the gate let this trial through only because it is one that explores."""
    pruner = trial.study.pruner
    if not isinstance(pruner, VarianceShiftPruner):
        return False
    return pruner.past_gate(trial.study, prediction.summary.worst_delta)


def gate_reason(study: optuna.Study, prediction: NetworkPrediction) -> str:
    """Why a trial stopped before training: its worst predicted Δ and the line it crossed."""
    summary = prediction.summary
    text = f"pruned before training: predicted Δ {summary.worst_delta:.3f} at {summary.worst_layer}"
    pruner = study.pruner
    limit = pruner.gate_distance(study) if isinstance(pruner, VarianceShiftPruner) else None
    if limit is None:
        return text
    return f"{text}, outside the gate's [{math.exp(-limit):.3f}, {math.exp(limit):.3f}]"


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
        admit: Callable[[optuna.Trial], bool] | None = None,
    ):
        """`admit(trial)`: whether the study's budget has room for this trial (several workers
        share it); a trial it refuses ends FAIL before anything runs, marked `surplus`."""
        self.spec, self.space, self.datamodule, self.tracker = spec, space, datamodule, tracker
        self.stop = stop or threading.Event()
        self.on_epoch = on_epoch
        self.admit = admit
        # the trials a signal stopped after their configuration was sampled
        self.cut_short: list[int] = []
        # a write the disk refused in a trial: the loop stops after it (see loop.run_trials)
        self.fault: WriteError | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(STARTED, trial.number)
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
        config = self.space.sample(trial)
        trial.set_user_attr(CONFIG_ATTR, config.to_dicts())
        trial.set_user_attr(RECALIBRATE_ATTR, config.recalibrate_bn)
        trial.set_user_attr(WORKER_ATTR, WORKER)
        run_id = self.tracker.start_trial(trial.number, config.to_params(), {WORKER_TAG: WORKER})
        # a trial run again after its worker died inherits that trial's attrs: renew them
        if run_id is not None or RUN_ID_ATTR in trial.user_attrs:
            trial.set_user_attr(RUN_ID_ATTR, run_id or "")
        for flag in (EXPLORED_ATTR, INTERRUPTED_ATTR):
            if trial.user_attrs.get(flag):
                trial.set_user_attr(flag, False)
        # the epochs reported so far: a pruned trial's record, and what `autotune sync` logs
        history: list[dict[str, float]] = []
        try:
            return self._trial(trial, config, run_id, history)
        except optuna.TrialPruned as exc:
            self._pruned(trial, run_id, int(history[-1]["epoch"]) if history else 0, str(exc))
            raise
        except (TrialInterrupted, KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and not self._interrupt(exc):
                # the user's code called sys.exit(): the trial fails, the study goes on
                failure = UserCodeError(f"{_user_code(self.spec)} raised {describe(exc)}")
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

    def _trial(
        self,
        trial: optuna.Trial,
        config: TrialConfig,
        run_id: str | None,
        history: list[dict[str, float]],
    ) -> float:
        """Predict, gate, train, measure, record. __call__ records how it ended if it raises."""
        # 1. before any training: what the theory expects of this configuration
        prediction = predict(self.spec, config, self.datamodule)
        trial.set_user_attr(PREDICTED_SHIFT_ATTR, prediction.to_dict())
        trial.set_user_attr(DELTA_KEY, prediction.summary.worst_delta)
        self.tracker.log_metrics(run_id, predicted_metrics(prediction.to_dict()), step=0)
        # 2. the pruner's gate, before the first epoch
        if trial.should_prune():
            raise optuna.TrialPruned(gate_reason(trial.study, prediction))
        if _explores(trial, prediction):  # past the line, trained anyway: mark it
            trial.set_user_attr(EXPLORED_ATTR, True)
            self.tracker.log_tags(run_id, {EXPLORED_TAG: True})

        def report(epoch: int, metrics: dict[str, float]) -> None:
            history.append({"epoch": epoch, **metrics})
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            if self.on_epoch is not None:
                self.on_epoch(trial, epoch, metrics)

        # 3. train, then what was measured after training
        result = fit(
            self.spec, config, self.datamodule, trial=trial, on_epoch=report, stop=self.stop
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
        self, trial: optuna.Trial, run_id: str | None, result: TrialResult
    ) -> None:
        """Measured Δ per BN layer, its summary, and the final metrics: Optuna and MLflow."""
        summary = summarize(result.measured)
        measured = {
            "layers": {name: layer.delta for name, layer in result.measured.items()},
            "summary": {
                "worst_layer": summary.worst_layer,
                "worst_delta": summary.worst_delta,
                "product": summary.product,
            },
        }
        trial.set_user_attr(MEASURED_SHIFT_ATTR, measured)
        trial.set_user_attr(FINAL_ATTR, result.final)
        metrics = measured_metrics(measured, result.final)
        self.tracker.log_metrics(run_id, metrics, step=self.spec.train.max_epochs)

    def _save_if_best(self, trial: optuna.Trial, result: TrialResult) -> None:
        study = trial.study
        try:
            best = study.best_value
        except ValueError:  # no trial has completed yet
            best = None
        better = best is None or (
            # >=: a trial that ties the best may be the one Optuna names best; keep its weights
            result.value >= best if study.direction.name == "MAXIMIZE" else result.value <= best
        )
        if better:  # whole or not there: never a file cut short (WriteError when the disk refuses)
            path = trial_weights(self.spec.output_dir, trial.number)
            digest = save_tensors(result.model.state_dict(), path)
            # the export checks the file is this trial's: another study may share the folder
            trial.set_user_attr(WEIGHTS_DIGEST, digest)

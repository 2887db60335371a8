"""The fit of one configuration: build the network, train it in Lightning, report every epoch,
honour pruning, and measure what the trial ends with.

The LightningModule keeps its running sums on the device and the metrics reach the host once per
epoch (one sync), where `EpochReporter` hands them to Optuna (report / should_prune) and MLflow.
Lightning's own logger, progress bar, checkpoints and model summary are off inside trials.

Around the fit, the variance shift: before training, each BN layer's Δ is predicted from the
freshly built network and a probe batch (autotune.nn.prediction); after training, BN is recalibrated
with dropout off when the configuration asks for it and the validation metrics are taken again.
Δ is measured the paper's way (autotune.nn.shift) in the last validation pass that runs the final
network (the last epoch's, or the one after recalibration), not in a pass of its own unless
validation ran in another precision or compiled, and the accuracy of train mode is compared with
eval mode's on the validation data.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F

from autotune.core.signals import TrialInterrupted
from autotune.core.space import TrialConfig
from autotune.core.spec import Spec, TrainSpec
from autotune.nn.data import hold_on_device
from autotune.nn.models import build_model
from autotune.nn.observers import FirstEpochPrediction, LastValidationShift
from autotune.nn.prediction import NetworkPrediction, Training, predict_shift
from autotune.nn.probe import probe_batch
from autotune.nn.shift import (
    LayerShift,
    factor_shift,
    recalibrate_bn,
    shift_observed,
    train_mode_accuracy,
)

EpochCallback = Callable[[int, dict[str, float]], None]
# batches of the training data BN recalibration sees: enough for exact population statistics of
# small sets, bounded for big ones (fvcore's precise BN uses 200)
RECALIBRATION_BATCHES = 200


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial fails, the study goes on."""


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
    on_trained_prediction: Callable[[NetworkPrediction], None] | None = None,
) -> TrialResult:
    """Train one configuration; return its final metric (after BN recalibration when the
    configuration asks for it), the trained model and what was measured after training.
    batchnorm=False trains the network with its BN layers removed (a baseline).
    on_trained_prediction: called after the first epoch with Δ's factors predicted from the
    trial's own weights (observers.FirstEpochPrediction), before that epoch is reported.

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
    callbacks: list[pl.Callback] = [reporter] if observer is None else [reporter, observer]
    if on_trained_prediction is not None and spec.train.max_epochs > 1:
        # the probe drawn apart from the training's random state: a shuffled DataLoader's
        # iterator draws its order from it, and the fit must be the one without the probe
        with torch.random.fork_rng(devices=[]):
            probe = probe_batch(datamodule.train_dataloader())
        first = FirstEpochPrediction(model, probe, config.recalibrate_bn, on_trained_prediction)
        callbacks.insert(0, first)  # before the reporter, which lets the pruner decide
    trainer = quiet_trainer(spec.train, callbacks)
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


def quiet_trainer(train: TrainSpec, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Trainer for one trial on one device: no logger, checkpoints, progress bar, model
    summary or sanity validation; `callbacks` report and observe."""
    return pl.Trainer(
        accelerator=train.accelerator,
        devices=1,
        precision=train.precision,
        max_epochs=train.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


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
    """Each BN layer's Δ, its dropout factor and its lag, predicted before training from the
    network the trial will train and the steps it will take."""
    model = build_seeded(spec, config, datamodule)
    cuda = spec.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"  # the probe runs where training will
    loader = datamodule.train_dataloader()
    probe = probe_batch(loader)
    try:
        training = Training(spec.train.max_epochs * len(loader), config.recalibrate_bn)
    except TypeError:  # a loader of unknown length (an iterable dataset): no lag predicted
        training = None
    return predict_shift(model, probe, device=device, traced=spec.model.imported, training=training)


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
    observed, and then a float32 validation pass here gives Δ and eval mode's accuracy. Then
    Δ's two factors (shift.factor_shift: one more pass over the validation data, the
    regularisers on). Last, the accuracy in train mode on the validation data (one more pass
    over it), against eval mode's.
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
    # Δ's two factors: one more pass over the validation data, the regularisers on
    measured = factor_shift(model, datamodule.val_dataloader(), measured)
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

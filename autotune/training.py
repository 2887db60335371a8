"""One trial: build the network, fit it in Lightning, report every epoch, honour pruning.

The LightningModule keeps its running sums on the device and the metrics reach the host once per
epoch (one sync), where `EpochReporter` hands them to Optuna (report / should_prune) and MLflow.
Lightning's own logger, progress bar, checkpoints and model summary are off inside trials.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F

from autotune.models import build_model
from autotune.space import TrialConfig
from autotune.spec import Spec, TrainSpec

EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial fails, the study goes on."""


class TrialInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived during a trial; raised at the next batch boundary."""


class Classifier(pl.LightningModule):
    """Cross-entropy training of `model`; per-epoch train_loss, val_loss and val_acc."""

    def __init__(self, model: nn.Module, train: TrainSpec) -> None:
        super().__init__()
        self.model = model
        self.train_spec = train
        self._sums: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0) + value.detach()

    def on_train_epoch_start(self) -> None:
        self._sums = {}

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self._accumulate("train_loss", loss * len(y))
        self._accumulate("train_n", torch.tensor(len(y), device=loss.device))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._accumulate("val_loss", F.cross_entropy(logits, y, reduction="sum"))
        self._accumulate("val_correct", (logits.argmax(dim=1) == y).sum())
        self._accumulate("val_n", torch.tensor(len(y), device=logits.device))

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's metrics, brought to the host in one sync. Call after validation."""
        names = ("train_loss", "train_n", "val_loss", "val_correct", "val_n")
        values = torch.stack([self._sums[n].float() for n in names]).tolist()
        sums = dict(zip(names, values, strict=True))
        return {
            "train_loss": sums["train_loss"] / sums["train_n"],
            "val_loss": sums["val_loss"] / sums["val_n"],
            "val_acc": sums["val_correct"] / sums["val_n"],
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        spec, params = self.train_spec, self.parameters()
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
    """What a finished trial hands back."""

    value: float
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    spec: Spec,
    config: TrialConfig,
    datamodule: pl.LightningDataModule,
    *,
    trial: optuna.Trial | None = None,
    on_epoch: EpochCallback | None = None,
    stop: threading.Event | None = None,
) -> TrialResult:
    """Train one configuration; return the metric after the last epoch and the trained model.

    Raises optuna.TrialPruned when the trial's pruner says so, NonFiniteLossError when the loss
    diverges and TrialInterrupted when `stop` is set.
    """
    # 1. the same seed for every trial: trials differ by their configuration, not their luck
    pl.seed_everything(spec.train.seed, workers=False, verbose=False)
    model = build_model(spec.model, config, datamodule.input_shape, datamodule.n_classes)  # type: ignore[attr-defined]
    module = Classifier(model, spec.train)
    history: list[dict[str, float]] = []

    def record(epoch: int, metrics: dict[str, float]) -> None:
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    # 2. a quiet Trainer: no logger, checkpoints, progress bar or summary inside a trial
    reporter = EpochReporter(trial, spec.study.metric, record, stop or threading.Event())
    trainer = pl.Trainer(
        accelerator=spec.train.accelerator,
        devices=1,
        max_epochs=spec.train.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[reporter],
    )
    # 3. fit; pruning and failures leave through exceptions. Lightning turns a SIGTERM into
    #    SIGTERMException (a SystemExit): the same as our own interrupt
    try:
        trainer.fit(module, datamodule=datamodule)
    except SIGTERMException:
        raise TrialInterrupted("interrupted by SIGTERM") from None
    return TrialResult(history[-1][spec.study.metric], model.cpu(), history)


def quiet_lightning() -> None:
    """Lightning's per-fit banners ("GPU available ...") and hints would drown the progress bar."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C or SIGTERM into an event the running trial checks between batches.

    A second Ctrl-C interrupts at once. Outside the main thread signals cannot be caught, and the
    event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    ):
        self.spec, self.space, self.datamodule, self.tracker = spec, space, datamodule, tracker
        self.stop = stop or threading.Event()
        self.on_epoch = on_epoch

    def __call__(self, trial: optuna.Trial) -> float:
        if self.stop.is_set():  # the signal came between trials: start nothing new
            trial.set_user_attr("interrupted", True)
            raise KeyboardInterrupt
        config = self.space.sample(trial)
        trial.set_user_attr("config", config.to_dicts())
        run_id = self.tracker.start_trial(trial.number, config.to_params())
        if run_id is not None:
            trial.set_user_attr("mlflow_run_id", run_id)

        epochs: list[int] = []

        def report(epoch: int, metrics: dict[str, float]) -> None:
            epochs.append(epoch)
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            if self.on_epoch is not None:
                self.on_epoch(trial, epoch, metrics)

        try:
            result = fit(
                self.spec, config, self.datamodule, trial=trial, on_epoch=report, stop=self.stop
            )
        except optuna.TrialPruned as exc:
            epoch = epochs[-1] if epochs else 0
            trial.set_user_attr("pruned_epoch", epoch)
            trial.set_user_attr("pruned_reason", str(exc))
            self.tracker.end_trial(
                run_id,
                "PRUNED",
                {"autotune.pruned_epoch": epoch, "autotune.pruned_reason": str(exc)},
            )
            raise
        except (TrialInterrupted, KeyboardInterrupt, SystemExit):
            # a second Ctrl-C inside Lightning arrives as its sys.exit(1): still an interrupt
            trial.set_user_attr("interrupted", True)
            self.tracker.end_trial(run_id, "INTERRUPTED")
            raise KeyboardInterrupt from None
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            self.tracker.end_trial(run_id, "FAIL", {"autotune.fail_reason": reason})
            raise
        self._save_if_best(trial, result)
        self.tracker.end_trial(run_id, "COMPLETE")
        return result.value

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
        if better:
            folder = self.spec.output_dir / "weights"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(result.model.state_dict(), folder / f"trial_{trial.number}.pt")

"""Lightning callbacks that watch a trial's variance shift while it trains: Δ measured in the last
epoch's validation pass, and Δ's two factors predicted again from the trial's own weights after
its first epoch."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import lightning.pytorch as pl
import torch
from torch import nn

from autotune.nn.prediction import NetworkPrediction, Training, predict_trained
from autotune.nn.shift import LayerShift, shift_observed


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


class FirstEpochPrediction(pl.Callback):
    """After the first epoch (of two or more), Δ's factors predicted from the trial's own
    weights on the probe batch (prediction.predict_trained) over the steps left, handed to
    `on_prediction` before the epoch is reported to the pruner. Its probe passes leave the
    training as it was: BN's statistics, the modes and the random state."""

    def __init__(
        self,
        model: nn.Module,
        probe: torch.Tensor,
        recalibrate_bn: bool,
        on_prediction: Callable[[NetworkPrediction], None],
    ) -> None:
        self.model, self.probe, self.recalibrate_bn = model, probe, recalibrate_bn
        self.on_prediction = on_prediction
        self.prediction: NetworkPrediction | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0 or trainer.sanity_checking:
            return
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or trainer.max_epochs is None or trainer.max_epochs < 2:
            return  # one epoch, or epochs of unknown length: nothing to carry the lag over
        left = (trainer.max_epochs - 1) * int(batches)
        training = Training(left, self.recalibrate_bn)
        self.prediction = predict_trained(self.model, self.probe, training)
        self.on_prediction(self.prediction)

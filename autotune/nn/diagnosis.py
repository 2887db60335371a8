"""The variance shift of a network that is already trained: found, layer by layer, and repaired
by recalibrating BN with dropout off, without retraining (`autotune diagnose` and `fix`).

Over the training batches (the distribution BN's running statistics were learned on), per BN
layer that tracks running statistics:

- Δ and its two factors, as a trial measures them (autotune.nn.shift): dropout's shift, what the
  regularisers alone do to the variance BN sees, and BN's lag, what the running statistics got
  wrong besides;
- the dropout factor the theory predicts from the same weights (autotune.nn.prediction: the
  covariance closed form where it applies, Monte Carlo draws elsewhere);
- Δ again once BN is recalibrated on those batches (shift.recalibrate_bn: weights frozen, dropout
  off), close to 1 in a layer that recalibration repairs.

Then the accuracy in eval mode on the validation batches, as trained and recalibrated: what
recalibration wins. A layer is shifted when its Δ is off 1 by more than SHIFTED.

Recalibration cannot repair a network whose weights adapted to the shift: the layers after a
dropout learned to expect its noisy statistics, and only retraining (or tuning) changes that.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autotune.nn.fitting import RECALIBRATION_BATCHES, evaluate
from autotune.nn.prediction import predict_shift
from autotune.nn.probe import probe_batch
from autotune.nn.shift import (
    factor_shift,
    fork_rng_on,
    measure_shift,
    model_device,
    recalibrate_bn,
    tracking_bns,
)

SHIFTED = 0.05  # a layer is shifted when |Δ − 1| exceeds this: BN's scale off by over 5 %


@dataclass(frozen=True)
class LayerDiagnosis:
    """One BN layer of a trained network: its measured Δ, both factors, the dropout factor the
    theory predicts, and Δ once BN is recalibrated."""

    name: str
    delta: float
    dropout: float
    lag: float
    predicted: float  # the dropout factor the theory predicts from these weights
    method: str  # how it was predicted: none | covariance | monte_carlo
    recalibrated: float  # Δ after recalibration
    momentum: float | None

    @property
    def shifted(self) -> bool:
        return abs(self.delta - 1.0) > SHIFTED


@dataclass(frozen=True)
class Diagnosis:
    """A trained network's variance shift, and what recalibrating BN wins on validation."""

    layers: tuple[LayerDiagnosis, ...]
    train_rows: int  # the rows Δ was measured and BN recalibrated on
    val_rows: int
    before: dict[str, float]  # val_acc, val_loss as trained (eval mode)
    after: dict[str, float]  # with BN recalibrated, dropout off

    @property
    def shifted(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.shifted)

    @property
    def needs_fix(self) -> bool:
        """Whether there is anything to fix: a shifted layer, or a layer whose channels lag
        even where their mean does not, so that recalibration wins accuracy."""
        return bool(self.shifted) or self.gain > 0

    @property
    def gain(self) -> float:
        """What recalibration wins in val_acc (a fraction; negative: it loses)."""
        return self.after["val_acc"] - self.before["val_acc"]

    def to_dict(self) -> dict:
        return {
            "layers": {
                layer.name: {
                    **{k: v for k, v in asdict(layer).items() if k != "name"},
                    "shifted": layer.shifted,
                }
                for layer in self.layers
            },
            "shifted": list(self.shifted),
            "needs_fix": self.needs_fix,
            "threshold": SHIFTED,
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "before": self.before,
            "after": self.after,
            "gain": self.gain,
        }


def diagnose(
    model: nn.Module,
    train_batches: Iterable,
    val_batches: Iterable,
    *,
    traced: bool = True,
    seed: int = 0,
) -> tuple[Diagnosis, nn.Module]:
    """The variance shift of trained `model` and a copy of it with BN recalibrated (dropout off)
    on `train_batches`, at most RECALIBRATION_BATCHES of them. `model` is left as it was.
    traced: find which regulariser reaches which BN by tracing a pass (any network); False for
    autotune's templates, whose blocks say it. Every draw of noise is seeded with `seed`."""
    batches = list(itertools.islice(train_batches, RECALIBRATION_BATCHES))
    val = list(val_batches)
    shifts = factor_shift(model, batches, measure_shift(model, batches), seed=seed)
    with fork_rng_on(model_device(model)):
        torch.manual_seed(seed)
        predicted = predict_shift(
            model, probe_batch(batches), device=model_device(model), traced=traced
        )
    fixed = recalibrate_bn(copy.deepcopy(model), batches)
    after = measure_shift(fixed, batches)
    by_name = {layer.name: layer for layer in predicted.layers}
    modules = dict(model.named_modules())
    layers = tuple(
        LayerDiagnosis(
            name=name,
            delta=shift.delta,
            dropout=shift.dropout if shift.dropout is not None else 1.0,
            lag=shift.lag if shift.lag is not None else shift.delta,
            predicted=by_name[name].exact if name in by_name else 1.0,
            method=by_name[name].method if name in by_name else "none",
            recalibrated=after[name].delta if name in after else math.nan,
            momentum=modules[name].momentum,
        )
        for name, shift in shifts.items()
    )
    diagnosis = Diagnosis(
        layers=layers,
        train_rows=sum(_rows(batch) for batch in batches),
        val_rows=sum(_rows(batch) for batch in val),
        before=evaluate(model, val),
        after=evaluate(fixed, val),
    )
    return diagnosis, fixed


def has_running_bn(model: nn.Module) -> bool:
    """Whether `model` has a BN layer with running statistics: what a variance shift needs."""
    return bool(tracking_bns(model))


def _rows(batch: torch.Tensor | Sequence) -> int:
    return len(batch if isinstance(batch, torch.Tensor) else batch[0])

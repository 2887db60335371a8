"""The variance shift measured in a real network, and BatchNorm recalibration with dropout off.

Li et al., "Understanding the Disharmony between Dropout and Batch Normalization by Variance
Shift", CVPR 2019, https://arxiv.org/abs/1801.05134

In training, dropout (or any multiplicative noise) inflates the variance of what reaches a BN
layer, and BN's running_var learns that inflated variance. At inference the noise is off, so BN
divides by a variance that is too large. autotune/core/theory.py predicts the ratio in closed form;
this module measures it, layer by layer, the way the paper does:

    real_var = per-channel variance of the BN layer's INPUT with the whole network in eval mode
               (noise off, every BN on its running statistics), pooled over the data and over the
               batch and spatial dimensions
    Δ        = real_var / running_var      (Var_test / Var_train; Δ < 1: BN over-divides)

Upstream BN layers run on their running statistics too, so a shift early in the network carries
into the inputs of later layers, as it does at inference. Variances are unbiased (n − 1), the
convention of BN's own running_var, so Δ = 1 exactly when BN's statistics match the data.

Δ mixes two things, which factor_shift tells apart with one more pass over the same batches,
the same weights and every BN still on its running statistics, but the regularisers on:

    noisy_var = per-channel variance of the BN input with the regularisers on
    dropout   = real_var / noisy_var    the shift the regularisers alone cause: the paper's
                                        quantity proper, exactly 1 where no regulariser reaches
    lag       = noisy_var / running_var what BN's running statistics, an exponential average
                                        over weights that kept moving, got wrong about the
                                        input they normalise

Channel by channel Δ = dropout × lag. A layer's dropout factor is the mean over its live
channels, as its Δ is, and its lag is Δ / dropout, so that the layer's two factors multiply to
its Δ exactly.

Recalibration ("statistics adjustment" in the paper) freezes the weights, turns the noise OFF and
lets BN re-estimate its population statistics on training data. Every BN runs in train mode (it
normalises with batch statistics, as in training), every other module in eval mode. The mean and
variance of each BN's input are pooled over all the data (each batch's moments taken in two
float32 passes by channel_moments, merged exactly in float64 by Chan et al.'s formula) and written
into running_mean and running_var: the data pooled as one sample, which
momentum=None does not give: BN's cumulative average takes the mean of per-batch variances, which
misses the spread between batch means and weights a short last batch like a full one. For the
first BN the result does not depend on the batch size; later layers see inputs normalised with
batch statistics upstream, which depend on it slightly (as in fvcore's precise_bn).
torch.optim.swa_utils.update_bn puts the whole model in train mode, dropout included: it
re-learns the inflated variance and must not be used for this.

Every function here leaves the model as it found it (training flags, momenta, hooks), except for
the BN statistics that recalibrate_bn is there to change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autotune.core.theory import ShiftSummary, summarize_shift
from autotune.nn.moments import Moments
from autotune.nn.regularizers import REGULARIZER_TYPES


@dataclass(frozen=True)
class LayerShift:
    """The measured variance shift of one BN layer; `delta` = Var_test / Var_train."""

    name: str  # the module's name in model.named_modules()
    delta: float  # channel mean of per_channel
    per_channel: tuple[float, ...]  # real_var / running_var, channel by channel
    real_var: float  # channel mean of the eval-mode variance of BN's input
    running_var: float  # channel mean of BN's running_var
    channel_var: tuple[float, ...] = ()  # the eval-mode variance of BN's input, channel by channel
    dropout: float | None = None  # Δ's dropout factor (factor_shift); None until it ran
    lag: float | None = None  # Δ's lag factor, Δ / dropout
    momentum: float | None = None  # the BN layer's momentum (None: a cumulative average)

    def factored(self, noisy_var: Tensor) -> LayerShift:
        """This shift with its two factors, given the per-channel variance of the BN input with
        the regularisers on (same weights, same batches, BN on its running statistics)."""
        ratios = [
            real / noisy if noisy > 0 else math.nan
            for real, noisy in zip(self.channel_var, noisy_var.tolist(), strict=True)
        ]
        live = [
            _alive(delta) and _alive(ratio)
            for ratio, delta in zip(ratios, self.per_channel, strict=True)
        ]
        dropout = _live_mean(ratios, live)
        return replace(self, dropout=dropout, lag=self.delta / dropout)


def measure_shift(model: nn.Module, batches: Iterable) -> dict[str, LayerShift]:
    """Δ for every BN layer that tracks running statistics, keyed by module name, in model order.

    `batches` yields tensors x or tuples (x, y, ...); only x is used. Layers the data never reaches
    are left out. The model's modes, buffers and hooks are as before.
    """
    with shift_observed(model) as shifts:
        _forward_all(model, batches)
    return shifts


@contextmanager
def shift_observed(model: nn.Module) -> Iterator[dict[str, LayerShift]]:
    """Δ of every tracking BN layer, from the forward passes the caller runs inside: what
    measure_shift gives, without a pass of its own when the caller evaluates the model anyway.

    The model is in eval mode inside, every BN on its running statistics. The dict yielded is
    filled on the way out, with the running statistics as they are then; modes and hooks are
    restored.
    """
    shifts: dict[str, LayerShift] = {}
    with _observed_bn_inputs(model, bn_train=False) as (layers, moments):
        yield shifts
    shifts.update(
        (name, _layer_shift(name, moments[name].var(), layers[name]))
        for name in layers
        if moments[name].count > 0
    )


def factor_shift(
    model: nn.Module, batches: Iterable, shifts: Mapping[str, LayerShift], *, seed: int = 0
) -> dict[str, LayerShift]:
    """`shifts` (what shift_observed measured over `batches`, with the model as it is now) with
    each layer's dropout and lag factors, from one pass over the same batches with every
    regulariser on and every BN on its running statistics.

    The regularisers draw their noise from torch's random state forked and seeded with `seed`
    (fork_rng_on): the training finds its state as it was. Modes and hooks are restored.
    """
    noisy = noisy_variances(model, batches, seed=seed)
    return {
        name: shift.factored(noisy[name]) if name in noisy else shift
        for name, shift in shifts.items()
    }


def noisy_variances(model: nn.Module, batches: Iterable, *, seed: int = 0) -> dict[str, Tensor]:
    """The per-channel variance of every tracking BN layer's input over `batches`, with every
    regulariser on and every BN on its running statistics; the noise from torch's random state
    forked and seeded with `seed`. Layers the data never reaches are left out."""
    with (
        fork_rng_on(model_device(model)),
        _observed_bn_inputs(model, bn_train=False, regularizers_on=True) as (_, moments),
    ):
        torch.manual_seed(seed)
        _forward_all(model, batches)
    return {name: moment.var() for name, moment in moments.items() if moment.count > 0}


def fork_rng_on(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's random state forked on the CPU and on `device` if it is a CUDA device: what a
    seeded pass inside draws leaves the training's state as it was. (torch.manual_seed inside
    seeds every device; only these two are restored.)"""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def summarize_measured(shifts: Mapping[str, LayerShift]) -> ShiftSummary:
    """The measured shifts in two numbers (worst layer by |log Δ|, product of Δ), as theory's
    summarize_shift gives them for predicted ones."""
    return summarize_shift({name: shift.delta for name, shift in shifts.items()})


def measured_record(shifts: Mapping[str, LayerShift]) -> dict:
    """What a trial stores of its measured shifts (its `measured_shift` attr): Δ per layer and
    its summary, then, once factor_shift ran, each factor per layer with its own summary, under
    "dropout" and "lag", and each layer's BN momentum, which the lag depends on. A study stored
    before the factors has only the first two keys."""
    record = _layers_and_summary({name: shift.delta for name, shift in shifts.items()})
    if shifts and all(shift.dropout is not None for shift in shifts.values()):
        for factor in ("dropout", "lag"):
            values = {name: getattr(shift, factor) for name, shift in shifts.items()}
            record[factor] = _layers_and_summary(values)
        record["momentum"] = {name: shift.momentum for name, shift in shifts.items()}
    return record


def _layers_and_summary(values: dict[str, float]) -> dict:
    summary = summarize_shift(values)
    return {
        "layers": values,
        "summary": {
            "worst_layer": summary.worst_layer,
            "worst_delta": summary.worst_delta,
            "product": summary.product,
        },
    }


def recalibrate_bn(model: nn.Module, batches: Iterable) -> nn.Module:
    """Re-estimate every BN's running statistics on `batches` with dropout off; weights frozen.

    BN layers with track_running_stats=False are left alone, as are those the data never reaches.
    Training flags are restored and momenta never touched; num_batches_tracked counts the batches
    seen. Returns the same model.
    """
    # 1. noise off everywhere; BN normalises with batch statistics, as in training
    with _observed_bn_inputs(model, bn_train=True) as (layers, moments):
        n_batches = _forward_all(model, batches)
    # 2. the exact pooled statistics replace whatever the train-mode passes accumulated
    for name, bn in layers.items():
        if moments[name].count == 0:
            continue
        bn.running_mean.copy_(moments[name].mean.to(bn.running_mean))
        bn.running_var.copy_(moments[name].var().to(bn.running_var))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(n_batches)
    return model


def mode_accuracy(model: nn.Module, batches: Iterable) -> tuple[float, float]:
    """(train-mode accuracy, eval-mode accuracy) on labelled batches (x, y, ...), in one pass.

    Train mode has dropout on and BN on batch statistics; every buffer is restored bit for bit
    after each train-mode forward, so BN's running statistics and counters are untouched. A batch
    of one row that BN cannot normalise by its own statistics (a BatchNorm1d on (1, C)) counts in
    neither mode; NaN when no batch could be counted. Seeding the dropout masks is the caller's
    business.
    """
    train, evaluated = _accuracies(model, batches, (True, False))
    return train, evaluated


def train_mode_accuracy(model: nn.Module, batches: Iterable) -> float:
    """The accuracy in train mode alone, as mode_accuracy takes it, when eval mode's is known."""
    return _accuracies(model, batches, (True,))[0]


def _accuracies(model: nn.Module, batches: Iterable, modes: tuple[bool, ...]) -> list[float]:
    flags = _training_flags(model)
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    buffers = dict(model.named_buffers())
    device = model_device(model)
    # counted on the device, brought to the host once at the end: no sync per batch
    correct = {training: torch.zeros((), device=device) for training in modes}
    seen = total = 0
    try:
        with torch.no_grad():
            for batch in batches:
                seen += 1
                x, y = batch[0].to(device), batch[1].to(device)
                counts = {}
                for training in modes:
                    model.train(training)
                    try:
                        counts[training] = (model(x).argmax(dim=1) == y).sum()
                    except ValueError:  # BN: "expected more than 1 value per channel"
                        if len(x) > 1:
                            raise
                        break
                    finally:
                        if training:  # undo what the train-mode pass did to BN's statistics
                            for name, buffer in buffers.items():
                                buffer.copy_(saved[name])
                if len(counts) < len(modes):
                    continue
                for training, count in counts.items():
                    correct[training] += count
                total += y.shape[0]
    finally:
        _restore_flags(flags)
    if seen == 0:
        raise ValueError("Got no batches; pass labelled batches (x, y).")
    if total == 0:
        return [math.nan] * len(modes)
    return [count / total for count in torch.stack(list(correct.values())).tolist()]


def _layer_shift(name: str, real_var: Tensor, bn: _BatchNorm) -> LayerShift:
    running = bn.running_var.detach().to(device=real_var.device, dtype=torch.float64)
    per_channel = (real_var / running).tolist()  # a channel with running_var 0 gives inf or nan
    # the layer's Δ averages the channels that carry signal: a dead channel has nothing to shift
    live = [r > 0 and _alive(d) for d, r in zip(per_channel, running.tolist(), strict=True)]
    return LayerShift(
        name=name,
        delta=_live_mean(per_channel, live),
        per_channel=tuple(per_channel),
        real_var=float(real_var.mean()),
        running_var=float(running.mean()),
        channel_var=tuple(real_var.tolist()),
        momentum=bn.momentum,
    )


def _live_mean(ratios: list[float], live: list[bool]) -> float:
    """The mean of the live channels' ratios; 1 (no shift) where no channel is live."""
    kept = [ratio for ratio, keep in zip(ratios, live, strict=True) if keep]
    return math.fsum(kept) / len(kept) if kept else 1.0


def _alive(ratio: float) -> bool:
    """A channel's ratio that says something: a dead channel gives 0, inf or nan."""
    return math.isfinite(ratio) and ratio > 0


@contextmanager
def _observed_bn_inputs(
    model: nn.Module, *, bn_train: bool, regularizers_on: bool = False
) -> Iterator[tuple[dict[str, _BatchNorm], dict[str, Moments]]]:
    """The model in eval mode (BN layers in train mode if bn_train, the regularisers on if
    regularizers_on), every tracking BN's input pooled into Moments; hooks removed and training
    flags restored on the way out."""
    layers = tracking_bns(model)
    flags = _training_flags(model)
    moments = {name: Moments() for name in layers}
    handles = [bn.register_forward_hook(moments[name].hook) for name, bn in layers.items()]
    try:
        model.eval()
        for bn in layers.values():  # not .train(): a regulariser BN hosts (surgery) stays off
            bn.training = bn_train
        for module in model.modules():
            if isinstance(module, REGULARIZER_TYPES):
                module.training = regularizers_on
        yield layers, moments
    finally:
        for handle in handles:
            handle.remove()
        _restore_flags(flags)


def tracking_bns(model: nn.Module) -> dict[str, _BatchNorm]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats
    }


def _training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {module: module.training for module in model.modules()}


def _restore_flags(flags: dict[nn.Module, bool]) -> None:
    for module, training in flags.items():
        module.training = training  # not .train(): that would overwrite the children too


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _inputs(batches: Iterable) -> Iterator[Tensor]:
    for batch in batches:
        yield batch if isinstance(batch, Tensor) else batch[0]


def _forward_all(model: nn.Module, batches: Iterable) -> int:
    """Run every batch's x through the model under no_grad; return the number of batches."""
    device = model_device(model)
    n_batches = 0
    with torch.no_grad():
        for x in _inputs(batches):
            model(x.to(device))
            n_batches += 1
    if n_batches == 0:
        raise ValueError("Got no batches; pass an iterable of tensors x or tuples (x, y, ...).")
    return n_batches

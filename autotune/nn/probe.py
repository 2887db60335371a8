"""The probe of the variance-shift prediction (prediction.py): the probe batch, and one forward
pass of it through a copy of the network with the regularisers on or off, BN on batch
statistics, recording each regulariser's input and each BN input's per-channel variance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from autotune.nn.feeds import BATCHNORM
from autotune.nn.moments import channel_moments
from autotune.nn.regularizers import REGULARIZER_TYPES

PROBE_ROWS = 512  # rows of the probe batch: enough for stable moments, cheap at initialisation
PROBE_VALUES = 1 << 15  # values per channel an image probe needs: rows x H x W
MIN_PROBE_ROWS = 64


def probe_batch(batches: Iterable, rows: int | None = None) -> torch.Tensor:
    """The first rows of `batches` ((x, y) tuples or tensors), as one tensor.

    By default PROBE_ROWS, fewer for images: each row of an (N, C, H, W) batch gives H·W values
    per channel, so PROBE_VALUES // (H·W) rows (at least MIN_PROBE_ROWS) estimate the moments as
    well, at a fraction of the cost."""
    taken: list[torch.Tensor] = []
    count = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if rows is None:
            positions = math.prod(x.shape[2:])
            rows = max(MIN_PROBE_ROWS, min(PROBE_ROWS, PROBE_VALUES // positions))
        taken.append(x)
        count += len(x)
        if count >= rows:
            break
    if not taken:
        raise ValueError("The probe needs at least one batch, but got none.")
    return torch.cat(taken)[:rows]


@dataclass
class _Pass:
    """What one forward pass of the probe saw."""

    inputs: dict[str, torch.Tensor]  # regulariser name -> its input
    variances: dict[str, torch.Tensor]  # BN name -> per-channel variance of its input
    after_noise: set[str]  # BN layers that ran after some regulariser did


def run_probe(net: nn.Module, x: torch.Tensor, *, regularizers_on: bool) -> _Pass:
    """One forward pass with the regularisers on or off, BN on batch statistics."""
    seen = _Pass({}, {}, set())
    hooks = []

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.inputs[name] = args[0].detach()

        return hook

    def keep_variance(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.variances[name] = channel_var(args[0].detach())
            if seen.inputs:
                seen.after_noise.add(name)

        return hook

    for name, module in net.named_modules():
        if isinstance(module, REGULARIZER_TYPES):
            module.train(regularizers_on)
            hooks.append(module.register_forward_pre_hook(keep_input(name)))
        elif isinstance(module, BATCHNORM):
            hooks.append(module.register_forward_pre_hook(keep_variance(name)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def channel_var(t: torch.Tensor) -> torch.Tensor:
    """Per-channel variance over the batch (and the map, for (N, C, H, W)), in float64."""
    n, _, m2 = channel_moments(t)
    return m2 / n


def mean_variances(runs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([run[name] for run in runs]).mean(dim=0) for name in runs[0]}


def channel_mean(signal: torch.Tensor, delta: torch.Tensor) -> float:
    """Mean Δ over the channels that carry signal (a dead channel has no variance to shift)."""
    signal, delta = signal.cpu(), delta.cpu()
    alive = signal > 1e-12 * max(float(signal.max()), 1e-30)
    return float(delta[alive].mean()) if bool(alive.any()) else 1.0

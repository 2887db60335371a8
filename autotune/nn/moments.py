"""Per-channel moments of a BN input, the numbers every measurement of Δ rests on: the count,
mean and sum of squared deviations of each channel over the batch and any spatial dimensions,
taken in two passes of the input's own precision and merged across batches exactly in float64."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def channel_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """Per channel of an (N, C, ...) tensor: the count, the mean and the sum of squared deviations
    over the batch and any spatial dimensions, as float64.

    Two passes in the input's precision (half precision is raised to float32), along the tensor as
    it lies in memory: the mean m', then the deviations d = x - m', whose sum corrects both moments
    for the rounding of m' (mean = m' + sum(d)/n, m2 = sum(d^2) - sum(d)^2/n). torch sums in
    cascades, so the error is a few float32 roundings (about 1e-7 relative); a channels-first
    float64 copy, the plain way, takes 8 to 10 times as long for a convolution's output on a CPU
    (benchmarks/moments.py).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    rounded = x.mean(dim=dims)
    deviations = x - rounded.view(1, -1, *([1] * (x.dim() - 2)))
    total = deviations.sum(dim=dims)
    m2 = deviations.square_().sum(dim=dims) - total * total / n  # in place: one buffer, not two
    return n, rounded.double() + total.double() / n, m2.double()


class Moments:
    """Per-channel count, mean and sum of squared deviations of a BN input, merged in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = torch.zeros(0, dtype=torch.float64)
        self.m2 = torch.zeros(0, dtype=torch.float64)

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        n, mean, m2 = channel_moments(inputs[0].detach())
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        # Chan et al.'s pairwise merge: exact, whatever the batch sizes
        total = self.count + n
        diff = mean - self.mean
        self.mean = self.mean + diff * (n / total)
        self.m2 = self.m2 + m2 + diff**2 * (self.count * n / total)
        self.count = total

    def var(self) -> Tensor:
        """Unbiased per-channel variance (n − 1), BN's running_var convention."""
        return self.m2 / max(self.count - 1, 1)

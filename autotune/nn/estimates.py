"""The closed-form estimates of Δ for one feed (prediction.py's docstring states them): `paper`,
the paper's equal-statistics form, and `covariance`, exact for mean-one multiplicative noise fed
to BN directly or through one weight layer. Each returns None where it does not apply; the
conversion from drop rate to keep ratio and the closed forms themselves stay in theory.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autotune.core import theory
from autotune.nn.feeds import WEIGHTS, Feed
from autotune.nn.probe import channel_mean, channel_var
from autotune.nn.regularizers import DropBlock2d, GaussianDropout, StochasticDepth, Uout

MAX_PATCH_ROWS = 8192  # rows of a convolution's patch matrix used to estimate ρ
UNFOLD_ELEMENTS = 1 << 24  # most elements of one patch matrix at a time (128 MiB in float64)
ACTIVATIONS_THROUGH_ZERO = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh)  # f(0) = 0


@dataclass(frozen=True)
class _Noise:
    noise_var: float  # s²
    dropped: float = 0.0  # a: the value a dropped input takes (α' for alpha dropout)
    gain: float = 1.0  # g: alpha dropout's rescaling of the whole variance
    per_channel: bool = False  # one mask per (example, channel)
    bernoulli: bool = False  # masks are 0 or 1/p: they commute with f when f(0) = 0
    keep: float = 1.0  # p
    closed_form: bool = True  # covered by the covariance estimate


def _noise(module: nn.Module) -> _Noise | None:
    """The regulariser as noise on its input; None where no closed form applies at all."""
    if isinstance(module, nn.AlphaDropout):
        p = theory.keep_ratio(module.p)
        gain = p / (1 + theory.ALPHA_PRIME**2 * (1 - p))
        return _Noise((1 - p) / p, theory.ALPHA_PRIME, gain, keep=p)
    if isinstance(module, (nn.Dropout, nn.Dropout2d)):
        p = theory.keep_ratio(module.p)
        channels = isinstance(module, nn.Dropout2d)
        return _Noise((1 - p) / p, per_channel=channels, bernoulli=True, keep=p)
    if isinstance(module, GaussianDropout):
        return _Noise(theory.gaussian_dropout_noise_var(module.rate))
    if isinstance(module, Uout):
        return _Noise(theory.uout_noise_var(module.beta))
    if isinstance(module, DropBlock2d):  # the paper's form as dropout at the same rate
        p = theory.keep_ratio(module.rate)
        return _Noise((1 - p) / p, bernoulli=True, keep=p, closed_form=False)
    if isinstance(module, StochasticDepth):
        return None
    return None


def _split(path: tuple[nn.Module, ...]) -> tuple[tuple[nn.Module, ...], nn.Module | None]:
    """(modules before the weight layer, the weight layer); no weight: fed to BN directly."""
    if not path:
        return (), None
    if not isinstance(path[-1], WEIGHTS):
        raise ValueError(f"a path to BN ends in {type(path[-1]).__name__}, not a weight layer")
    return path[:-1], path[-1]


def _apply(modules: tuple[nn.Module, ...], z: torch.Tensor) -> torch.Tensor:
    for module in modules:
        z = module(z)
    return z


def paper_estimate(feed: Feed, x: torch.Tensor) -> float | None:
    """The paper's closed form with equal statistics; None where it has none."""
    noise = _noise(feed.module)
    if noise is None or feed.path is None:
        return None
    before, weight = _split(feed.path)
    z = _apply(before, x)
    if weight is None:  # dropout -> BN: one unit per channel
        means = z.transpose(0, 1).reshape(z.shape[1], -1).mean(dim=1, dtype=torch.float64)
        variances = channel_var(z)
        deltas = [
            _paper_unit(noise, float(c), float(v), None, 0.0)
            for c, v in zip(means, variances, strict=True)
        ]
        return channel_mean(variances, torch.tensor(deltas, dtype=torch.float64))
    c = float(z.mean(dtype=torch.float64))
    v = float((z - c).pow(2).mean(dtype=torch.float64))
    rho = _pairwise_correlation(_weight_inputs(weight, z))
    rows = weight.weight.detach().double().flatten(1).cpu()
    deltas = [_paper_unit(noise, c, v, row.tolist(), rho) for row in rows if row.abs().sum() > 0]
    return float(sum(deltas) / len(deltas)) if deltas else 1.0


def _paper_unit(noise: _Noise, c: float, v: float, weight: list[float] | None, rho: float) -> float:
    if v == 0:
        return 1.0
    if noise.dropped != 0.0:  # alpha dropout
        rate = 1.0 - noise.keep
        return theory.alpha_dropout_variance_shift(rate, c, v, weight=weight, rho=rho)
    return theory.noise_variance_shift(noise.noise_var, c, v, weight=weight, rho=rho)


def _weight_inputs(weight: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """What each output unit of `weight` sums over, as float64 rows: (rows, fan-in)."""
    if isinstance(weight, nn.Linear):
        return z.flatten(1).double()
    examples = max(2, math.ceil(MAX_PATCH_ROWS / z[0, 0].numel()))  # enough for the rows below
    patches = F.unfold(
        z[:examples],
        weight.kernel_size,
        dilation=weight.dilation,
        padding=weight.padding,
        stride=weight.stride,
    )  # (N, C*k*k, L)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if len(rows) > MAX_PATCH_ROWS:  # an even subsample, no random draw
        rows = rows[:: math.ceil(len(rows) / MAX_PATCH_ROWS)]
    return rows.double()


def _pairwise_correlation(rows: torch.Tensor) -> float:
    """ρ under equal statistics: the mean covariance off the diagonal over the mean variance."""
    d = rows.shape[1]
    if d < 2 or len(rows) < 2:
        return 0.0
    cov = torch.cov(rows.T)
    mean_var = float(cov.diagonal().mean())
    if mean_var <= 0:
        return 0.0
    off = (float(cov.sum()) - float(cov.diagonal().sum())) / (d * (d - 1))
    return max(-1.0, min(1.0, off / mean_var))


def covariance_estimate(
    feed: Feed, x_test: torch.Tensor, x_trains: list[torch.Tensor]
) -> float | None:
    """The exact Δ from the probe's moments; None where the noise or the path is not covered.

    x_test is what enters the regulariser with every regulariser off; x_trains what enters it in
    each Monte Carlo draw, where regularisers further up are on (their noise changes the shape of
    what reaches this one even through a BN in between). The regulariser's own noise is taken in
    closed form, averaged over those draws."""
    noise = _noise(feed.module)
    if noise is None or not noise.closed_form or feed.path is None:
        return None
    before, weight = _split(feed.path)
    if len(before) > 1 or (before and not _commutes(before[0], noise)):
        return None
    if all(torch.equal(x, x_test) for x in x_trains):  # nothing random further up
        x_trains = [x_test]
    w = None if weight is None else weight.weight.detach()
    test = channel_var(_weigh(weight, _apply(before, x_test), w))
    train = torch.stack([_train_var(noise, before, weight, w, x) for x in x_trains])
    return channel_mean(test, test / train.mean(dim=0))


def _train_var(
    noise: _Noise,
    before: tuple[nn.Module, ...],
    weight: nn.Module | None,
    w: torch.Tensor | None,
    x: torch.Tensor,
) -> torch.Tensor:
    """Per channel of BN's input, g·(Var(w·z) + s²·noise moment) for regulariser input x."""
    # f(m·x/p) = m·f(x/p) = (m/p)·(p·f(x/p)): dropout of p·f(x/p)
    z = noise.keep * _apply(before, x / noise.keep) if before else x
    extra = _noise_moment(weight, z - noise.dropped, w, per_channel=noise.per_channel)
    return noise.gain * (channel_var(_weigh(weight, z, w)) + noise.noise_var * extra)


def _commutes(module: nn.Module, noise: _Noise) -> bool:
    return noise.bernoulli and isinstance(module, ACTIVATIONS_THROUGH_ZERO)


def _weigh(weight: nn.Module | None, z: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """z through the weight layer (weights w); z itself where there is none."""
    if weight is None or w is None:
        return z
    if isinstance(weight, nn.Linear):
        return F.linear(z, w)
    return F.conv2d(z, w, None, weight.stride, weight.padding, weight.dilation)


def _noise_moment(
    weight: nn.Module | None, shifted: torch.Tensor, w: torch.Tensor | None, *, per_channel: bool
) -> torch.Tensor:
    """Per BN channel, E[(Σ over one mask group of w_i·z_i)²] summed over the mask groups, with
    the expectation over the batch and the positions BN pools.

    Element masks: Σ_i w_i² E[z_i²]. Channel masks (spatial dropout): Σ_c E[(w_c · z_c)²], which
    needs each input channel's patch second moments, k² x k² apiece."""
    shifted = shifted.double()
    if weight is None or w is None:  # straight into BN: E[z²] per channel
        return shifted.transpose(0, 1).reshape(shifted.shape[1], -1).pow(2).mean(dim=1)
    w = w.double()
    if isinstance(weight, nn.Linear):
        return shifted.pow(2).mean(dim=0) @ w.pow(2).T
    if not per_channel:  # the batch summed first: one convolution of a single map
        summed = shifted.pow(2).sum(dim=0, keepdim=True)
        out = F.conv2d(summed, w.pow(2), None, weight.stride, weight.padding, weight.dilation)
        return out.sum(dim=(0, 2, 3)) / (len(shifted) * out.shape[2] * out.shape[3])
    out_channels, in_channels = w.shape[:2]
    flat = w.reshape(out_channels, in_channels, -1)  # (K, C, k²)
    total = torch.zeros(out_channels, dtype=torch.float64, device=w.device)
    per_channel_size = len(shifted) * flat.shape[2] * shifted[0, 0].numel()
    step = max(1, UNFOLD_ELEMENTS // per_channel_size)
    positions = 1
    for first in range(0, in_channels, step):
        chunk = shifted[:, first : first + step]
        patches = F.unfold(
            chunk, weight.kernel_size, weight.dilation, weight.padding, weight.stride
        )  # (N, c * k², L)
        patches = patches.reshape(len(chunk), chunk.shape[1], flat.shape[2], -1)
        moments = torch.einsum("ncil,ncjl->cij", patches, patches)  # per channel, summed
        total += torch.einsum(
            "kci,cij,kcj->k", flat[:, first : first + step], moments, flat[:, first : first + step]
        )
        positions = len(chunk) * patches.shape[-1]
    return total / positions

"""The variance shift of every BN layer, predicted before training from the built network and one
probe batch (Li et al., CVPR 2019, https://arxiv.org/abs/1801.05134; conventions in theory.py).

The probe runs a copy of the freshly initialised network in training mode (BN normalising by
batch statistics, as it does while the network trains): once with the regularisers off, and
`draws` times with them on. For each BN layer, `find_feeds` says which regularisers reach it and
through which modules: a regulariser reaches the BN layers up to the next BN on its way. Three
estimates of Δ come out of that:

- paper: the paper's closed forms under its equal-statistics assumption. The regulariser's input
  (regularisers off) has one mean c and variance v (per channel when it feeds BN directly), the
  weight layer's inputs one pairwise correlation ρ (the mean covariance off the diagonal over the
  mean variance; for a convolution, over the patches it sees), and each output unit's d and
  cos²θ come from its actual weights. An activation or pooling between the regulariser and the
  weight is taken to commute with the noise, DropBlock is taken as dropout at its rate, and noise
  from further up is taken to stop at the BN in between (Δ = 1 where nothing else reaches).
  None for stochastic depth and where several regularisers reach one BN.
- covariance: exact for mean-one multiplicative noise that is independent per element or per
  channel (dropout, spatial dropout, Gaussian, Uout) and for alpha dropout, fed to BN directly or
  through one weight layer (and, for Bernoulli masks, through an activation f with f(0) = 0, since
  f(m·x/p) = m·f(x/p)). With inputs z and masks independent of them,
      Var_train = g·(Var(w·z) + s²·E[(Σ over one mask group of w_i(z_i − a))²]),
  where s² is the noise variance, a the dropped value (α' for alpha dropout, else 0) and g alpha
  dropout's rescaling (else 1): the covariances of the inputs survive, only what one mask
  multiplies adds noise. Var_test = Var(w·z) with z from the pass with every regulariser off;
  Var_train averages the form over the z of the draws, in which regularisers further up are on:
  their noise changes the shape of what reaches this one, even through a BN in between.
- monte_carlo: everything else (DropBlock, stochastic depth, a pooling in the way, several
  regularisers reaching one BN, noise carried through a BN and an activation): the variance of
  the BN input in the draws against the pass with the regularisers off. This is the per-layer
  shift at initialisation, measured directly.

`exact` is the covariance estimate where it applies, else the Monte Carlo one; the network
summary (worst layer, product along the path) uses `exact`. Shifts are per channel; a layer
reports the mean over its channels that carry signal. The probe runs where the trial will train
(fitting.predict picks the GPU when there is one): the Monte Carlo draws come from that
device's generator, so a GPU and a CPU give slightly different Monte Carlo estimates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autotune import theory
from autotune.models import ResidualBlock
from autotune.regularizers import (
    CUSTOM_MODULES,
    DropBlock2d,
    GaussianDropout,
    StochasticDepth,
    Uout,
)
from autotune.shift import channel_moments
from autotune.surgery import trace

PROBE_ROWS = 512  # rows of the probe batch: enough for stable moments, cheap at initialisation
PROBE_VALUES = 1 << 15  # values per channel an image probe needs: rows x H x W
MIN_PROBE_ROWS = 64
DRAWS = 8  # Monte Carlo draws of the masks; each is one forward pass of the probe batch
MAX_PATCH_ROWS = 8192  # rows of a convolution's patch matrix used to estimate ρ
UNFOLD_ELEMENTS = 1 << 24  # most elements of one patch matrix at a time (128 MiB in float64)
REGULARIZER_TYPES = (nn.modules.dropout._DropoutNd, *CUSTOM_MODULES)
ACTIVATIONS_THROUGH_ZERO = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh)  # f(0) = 0
_BN = nn.modules.batchnorm._BatchNorm
_WEIGHTS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Feed:
    """One regulariser reaching one BN layer: its output passes through `path` first.

    path () is a regulariser directly before BN; None marks a way the closed forms do not cover
    (through a residual sum)."""

    source: str
    module: nn.Module
    path: tuple[nn.Module, ...] | None


@dataclass(frozen=True)
class LayerPrediction:
    """The predicted Δ of one BN layer. `sources` are the regularisers that reach it."""

    name: str
    sources: tuple[str, ...]
    exact: float
    method: str  # none | covariance | monte_carlo
    paper: float | None


@dataclass(frozen=True)
class NetworkPrediction:
    layers: tuple[LayerPrediction, ...]
    summary: theory.ShiftSummary

    def deltas(self) -> dict[str, float]:
        return {layer.name: layer.exact for layer in self.layers}

    def to_dict(self) -> dict:
        return {
            "layers": {
                layer.name: {k: v for k, v in asdict(layer).items() if k != "name"}
                for layer in self.layers
            },
            "summary": asdict(self.summary),
        }


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


def predict_shift(
    model: nn.Module,
    x: torch.Tensor,
    *,
    draws: int = DRAWS,
    device: torch.device | str = "cpu",
    traced: bool = False,
) -> NetworkPrediction:
    """Per BN layer of `model`, Δ predicted from the probe batch `x`; `model` is left untouched.

    The probe runs on a copy of the model on `device`. Draws from torch's global random generator
    (the Monte Carlo masks): seed it for repeatable numbers. traced=False: `model` is one of
    autotune's templates, whose blocks say where each regulariser goes (find_feeds); True: any
    network, followed by tracing a pass (trace_feeds).
    """
    if draws < 1:
        raise ValueError(f"Monte Carlo needs at least one draw, but got {draws=}.")
    net = copy.deepcopy(model).to(device).train()  # BN on batch statistics, as in training
    x = x.detach().to(device).float()
    feeds = trace_feeds(net, x) if traced else find_feeds(net)
    off = _probe(net, x, regularizers_on=False)
    draws_on = [_probe(net, x, regularizers_on=True) for _ in range(draws)]
    on = _mean_var([draw.variances for draw in draws_on])

    layers = []
    for name, module in net.named_modules():
        if not isinstance(module, _BN):
            continue
        layer_feeds = feeds.get(name, [])
        sources = tuple(feed.source for feed in layer_feeds)
        if name not in off.after_noise:  # no regulariser runs before it: nothing to shift
            layers.append(LayerPrediction(name, sources, 1.0, "none", 1.0))
            continue
        carried = _channel_mean(off.variances[name], off.variances[name] / on[name])
        if not layer_feeds:  # noise from further up reaches it only through a BN and more
            method = "none" if carried == 1.0 else "monte_carlo"
            layers.append(LayerPrediction(name, sources, carried, method, 1.0))
            continue
        paper = covariance = None
        if len(layer_feeds) == 1 and layer_feeds[0].path is not None:
            feed = layer_feeds[0]
            paper = _paper(feed, off.inputs[feed.source])
            trains = [draw.inputs[feed.source] for draw in draws_on]
            covariance = _covariance(feed, off.inputs[feed.source], trains)
        if covariance is not None:
            layers.append(LayerPrediction(name, sources, covariance, "covariance", paper))
        else:
            layers.append(LayerPrediction(name, sources, carried, "monte_carlo", paper))
    deltas = {layer.name: layer.exact for layer in layers}
    return NetworkPrediction(tuple(layers), theory.summarize_shift(deltas))


# -- which regularisers reach which BN layer ----------------------------------------------------


def find_feeds(model: nn.Module) -> dict[str, list[Feed]]:
    """BN layer name -> the regularisers that reach it, for autotune's templates.

    A regulariser reaches the BN layers up to and including the next BN on its way: that BN
    normalises in training whatever variance the noise added, so layers past it see none.
    """
    feeds: dict[str, list[Feed]] = {}
    pending: list[Feed] = []  # regularisers whose output reaches the next block's input
    for name, block in model.named_children():
        if isinstance(block, ResidualBlock):
            pending = _residual_feeds(name, block, pending, feeds)
        elif isinstance(block, nn.Sequential) and "bn" in block._modules:
            pending = _plain_feeds(name, block, pending, feeds)
    return feeds


def trace_feeds(net: nn.Module, x: torch.Tensor) -> dict[str, list[Feed]]:
    """BN layer name -> the regularisers that reach it, for any network (an imported model).

    One pass of `x` in training mode (so every regulariser makes a tensor of its own) is traced
    by tensor identity (autotune.surgery.trace). From each BN's input the trace is followed back
    through modules of one input, collecting the regularisers on the way, and stops at a BN, at a
    module of several inputs, or where a function rather than a module made the tensor: past
    those the closed forms do not follow, and the Monte Carlo estimate takes over."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the probe's draws unchanged
        calls = trace(net.train(), x)
    feeds: dict[str, list[Feed]] = {}
    for at, call in enumerate(calls):
        if not isinstance(call.module, _BN) or call.name in feeds or not call.inputs:
            continue
        found: list[Feed] = []
        path: list[nn.Module] = []
        tensor, before = call.inputs[0], at
        while True:
            made = [j for j in range(before) if calls[j].output == tensor]
            if not made:
                break
            noisy = [j for j in made if isinstance(calls[j].module, REGULARIZER_TYPES)]
            before = (noisy or made)[-1]
            maker = calls[before]
            if isinstance(maker.module, REGULARIZER_TYPES):
                covered = not path or isinstance(path[-1], _WEIGHTS)
                found.append(Feed(maker.name, maker.module, tuple(path) if covered else None))
            elif isinstance(maker.module, _BN) or len(maker.inputs) != 1:
                break
            else:
                path.insert(0, maker.module)
            tensor = maker.inputs[0]
        feeds[call.name] = found
    return feeds


def _through(pending: list[Feed], modules: tuple[nn.Module, ...]) -> list[Feed]:
    return [Feed(f.source, f.module, None if f.path is None else f.path + modules) for f in pending]


def _plain_feeds(
    name: str, block: nn.Sequential, pending: list[Feed], feeds: dict[str, list[Feed]]
) -> list[Feed]:
    names = list(block._modules)
    weight = block[0]
    drop = block._modules.get("drop")
    own = []
    if drop is not None and names.index("drop") < names.index("bn"):
        own = [Feed(f"{name}.drop", drop, ())]
    feeds[f"{name}.bn"] = _through(pending, (weight,)) + own
    if drop is not None and names.index("drop") > names.index("bn"):
        after = tuple(block[i] for i in range(names.index("drop") + 1, len(names)))
        return [Feed(f"{name}.drop", drop, after)]
    return []


def _residual_feeds(
    name: str, block: ResidualBlock, pending: list[Feed], feeds: dict[str, list[Feed]]
) -> list[Feed]:
    branch = block.branch
    names = list(branch._modules)
    drop = branch._modules.get("drop")
    at = names.index("drop") if drop is not None else -1
    own = [Feed(f"{name}.branch.drop", drop, ())] if 0 <= at < names.index("bn1") else []
    feeds[f"{name}.branch.bn1"] = _through(pending, (branch.conv1,)) + own
    if at > names.index("bn1"):
        path = tuple(branch[i] for i in range(at + 1, names.index("bn2")))
        feeds[f"{name}.branch.bn2"] = [Feed(f"{name}.branch.drop", drop, path)]
    if isinstance(block.shortcut, nn.Sequential):
        feeds[f"{name}.shortcut.bn"] = _through(pending, (block.shortcut.conv,))
        carried = []
    else:  # an identity shortcut carries the noise on, mixed into the residual sum
        carried = _through_sum(pending)
    if not isinstance(block.drop, nn.Identity):
        return [Feed(f"{name}.drop", block.drop, ())]
    if not isinstance(block.drop_path, nn.Identity):
        return [Feed(f"{name}.drop_path", block.drop_path, None), *carried]
    return carried


def _through_sum(pending: list[Feed]) -> list[Feed]:
    return [Feed(f.source, f.module, None) for f in pending]


# -- the probe -----------------------------------------------------------------------------------


@dataclass
class _Pass:
    """What one forward pass of the probe saw."""

    inputs: dict[str, torch.Tensor]  # regulariser name -> its input
    variances: dict[str, torch.Tensor]  # BN name -> per-channel variance of its input
    after_noise: set[str]  # BN layers that ran after some regulariser did


def _probe(net: nn.Module, x: torch.Tensor, *, regularizers_on: bool) -> _Pass:
    """One forward pass with the regularisers on or off, BN on batch statistics."""
    seen = _Pass({}, {}, set())
    hooks = []

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.inputs[name] = args[0].detach()

        return hook

    def keep_variance(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.variances[name] = _channel_var(args[0].detach())
            if seen.inputs:
                seen.after_noise.add(name)

        return hook

    for name, module in net.named_modules():
        if isinstance(module, REGULARIZER_TYPES):
            module.train(regularizers_on)
            hooks.append(module.register_forward_pre_hook(keep_input(name)))
        elif isinstance(module, _BN):
            hooks.append(module.register_forward_pre_hook(keep_variance(name)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _channel_var(t: torch.Tensor) -> torch.Tensor:
    """Per-channel variance over the batch (and the map, for (N, C, H, W)), in float64."""
    n, _, m2 = channel_moments(t)
    return m2 / n


def _mean_var(runs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([run[name] for run in runs]).mean(dim=0) for name in runs[0]}


def _channel_mean(signal: torch.Tensor, delta: torch.Tensor) -> float:
    """Mean Δ over the channels that carry signal (a dead channel has no variance to shift)."""
    signal, delta = signal.cpu(), delta.cpu()
    alive = signal > 1e-12 * max(float(signal.max()), 1e-30)
    return float(delta[alive].mean()) if bool(alive.any()) else 1.0


# -- what the regulariser does to its input's moments -------------------------------------------


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
    if not isinstance(path[-1], _WEIGHTS):
        raise ValueError(f"a path to BN ends in {type(path[-1]).__name__}, not a weight layer")
    return path[:-1], path[-1]


def _apply(modules: tuple[nn.Module, ...], z: torch.Tensor) -> torch.Tensor:
    for module in modules:
        z = module(z)
    return z


def _paper(feed: Feed, x: torch.Tensor) -> float | None:
    """The paper's closed form with equal statistics; None where it has none."""
    noise = _noise(feed.module)
    if noise is None or feed.path is None:
        return None
    before, weight = _split(feed.path)
    z = _apply(before, x)
    if weight is None:  # dropout -> BN: one unit per channel
        means = z.transpose(0, 1).reshape(z.shape[1], -1).mean(dim=1, dtype=torch.float64)
        variances = _channel_var(z)
        deltas = [
            _paper_unit(noise, float(c), float(v), None, 0.0)
            for c, v in zip(means, variances, strict=True)
        ]
        return _channel_mean(variances, torch.tensor(deltas, dtype=torch.float64))
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


def _covariance(feed: Feed, x_test: torch.Tensor, x_trains: list[torch.Tensor]) -> float | None:
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
    test = _channel_var(_weigh(weight, _apply(before, x_test), w))
    train = torch.stack([_train_var(noise, before, weight, w, x) for x in x_trains])
    return _channel_mean(test, test / train.mean(dim=0))


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
    return noise.gain * (_channel_var(_weigh(weight, z, w)) + noise.noise_var * extra)


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

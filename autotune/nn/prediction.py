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

`exact` is the covariance estimate where it applies, else the Monte Carlo one: Δ's dropout
factor (shift.factor_shift measures it after training). The network summary (worst layer,
product along the path) uses `exact`: it is what the pruner's gate reads.

Given how the trial trains (`Training`: its steps, and whether it recalibrates BN after), each
layer also gets a predicted lag, Δ's other factor, and `delta` = exact × lag. With
recalibration the running variance becomes the variance with the regularisers off, so the lag
is 1 / exact and Δ is 1. Without it, per channel, the lag of BN's exponential average
(autotune/core/lag.py) over the trial's steps, from the layer's running variance now (1 in a
fresh layer) and the variance of its input with the regularisers on in the probe, held still:
what is left of the starting value, which a low momentum over few steps keeps. The drift of that
variance while the weights move is not known before training and is taken as none. A layer's
lag carries into the next one's input at inference, so each layer's lag is its own times that
of the BN layer before it.

After the first epoch the trial's own weights say more than its initial ones: predict_trained
measures both factors on the probe batch the way shift.factor_shift does after training (every
BN on its running statistics, the regularisers off, then on), and carries each channel's lag
forward over the steps left, from the running variance now and the variance with the
regularisers on now (1 / dropout factor where BN is recalibrated).

Shifts are per channel; a layer reports the mean over its channels that carry signal. The probe
runs where the trial will train (fitting.predict picks the GPU when there is one): the Monte
Carlo draws come from that device's generator, so a GPU and a CPU give slightly different Monte
Carlo estimates.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from autotune.core import theory
from autotune.core.lag import lag
from autotune.nn.estimates import covariance_estimate, paper_estimate
from autotune.nn.feeds import BATCHNORM, find_feeds, trace_feeds
from autotune.nn.probe import channel_mean, mean_variances, run_probe
from autotune.nn.shift import fork_rng_on, measure_shift, model_device, noisy_variances

DRAWS = 8  # Monte Carlo draws of the masks; each is one forward pass of the probe batch


@dataclass(frozen=True)
class Training:
    """What BN's lag depends on besides the network: how many optimiser steps the trial takes,
    and whether it recalibrates BN after training."""

    steps: int
    recalibrate_bn: bool = False


@dataclass(frozen=True)
class LayerPrediction:
    """The predicted Δ of one BN layer: its dropout factor `exact` and its lag. `sources` are
    the regularisers that reach it."""

    name: str
    sources: tuple[str, ...]
    exact: float  # the dropout factor
    method: str  # none | covariance | monte_carlo
    paper: float | None
    lag: float = 1.0  # 1 where the prediction was not told how the trial trains

    @property
    def delta(self) -> float:
        return self.exact * self.lag


@dataclass(frozen=True)
class NetworkPrediction:
    layers: tuple[LayerPrediction, ...]
    summary: theory.ShiftSummary

    def deltas(self) -> dict[str, float]:
        return {layer.name: layer.exact for layer in self.layers}

    @property
    def delta_summary(self) -> theory.ShiftSummary:
        """The summary of each layer's whole predicted Δ, dropout factor × lag."""
        return theory.summarize_shift({layer.name: layer.delta for layer in self.layers})

    def to_dict(self) -> dict:
        """The form a trial stores (its `predicted_shift` attr) and `predict --json` prints:
        per layer the dropout factor `exact`, the `lag` and their product `delta`; `summary`
        of the dropout factors (the gate's), `delta_summary` of the products."""
        return {
            "layers": {
                layer.name: {
                    **{k: v for k, v in asdict(layer).items() if k != "name"},
                    "delta": layer.delta,
                }
                for layer in self.layers
            },
            "summary": asdict(self.summary),
            "delta_summary": asdict(self.delta_summary),
        }


def predict_shift(
    model: nn.Module,
    x: torch.Tensor,
    *,
    draws: int = DRAWS,
    device: torch.device | str = "cpu",
    traced: bool = False,
    training: Training | None = None,
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
    off = run_probe(net, x, regularizers_on=False)
    draws_on = [run_probe(net, x, regularizers_on=True) for _ in range(draws)]
    on = mean_variances([draw.variances for draw in draws_on])

    layers = []
    for name, module in net.named_modules():
        if not isinstance(module, BATCHNORM):
            continue
        layer_feeds = feeds.get(name, [])
        sources = tuple(feed.source for feed in layer_feeds)
        if name not in off.after_noise:  # no regulariser runs before it: nothing to shift
            layers.append(LayerPrediction(name, sources, 1.0, "none", 1.0))
            continue
        carried = channel_mean(off.variances[name], off.variances[name] / on[name])
        if not layer_feeds:  # noise from further up reaches it only through a BN and more
            method = "none" if carried == 1.0 else "monte_carlo"
            layers.append(LayerPrediction(name, sources, carried, method, 1.0))
            continue
        paper = covariance = None
        if len(layer_feeds) == 1 and layer_feeds[0].path is not None:
            feed = layer_feeds[0]
            paper = paper_estimate(feed, off.inputs[feed.source])
            trains = [draw.inputs[feed.source] for draw in draws_on]
            covariance = covariance_estimate(feed, off.inputs[feed.source], trains)
        if covariance is not None:
            layers.append(LayerPrediction(name, sources, covariance, "covariance", paper))
        else:
            layers.append(LayerPrediction(name, sources, carried, "monte_carlo", paper))
    dropouts = {layer.name: layer.exact for layer in layers}
    if training is not None:
        # from the buffers the trial starts with: the probe passes above moved the copy's
        train_on = {name: on[name] for name in off.variances if name in on}
        lags = predicted_lags(model, dropouts, off.variances, train_on, training)
        layers = [replace(layer, lag=lags.get(layer.name, 1.0)) for layer in layers]
    return NetworkPrediction(tuple(layers), theory.summarize_shift(dropouts))


def predicted_lags(
    model: nn.Module,
    dropouts: dict[str, float],
    signal: dict[str, torch.Tensor],
    train_on: dict[str, torch.Tensor],
    training: Training,
) -> dict[str, float]:
    """Each BN layer's lag after `training.steps` more steps (the module's docstring): 1 /
    dropout factor where BN is recalibrated; else its own, BN's average from `model`'s running
    variance now towards `train_on` (the per-channel variance of its input in training, the
    regularisers on), held still, times the lag of the BN layer before it in the pass. At
    inference that layer divides by its own running variance, so what it passes on is off by its
    lag, which the next layer's input carries (exactly through a linear path, and through a ReLU
    of a zero-mean input); a BN without running statistics normalises by the batch at inference
    too, and passes nothing on. `train_on` is in the order of the forward pass, a sequential
    network's path (in a network with residual sums an approximation); `signal` picks the live
    channels."""
    if training.recalibrate_bn:  # every layer recalibrated: none passes a lag on
        return {name: 1.0 / dropout for name, dropout in dropouts.items()}
    modules = dict(model.named_modules())
    carried, lags = 1.0, {}
    for name, variance in train_on.items():
        bn = modules[name]
        if not getattr(bn, "track_running_stats", False):
            lags[name] = carried = 1.0
            continue
        if name not in signal:  # not measured: nothing to say of it
            continue
        own = channel_mean(signal[name], _channel_lags(bn, variance, training.steps))
        lags[name] = carried = own * carried
    return lags


def _channel_lags(bn: nn.Module, variances: torch.Tensor, steps: int) -> torch.Tensor:
    """Each channel's lag after `steps` more steps, from its running variance now and the
    variance of its input now, held still (autotune/core/lag.py)."""
    done = int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0
    lags = [
        lag(bn.momentum, steps, running, variance, done=done)
        for running, variance in zip(
            bn.running_var.double().tolist(), variances.tolist(), strict=True
        )
    ]
    return torch.tensor(lags, dtype=torch.float64)


TRAINED_DRAWS = 2  # passes of the probe with the regularisers on, after the first epoch


def predict_trained(
    model: nn.Module, x: torch.Tensor, training: Training, *, draws: int = TRAINED_DRAWS
) -> NetworkPrediction:
    """Δ's two factors of every tracking BN layer, predicted from `model`'s weights as they are
    (after the first epoch), over the `training.steps` steps left: the dropout factor measured
    on the probe batch `x` as after training, the lag carried forward from the running variances
    now (the module's docstring). `model` is left as it was; its noise comes from torch's random
    state forked and seeded, which the training then finds as it was."""
    probe = [x.detach().to(model_device(model))]
    shifts = measure_shift(model, probe)
    # each draw a pass of its own, its factor taken alone: a layer no regulariser reaches sees
    # the same input in every pass, and its factor is exactly 1
    draws_on = [noisy_variances(model, probe, seed=seed) for seed in range(draws)]
    dropouts = {}
    for name, shift in shifts.items():
        factors = [
            shift.factored(noisy[name]).dropout or 1.0 for noisy in draws_on if name in noisy
        ]
        dropouts[name] = math.fsum(factors) / len(factors) if factors else 1.0
    # what BN averages while it trains: its input in train mode, the regularisers on
    with fork_rng_on(probe[0].device):
        torch.manual_seed(0)
        net = copy.deepcopy(model).train()
        train_on = run_probe(net, probe[0], regularizers_on=True).variances
    signal = {name: torch.tensor(shift.channel_var) for name, shift in shifts.items()}
    lags = predicted_lags(model, dropouts, signal, train_on, training)
    layers = [
        LayerPrediction(name, (), dropouts[name], "trained", None, lags.get(name, 1.0))
        for name in shifts
    ]
    return NetworkPrediction(tuple(layers), theory.summarize_shift(dropouts))

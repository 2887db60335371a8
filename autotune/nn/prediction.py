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
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autotune.core import theory
from autotune.nn.estimates import covariance_estimate, paper_estimate
from autotune.nn.feeds import BATCHNORM, find_feeds, trace_feeds
from autotune.nn.probe import channel_mean, mean_variances, run_probe

DRAWS = 8  # Monte Carlo draws of the masks; each is one forward pass of the probe batch


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
    deltas = {layer.name: layer.exact for layer in layers}
    return NetworkPrediction(tuple(layers), theory.summarize_shift(deltas))

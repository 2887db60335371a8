"""autotune.nn.prediction: Δ per BN layer before training, against the closed forms, against Monte
Carlo through the network, and against what training then measures."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from autotune.core import theory
from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import ModelSpec
from autotune.nn.feeds import find_feeds
from autotune.nn.models import build_model
from autotune.nn.prediction import Training, predict_shift
from autotune.nn.probe import probe_batch
from autotune.nn.regularizers import GaussianDropout, Uout
from autotune.nn.shift import measure_shift


def network(template: str, widths, *blocks: BlockConfig, shape=(1, 8, 8)) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelSpec(template=template, widths=list(widths)), TrialConfig(blocks), shape, 10
    )


def probe(shape=(1, 8, 8), rows: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, *shape, generator=generator)


def layer(prediction, name: str):
    return next(entry for entry in prediction.layers if entry.name == name)


def monte_carlo(model: nn.Module, x: torch.Tensor, draws: int = 64) -> dict[str, float]:
    """Δ per BN layer by brute force: BN input variance with the noise on against it off, BN on
    batch statistics as in training. The reference the covariance estimate must agree with."""
    net = copy.deepcopy(model).train()
    noisy = [
        m
        for m in net.modules()
        if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, GaussianDropout, Uout))
    ]
    variances: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: variances.setdefault(name, []).append(
                        args[0].double().transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
                    )
                )
            )
    torch.manual_seed(2)
    with torch.no_grad():
        for m in noisy:
            m.eval()
        net(x)
        off = {name: v.pop() for name, v in variances.items()}
        for m in noisy:
            m.train()
        for _ in range(draws):
            net(x)
    for hook in hooks:
        hook.remove()
    result = {}
    for name, runs in variances.items():
        on = torch.stack(runs).mean(dim=0)
        alive = off[name] > 1e-12
        result[name] = float((off[name][alive] / on[alive]).mean())
    return result


# --- a dropout straight before BN: the paper's first form ---------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize(("mean", "var"), [(0.0, 1.0), (0.8, 0.5)])
def test_dropout_before_bn_is_the_closed_form(rate, mean, var) -> None:
    # an identity weight, so the dropout sees the inputs themselves
    linear = nn.Linear(16, 16, bias=False)
    nn.init.eye_(linear.weight)
    net = nn.Sequential(
        OrderedDict(
            block0=nn.Sequential(
                OrderedDict(
                    linear=linear, drop=nn.Dropout(rate), bn=nn.BatchNorm1d(16), act=nn.ReLU()
                )
            )
        )
    )
    x = mean + math.sqrt(var) * torch.randn(20_000, 16, generator=torch.Generator().manual_seed(0))
    prediction = predict_shift(net, x)
    entry = layer(prediction, "block0.bn")
    expected = theory.variance_shift(rate, mean, var)
    # the covariance estimate and the paper's form both give the closed form, within 2 %
    assert entry.method == "covariance"
    assert entry.exact == pytest.approx(expected, rel=0.02), f"{rate=} {mean=} {var=}"
    assert entry.paper == pytest.approx(expected, rel=0.02), f"{rate=} {mean=} {var=}"


def test_paper_form_holds_where_its_assumption_does() -> None:
    # block0 normalises d correlated inputs of equal statistics (BN, no activation), then drops
    # them; block1's linear unit sums them: the paper's second form with the true ρ
    d, rho, rate = 32, 0.4, 0.3
    weight = nn.Linear(d, 8, bias=False)
    torch.manual_seed(3)
    nn.init.normal_(weight.weight, mean=0.3, std=1.0)  # cos θ far from 0, so ρ matters
    identity = nn.Linear(d, d, bias=False)
    nn.init.eye_(identity.weight)
    net = nn.Sequential(
        OrderedDict(
            block0=nn.Sequential(
                OrderedDict(
                    linear=identity, bn=nn.BatchNorm1d(d), act=nn.Identity(), drop=nn.Dropout(rate)
                )
            ),
            block1=nn.Sequential(OrderedDict(linear=weight, bn=nn.BatchNorm1d(8), act=nn.ReLU())),
        )
    )
    generator = torch.Generator().manual_seed(4)
    shared = torch.randn(20_000, 1, generator=generator)
    x = math.sqrt(rho) * shared + math.sqrt(1 - rho) * torch.randn(20_000, d, generator=generator)
    entry = layer(predict_shift(net, x), "block1.bn")
    closed = [
        theory.variance_shift(rate, 0.0, 1.0, weight=row.tolist(), rho=rho)
        for row in weight.weight.detach().double()
    ]
    expected = sum(closed) / len(closed)
    # the paper's form (ρ estimated from the probe) and the exact estimate agree with the closed
    # form of the true ρ within 2 %
    assert entry.paper == pytest.approx(expected, rel=0.02)
    assert entry.exact == pytest.approx(expected, rel=0.02)


# --- the covariance estimate against brute force ------------------------------------------------


@pytest.mark.parametrize(
    ("template", "block"),
    [
        ("mlp", BlockConfig("after_act", 0.4, "dropout")),
        ("mlp", BlockConfig("after_bn", 0.4, "dropout")),  # through ReLU: f(m·x/p) = m·f(x/p)
        ("mlp", BlockConfig("after_act", 0.3, "gaussian")),
        ("mlp", BlockConfig("after_act", 0.5, "uout")),
        ("mlp", BlockConfig("after_act", 0.3, "alpha_dropout")),
        ("mlp", BlockConfig("before_bn", 0.3, "alpha_dropout")),
        ("cnn", BlockConfig("after_act", 0.4, "dropout")),
        ("cnn", BlockConfig("after_act", 0.4, "spatial_dropout")),
        ("cnn", BlockConfig("before_bn", 0.4, "spatial_dropout")),
        ("resnet", BlockConfig("in_branch", 0.4, "spatial_dropout")),
        ("resnet", BlockConfig("after_bn", 0.4, "dropout")),
        ("resnet", BlockConfig("after_act", 0.4, "dropout")),
    ],
)
def test_covariance_estimate_matches_monte_carlo(template: str, block: BlockConfig) -> None:
    shape = (64,) if template == "mlp" else (1, 8, 8)
    net = network(template, [16, 16], block, block, shape=shape)
    x = probe(shape)
    prediction = predict_shift(net, x)
    reference = monte_carlo(net, x)
    covered = [entry for entry in prediction.layers if entry.method == "covariance"]
    # the configuration reaches some BN layer through a covered path
    assert covered, [(entry.name, entry.method) for entry in prediction.layers]
    for entry in covered:
        # exact up to the Monte Carlo reference's own noise
        assert entry.exact == pytest.approx(reference[entry.name], rel=0.03), entry.name


# --- which BN layers a regulariser reaches -----------------------------------------------------


def test_each_placement_reaches_the_bn_layers_it_should() -> None:
    net = network(
        "mlp",
        [8, 8, 8, 8],
        BlockConfig("before_bn", 0.2, "dropout"),  # its own BN
        BlockConfig("after_bn", 0.2, "dropout"),  # block2's BN, through act and weight
        BlockConfig("none"),
        BlockConfig("after_act", 0.2, "dropout"),  # the classifier: no BN
        shape=(12,),
    )
    feeds = {name: [f.source for f in found] for name, found in find_feeds(net).items()}
    # before_bn reaches its own BN; after_bn the next block's; the last block's after_act none
    assert feeds == {
        "block0.bn": ["block0.drop"],
        "block1.bn": [],
        "block2.bn": ["block1.drop"],
        "block3.bn": [],
    }
    prediction = predict_shift(net, probe((12,)))
    # block1's BN sees block0's noise only through block0's BN and ReLU: a Monte Carlo carry,
    # far smaller than the shift block0's BN has, and none in the paper's form
    carried, direct = layer(prediction, "block1.bn"), layer(prediction, "block0.bn")
    assert carried.method == "monte_carlo" and carried.paper == 1.0
    assert direct.exact < carried.exact < 1.0
    # a BN that runs before any regulariser is not shifted at all
    first = predict_shift(
        network(
            "mlp",
            [8, 8],
            BlockConfig("none"),
            BlockConfig("after_act", 0.3, "dropout"),
            shape=(12,),
        ),
        probe((12,)),
    )
    assert layer(first, "block0.bn").exact == 1.0 and layer(first, "block0.bn").method == "none"


def test_stochastic_depth_reaches_the_next_block_by_monte_carlo() -> None:
    net = network(
        "resnet",
        [8, 8, 16],
        BlockConfig("none"),
        BlockConfig("residual", 0.5, "stochastic_depth"),
        BlockConfig("none"),
    )
    prediction = predict_shift(net, probe())
    for name in ("block2.branch.bn1", "block2.shortcut.bn"):
        entry = layer(prediction, name)
        # the dropped branch inflates what the next block sees; the paper has no form for it
        assert entry.sources == ("block1.drop_path",)
        assert entry.method == "monte_carlo" and entry.paper is None
        assert 0.3 < entry.exact < 0.95, entry
    # the block's own BN layers are upstream of the drop: untouched
    assert layer(prediction, "block1.branch.bn2").exact == 1.0


def test_an_identity_shortcut_carries_noise_past_its_block() -> None:
    # block0's after_act dropout reaches block1's bn1 directly, and block2's bn1 through block1's
    # identity shortcut
    net = network(
        "resnet",
        [8, 8, 8],
        BlockConfig("after_act", 0.5, "dropout"),
        BlockConfig("none"),
        BlockConfig("none"),
    )
    net = build_model(
        ModelSpec(template="resnet", widths=[8, 8, 8], pool=False),
        TrialConfig(
            (BlockConfig("after_act", 0.5, "dropout"), BlockConfig("none"), BlockConfig("none"))
        ),
        (1, 8, 8),
        10,
    )
    prediction = predict_shift(net, probe())
    # the carried noise is a path the closed forms do not cover
    assert layer(prediction, "block1.branch.bn1").method == "covariance"
    carried = layer(prediction, "block2.branch.bn1")
    assert carried.sources == ("block0.drop",) and carried.method == "monte_carlo"
    assert carried.exact < 0.98


def test_monte_carlo_covers_dropblock() -> None:
    net = network("cnn", [16, 16], BlockConfig("after_act", 0.3, "dropblock"), BlockConfig("none"))
    entry = layer(predict_shift(net, probe()), "block1.bn")
    # no covariance form for correlated square masks: measured on the probe instead, with the
    # paper's form taking it as dropout at the same rate
    assert entry.method == "monte_carlo" and entry.paper is not None
    assert 0.3 < entry.exact < 1.0


# --- contracts ------------------------------------------------------------------------------------


def test_the_model_is_left_as_it_was() -> None:
    net = network(
        "cnn",
        [8, 8],
        BlockConfig("before_bn", 0.3, "dropout"),
        BlockConfig("after_act", 0.3, "dropout"),
    ).eval()
    before = copy.deepcopy(net.state_dict())
    predict_shift(net, probe())
    # parameters, running statistics and modes untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())
    # no hook left behind
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


def test_summary_is_the_worst_layer_and_the_product() -> None:
    net = network(
        "mlp",
        [16, 16],
        BlockConfig("before_bn", 0.5, "dropout"),
        BlockConfig("before_bn", 0.1, "dropout"),
        shape=(64,),
    )
    prediction = predict_shift(net, probe((64,)))
    deltas = prediction.deltas()
    # the heavier dropout is the worst layer, and the product multiplies all layers
    assert prediction.summary.worst_layer == "block0.bn"
    assert prediction.summary.worst_delta == deltas["block0.bn"]
    assert prediction.summary.product == pytest.approx(deltas["block0.bn"] * deltas["block1.bn"])
    # as JSON-ready dicts, for Optuna's user attrs
    assert prediction.to_dict()["summary"]["worst_layer"] == "block0.bn"


def test_no_regulariser_no_shift() -> None:
    prediction = predict_shift(
        network("cnn", [8, 8], BlockConfig("none"), BlockConfig("none")), probe()
    )
    # every layer at 1, and no worst layer
    assert all(entry.exact == 1.0 for entry in prediction.layers)
    assert prediction.summary.worst_layer is None and prediction.summary.product == 1.0


def test_probe_batch_takes_the_first_rows() -> None:
    batches = [(torch.full((100, 3), float(i)), torch.zeros(100)) for i in range(10)]
    x = probe_batch(batches, rows=250)
    # 250 rows from the first three batches, in order
    assert x.shape == (250, 3) and x[0, 0] == 0 and x[-1, 0] == 2
    # images need fewer rows: each gives H·W values per channel (32x32: the floor of 64 rows)
    images = [torch.randn(100, 3, 32, 32) for _ in range(3)]
    assert len(probe_batch(images)) == 64
    # 8x8 digits: 2**15 / 64 = 512 rows, the cap; a table's rows are the cap too
    assert len(probe_batch([torch.randn(600, 1, 8, 8)])) == 512
    assert len(probe_batch([torch.randn(600, 13)])) == 512
    # nothing to probe is an error
    with pytest.raises(ValueError, match="at least one batch"):
        probe_batch([])


def test_prediction_is_repeatable_with_a_seed() -> None:
    net = network("cnn", [8, 8], BlockConfig("after_act", 0.3, "dropblock"), BlockConfig("none"))
    torch.manual_seed(5)
    first = predict_shift(net, probe()).deltas()
    torch.manual_seed(5)
    # the Monte Carlo draws come from torch's seeded generator
    assert predict_shift(net, probe()).deltas() == first


# --- the prediction against what training measures ---------------------------------------------


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_measured_shift_of_a_dropout_before_bn_matches_the_prediction(rate: float) -> None:
    # BN learns its running statistics with dropout on (train-mode passes, weights fixed); the
    # paper's measurement then finds the Δ the prediction gave before
    net = network(
        "mlp", [32], BlockConfig("before_bn", rate, "dropout", bn_momentum=0.05), shape=(20,)
    )
    generator = torch.Generator().manual_seed(6)
    data = [0.5 + torch.randn(256, 20, generator=generator) for _ in range(200)]
    predicted = layer(predict_shift(net, data[0]), "block0.bn").exact
    net.train()
    with torch.no_grad():
        for x in data:
            net(x)
    measured = measure_shift(net, data[-20:])["block0.bn"].delta
    # within 5 %
    assert measured == pytest.approx(predicted, rel=0.05), f"{predicted=} {measured=}"


def _three_bns(momentum: float, middle_tracks: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16, momentum=momentum),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16, momentum=0.01, track_running_stats=middle_tracks),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8, momentum=0.01),
    )


@pytest.mark.parametrize("middle_tracks", [True, False])
def test_a_lag_is_carried_down_the_pass_until_a_bn_without_running_statistics(middle_tracks):
    x = torch.randn(256, 8)
    lags = []
    for momentum in (0.01, 0.5):  # the first layer forgets its starting variance, or not
        torch.manual_seed(0)
        net = _three_bns(momentum, middle_tracks)
        prediction = predict_shift(net, x, training=Training(steps=5))
        lags.append({layer.name: layer.lag for layer in prediction.layers})
    # the first layer's lag reaches the last one's input through a layer that divides by its
    # running variance, and not through one that normalises by the batch at inference too
    assert lags[0]["1"] != pytest.approx(lags[1]["1"])
    if middle_tracks:
        assert lags[0]["7"] != pytest.approx(lags[1]["7"])
    else:
        assert lags[0]["4"] == lags[1]["4"] == 1.0
        assert lags[0]["7"] == pytest.approx(lags[1]["7"], rel=1e-12)

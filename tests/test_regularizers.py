"""autotune.nn.regularizers: each module's moments against its closed form, structure, eval and
export."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autotune.core import theory
from autotune.nn.regularizers import (
    CUSTOM_MODULES,
    FACTORIES,
    DropBlock2d,
    GaussianDropout,
    StochasticDepth,
    Uout,
    make_regularizer,
)

ALL = tuple(FACTORIES)
# inputs x ~ N(MEAN, VAR); about a million elements keeps sampling noise near 0.3 %
MEAN, VAR = 0.5, 1.0
SHAPE = (4096, 64, 2, 2)
MEAN_TOL = 0.01  # absolute; the standard error of the mean is about 0.002
VAR_TOL = 0.02  # relative; the standard error of the variance is about 0.4 %


def normal(shape: tuple[int, ...], mean: float, var: float, seed: int = 0) -> torch.Tensor:
    """A seeded tensor of N(mean, var) draws."""
    generator = torch.Generator().manual_seed(seed)
    return mean + var**0.5 * torch.randn(shape, generator=generator)


def positive(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A seeded tensor in [0.5, 1.5): nothing is zero unless a regulariser zeroed it."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5


def train_output(name: str, rate: float, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """`name` at `rate` applied to x in train mode, seeded."""
    torch.manual_seed(seed)
    return make_regularizer(name, rate).train()(x)


def dropped_share_expected(rate: float, block_size: int, h: int, w: int) -> float:
    """DropBlock's expected dropped share, overlaps included: the mean over pixels of
    1 - (1 - gamma)^k, where k counts the block places (seeds) whose square covers the pixel."""
    gamma = rate / block_size**2 * (h * w) / ((h - block_size + 1) * (w - block_size + 1))

    def places(n: int) -> torch.Tensor:  # per row (or column): top-left corners covering it
        i = torch.arange(n)
        return (
            torch.minimum(i, torch.tensor(n - block_size)) - (i - block_size + 1).clamp(min=0) + 1
        )

    covers = places(h)[:, None] * places(w)[None, :]
    return (1 - (1 - gamma) ** covers.double()).mean().item()


# --- moments against the closed forms -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rate", "noise_var"),
    [
        ("dropout", 0.3, 0.3 / 0.7),  # Bernoulli keep/p: variance q/p
        ("spatial_dropout", 0.3, 0.3 / 0.7),  # the same, one coin a channel
        ("gaussian", 0.3, 0.3 / 0.7),  # sigma² = rate / (1 - rate) by construction
        ("uout", 0.3, 0.3**2 / 3),  # U(-beta, beta): beta² / 3
        ("uout", 0.6, 0.6**2 / 3),
    ],
)
def test_train_moments_match_the_closed_form(name: str, rate: float, noise_var: float) -> None:
    x = normal(SHAPE, MEAN, VAR)
    y = train_output(name, rate, x)
    # mean-one multiplicative noise keeps the mean c
    assert abs(y.mean().item() - MEAN) < MEAN_TOL, f"{name}: mean {y.mean().item():.4f}"
    # and inflates the variance to (c² + v)(1 + s²) - c²; for dropout (c² + v)/(1 - rate) - c²
    expected = (MEAN**2 + VAR) * (1 + noise_var) - MEAN**2
    actual = y.var().item()
    assert abs(actual / expected - 1) < VAR_TOL, (
        f"{name}: variance {actual:.4f}, not {expected:.4f}"
    )


@pytest.mark.parametrize("name", ["dropout", "gaussian", "uout"])
def test_theory_predicts_the_measured_shift(name: str) -> None:
    rate = 0.4
    predicted = {
        "dropout": theory.variance_shift(rate, MEAN, VAR),
        "gaussian": theory.noise_variance_shift(theory.gaussian_dropout_noise_var(rate), MEAN, VAR),
        "uout": theory.noise_variance_shift(theory.uout_noise_var(rate), MEAN, VAR),
    }[name]
    x = normal(SHAPE, MEAN, VAR)
    measured = x.var().item() / train_output(name, rate, x).var().item()
    # Δ = Var_test / Var_train as the pruner predicts it for this very module
    assert abs(measured / predicted - 1) < VAR_TOL, f"{name}: Δ {measured:.4f}, not {predicted:.4f}"


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_alpha_dropout_keeps_standard_normal_inputs_standard(rate: float) -> None:
    y = train_output("alpha_dropout", rate, normal(SHAPE, 0.0, 1.0))
    # mean 0 within MEAN_TOL
    assert abs(y.mean().item()) < MEAN_TOL, f"mean {y.mean().item():.4f}"
    # variance 1 within VAR_TOL
    assert abs(y.var().item() - 1) < VAR_TOL, f"variance {y.var().item():.4f}"


# --- spatial_dropout and dropblock: structure -----------------------------------------------------


def test_spatial_dropout_drops_whole_channels() -> None:
    x = positive((64, 16, 5, 5))
    y = train_output("spatial_dropout", 0.4, x)
    maps = (y / x * 0.6).flatten(2)  # 1 where kept (scaled by 1/0.6), 0 where dropped
    zeroed = (maps == 0).all(dim=2)
    # each (example, channel) map is all dropped or all kept at the same scale
    assert torch.allclose(maps[~zeroed], torch.ones_like(maps[~zeroed])), "a channel was split"
    # about 40 % of the 1024 channels go (a binomial standard deviation is 0.015)
    assert abs(zeroed.float().mean().item() - 0.4) < 0.06, f"dropped {zeroed.float().mean():.3f}"


@pytest.mark.parametrize("block_size", [2, 3, 5])
def test_dropblock_drops_whole_squares_inside_the_map(block_size: int) -> None:
    x = positive((4, 8, 20, 20))
    torch.manual_seed(2)
    y = DropBlock2d(0.2, block_size).train()(x)
    dropped = (y == 0).float()
    # the squares lying wholly in the dropped region: (..., 20 - bs + 1, 20 - bs + 1)
    squares = F.avg_pool2d(dropped, block_size, stride=1) == 1
    # grown back to pixels, those squares cover the dropped region exactly: nothing is dropped
    # outside a whole square, and no square hangs over the map's edge
    covered = F.max_pool2d(F.pad(squares.float(), (block_size - 1,) * 4), block_size, stride=1)
    assert torch.equal(covered, dropped), "a dropped pixel lies outside any whole dropped square"
    # every kept pixel is scaled by the same factor, numel / kept
    scale = y[y != 0] / x[y != 0]
    assert torch.allclose(scale, torch.full_like(scale, 1 / (1 - dropped.mean().item())))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropblock_drops_its_share_and_keeps_the_mean(rate: float) -> None:
    x = normal((16, 16, 64, 64), 1.0, 1.0)
    torch.manual_seed(3)
    y = DropBlock2d(rate, block_size=3).train()(x)
    share = (y == 0).float().mean().item()
    expected = dropped_share_expected(rate, 3, 64, 64)
    # the dropped share matches the closed form (overlapping squares included) within 0.005
    assert abs(share - expected) < 0.005, f"dropped {share:.4f}, expected {expected:.4f}"
    # which is about `rate`: overlaps only make it a little smaller (at most 15 % at 0.3)
    assert 0.85 * rate < share <= rate, f"dropped {share:.4f} at rate {rate}"
    # the rescaling keeps the mean
    assert abs(y.mean().item() - 1.0) < MEAN_TOL, f"mean {y.mean().item():.4f}"


@pytest.mark.parametrize(
    "shape", [(2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 1, 5), (2, 3, 4, 4), (3, 5, 5)]
)
def test_dropblock_works_on_maps_smaller_than_a_block(shape: tuple[int, ...]) -> None:
    x = positive(shape)
    torch.manual_seed(4)
    y = DropBlock2d(0.3, block_size=4).train()(x)
    # same shape out
    assert y.shape == x.shape
    # each element is dropped or scaled by one common, finite factor
    scale = (y / x)[y != 0]
    assert torch.isfinite(scale).all() and torch.allclose(scale, scale[:1].expand_as(scale))


def test_dropblock_that_drops_everything_returns_zeros() -> None:
    block = DropBlock2d(0.9).train()
    outputs = []
    for seed in range(20):
        torch.manual_seed(seed)
        outputs.append(block(torch.ones(1, 1, 1, 1)))
    dropped = [y for y in outputs if y.item() == 0]
    # some of the 20 one-pixel maps were dropped whole (at 0.9, all but about 2)
    assert len(dropped) > 10, f"only {len(dropped)} of 20 dropped"
    # none of them divided by zero
    assert all(torch.isfinite(y).all() for y in outputs)


# --- stochastic_depth -----------------------------------------------------------------------------


def test_stochastic_depth_drops_whole_samples() -> None:
    rate = 0.3
    x = positive((100_000, 3, 2, 2))
    y = train_output("stochastic_depth", rate, x)
    per_sample = (y * (1 - rate) / x).flatten(1)  # 1 where kept, 0 where dropped
    zeroed = (per_sample == 0).all(dim=1)
    # each sample is all zero or x / (1 - rate)
    kept = per_sample[~zeroed]
    assert torch.allclose(kept, torch.ones_like(kept)), "a sample was partly dropped"
    # about `rate` of the samples are dropped (binomial standard deviation 0.0015)
    assert abs(zeroed.float().mean().item() - rate) < 0.01, f"dropped {zeroed.float().mean():.4f}"
    # so the mean is kept
    assert abs(y.mean().item() / x.mean().item() - 1) < MEAN_TOL, f"mean {y.mean().item():.4f}"


# --- every regulariser ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_eval_mode_is_the_identity(name: str) -> None:
    x = normal((4, 3, 5, 5), MEAN, VAR)
    module = make_regularizer(name, 0.5).eval()
    # the input comes back exactly
    assert torch.equal(module(x), x), f"{name} changed its input in eval mode"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("dropout", "p=0.25"),
        ("spatial_dropout", "p=0.25"),
        ("gaussian", "rate=0.25"),
        ("uout", "beta=0.25"),  # the search's rate is uout's beta
        ("alpha_dropout", "p=0.25"),
        ("dropblock", "rate=0.25, block_size=3"),
        ("stochastic_depth", "rate=0.25"),
    ],
)
def test_repr_shows_the_parameter(name: str, shown: str) -> None:
    # the printed model names the rate
    assert shown in repr(make_regularizer(name, 0.25)), repr(make_regularizer(name, 0.25))


@pytest.mark.parametrize("name", ALL)
def test_rate_zero_is_identity(name: str) -> None:
    # nothing to drop, nothing to build
    assert type(make_regularizer(name, 0.0)) is nn.Identity


def test_unknown_regularizer_is_refused() -> None:
    # the name and every known name, in order
    with pytest.raises(
        ValueError,
        match=r"^Unknown regularizer 'drpout'; expected one of: dropout, spatial_dropout, "
        r"gaussian, uout, alpha_dropout, dropblock, stochastic_depth$",
    ):
        make_regularizer("drpout", 0.1)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("name", ALL)
def test_rates_outside_zero_one_are_refused(name: str, rate: float) -> None:
    # a drop probability (uout: a half-width) lies in [0, 1)
    with pytest.raises(ValueError, match=r"^A drop rate must lie in \[0, 1\)"):
        make_regularizer(name, rate)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GaussianDropout(1.0), r"^A drop rate must lie in \[0, 1\), but got rate=1.0"),
        (lambda: Uout(-0.1), r"^The noise half-width must not be negative, but got beta=-0.1"),
        (lambda: DropBlock2d(-0.2), r"^A drop rate must lie in \[0, 1\), but got rate=-0.2"),
        (lambda: DropBlock2d(0.1, 0), r"^A block size must be at least 1, but got block_size=0"),
        (lambda: StochasticDepth(1.0), r"^A drop rate must lie in \[0, 1\), but got rate=1.0"),
    ],
)
def test_modules_refuse_bad_arguments(build, message: str) -> None:
    # used on their own (or in an exported snippet) they check their arguments too
    with pytest.raises(ValueError, match=message):
        build()


# --- export: each custom class stands alone -------------------------------------------------------

CUSTOM_ARGS = {
    GaussianDropout: {"rate": 0.3},
    Uout: {"beta": 0.3},
    DropBlock2d: {"rate": 0.3, "block_size": 2},
    StochasticDepth: {"rate": 0.3},
}


def test_custom_modules_lists_our_own_classes() -> None:
    # exactly the classes defined here; the rest are torch's own
    assert set(CUSTOM_MODULES) == set(CUSTOM_ARGS)


@pytest.mark.parametrize("cls", CUSTOM_MODULES, ids=lambda cls: cls.__name__)
def test_custom_source_runs_with_only_torch_nn_and_f(cls: type[nn.Module]) -> None:
    namespace = {"torch": torch, "nn": nn, "F": F}
    exec(inspect.getsource(cls), namespace)  # what the exporter's snippet does
    kwargs = CUSTOM_ARGS[cls]
    pasted, original = namespace[cls.__name__](**kwargs), cls(**kwargs)
    # constructor arguments are attributes of the same names, so a call can be written back
    assert {name: getattr(pasted, name) for name in inspect.signature(cls).parameters} == kwargs
    x = normal((4, 3, 6, 6), MEAN, VAR)
    torch.manual_seed(5)
    expected = original.train()(x)
    torch.manual_seed(5)
    # the pasted class draws the same noise and gives the same output
    assert torch.equal(pasted.train()(x), expected), f"pasted {cls.__name__} differs"
    # and is the identity in eval mode
    assert torch.equal(pasted.eval()(x), x)

"""The closed forms against Monte Carlo simulation, and the conventions they fix."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.core.theory import (
    ALPHA_PRIME,
    alpha_dropout_variance_shift,
    correlation_gain,
    cos2_theta,
    gaussian_dropout_noise_var,
    keep_ratio,
    noise_variance_shift,
    summarize_shift,
    uout_noise_var,
    variance_shift,
)

SAMPLES = 400_000


def correlated_inputs(rng, n: int, d: int, mean: float, var: float, rho: float) -> np.ndarray:
    """n rows of d inputs with the given mean, variance and pairwise correlation (one factor)."""
    shared = rng.standard_normal((n, 1))
    own = rng.standard_normal((n, d))
    return mean + np.sqrt(var) * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * own)


def dropout(rng, x: np.ndarray, rate: float) -> np.ndarray:
    """Inverted Bernoulli dropout, as nn.Dropout does it in train mode."""
    return x * (rng.random(x.shape) >= rate) / (1 - rate)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize(("mean", "var"), [(0.0, 1.0), (0.5, 1.0), (1.0, 0.25)])
def test_dropout_before_bn_matches_monte_carlo(rate, mean, var):
    rng = np.random.default_rng(0)
    x = mean + np.sqrt(var) * rng.standard_normal(SAMPLES)
    simulated = x.var() / dropout(rng, x, rate).var()

    # the closed form within 2 % of the simulated Var_test / Var_train
    predicted = variance_shift(rate, mean, var)
    assert predicted == pytest.approx(simulated, rel=0.02), f"{rate=} {mean=} {var=}"


@pytest.mark.parametrize("rate", [0.2, 0.5])
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("d", [4, 32])
def test_dropout_through_a_linear_unit_matches_monte_carlo(rate, rho, d):
    rng = np.random.default_rng(1)
    weight = rng.normal(0.2, 1.0, d)  # a non-zero mean, so cos θ matters
    x = correlated_inputs(rng, SAMPLES // 4, d, mean=0.4, var=1.0, rho=rho)
    simulated = (x @ weight).var() / (dropout(rng, x, rate) @ weight).var()

    # form 2 within 2 % of the simulated shift of the unit's output
    predicted = variance_shift(rate, 0.4, 1.0, weight=weight, rho=rho)
    assert predicted == pytest.approx(simulated, rel=0.02), f"{rate=} {rho=} {d=}"


@pytest.mark.parametrize("mean", [0.0, 0.7])
def test_gaussian_dropout_matches_monte_carlo(mean):
    rng, rate = np.random.default_rng(2), 0.4
    x = mean + rng.standard_normal(SAMPLES)
    noise = 1 + np.sqrt(rate / (1 - rate)) * rng.standard_normal(SAMPLES)
    simulated = x.var() / (x * noise).var()

    # form 3 with s² = q/p
    predicted = noise_variance_shift(gaussian_dropout_noise_var(rate), mean, 1.0)
    assert predicted == pytest.approx(simulated, rel=0.02)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_uout_matches_monte_carlo_and_the_papers_3_over_3_plus_beta2(beta):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SAMPLES)
    simulated = x.var() / (x * (1 + rng.uniform(-beta, beta, SAMPLES))).var()

    # form 3 with s² = β²/3 matches the simulation, and with c = 0 it is 3 / (3 + β²)
    predicted = noise_variance_shift(uout_noise_var(beta), 0.0, 1.0)
    assert predicted == pytest.approx(simulated, rel=0.02)
    assert predicted == pytest.approx(3 / (3 + beta**2), rel=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_noise_through_a_linear_unit_matches_monte_carlo(rho):
    rng, d, beta = np.random.default_rng(4), 16, 0.8
    weight = rng.normal(0.3, 1.0, d)
    x = correlated_inputs(rng, SAMPLES // 4, d, mean=0.5, var=2.0, rho=rho)
    noise = 1 + rng.uniform(-beta, beta, x.shape)
    simulated = (x @ weight).var() / ((x * noise) @ weight).var()

    # form 3 carried through a unit the way form 2 is: only the diagonal inflates
    predicted = noise_variance_shift(uout_noise_var(beta), 0.5, 2.0, weight=weight, rho=rho)
    assert predicted == pytest.approx(simulated, rel=0.02), f"{rho=}"


def alpha_dropout(rng, x: np.ndarray, rate: float) -> np.ndarray:
    """Alpha dropout as torch computes it: dropped inputs set to α', then an affine rescale."""
    keep = rng.random(x.shape) >= rate
    a = 1 / np.sqrt((ALPHA_PRIME**2 * rate + 1) * (1 - rate))
    b = -a * ALPHA_PRIME * rate
    return a * np.where(keep, x, ALPHA_PRIME) + b


def test_alpha_dropout_simulation_is_torchs():
    import torch

    x = torch.randn(200_000, dtype=torch.float64) * 1.5 + 0.4
    torch.manual_seed(0)
    ours = alpha_dropout(np.random.default_rng(0), x.numpy(), 0.3)
    theirs = torch.nn.functional.alpha_dropout(x, 0.3, training=True).numpy()
    # the same moments as torch's own alpha dropout (the masks differ, the law does not)
    assert ours.mean() == pytest.approx(theirs.mean(), abs=0.01)
    assert ours.var() == pytest.approx(theirs.var(), rel=0.01)


@pytest.mark.parametrize("rate", [0.1, 0.4])
@pytest.mark.parametrize(("mean", "var"), [(0.0, 1.0), (0.6, 0.5)])
def test_alpha_dropout_matches_monte_carlo(rate, mean, var):
    rng = np.random.default_rng(5)
    x = mean + np.sqrt(var) * rng.standard_normal(SAMPLES)
    simulated = x.var() / alpha_dropout(rng, x, rate).var()

    # form 4 directly before BN
    assert alpha_dropout_variance_shift(rate, mean, var) == pytest.approx(simulated, rel=0.02)

    d = 12
    weight = rng.normal(0.2, 1.0, d)
    xs = correlated_inputs(rng, SAMPLES // 4, d, mean=mean, var=var, rho=0.3)
    through = (xs @ weight).var() / (alpha_dropout(rng, xs, rate) @ weight).var()
    # and through a linear unit
    predicted = alpha_dropout_variance_shift(rate, mean, var, weight=weight, rho=0.3)
    assert predicted == pytest.approx(through, rel=0.02)


def test_alpha_dropout_keeps_a_standard_normal_input():
    # SELU's fixed point: mean 0, variance 1 fed straight to BN is not shifted
    assert alpha_dropout_variance_shift(0.3, 0.0, 1.0) == pytest.approx(1.0)


def test_summary_is_the_worst_layer_and_the_product():
    deltas = {"a": 0.9, "b": 0.5, "c": 1.5}
    summary = summarize_shift(deltas)
    # |log 0.5| > |log 1.5| > |log 0.9|: b is the worst; the product multiplies all three
    assert (summary.worst_layer, summary.worst_delta) == ("b", 0.5)
    assert summary.product == pytest.approx(0.9 * 0.5 * 1.5)
    # nothing shifted, or nothing to shift: no worst layer
    assert summarize_shift({"a": 1.0}).worst_layer is None
    assert summarize_shift({}) == summarize_shift({"a": 1.0, "b": 1.0})
    # a zero or infinite Δ is a bug upstream, said plainly
    with pytest.raises(ValueError, match="positive and finite"):
        summarize_shift({"a": 0.0})


def test_rate_is_the_drop_probability():
    # rate 0.3 keeps 70 %: p = 0.7; with c = 0 the shift is p itself
    assert keep_ratio(0.3) == pytest.approx(0.7)
    assert variance_shift(0.3, 0.0, 1.0) == pytest.approx(0.7)


def test_no_dropout_means_no_shift():
    # rate 0: Δ = 1, directly and through a linear unit
    assert variance_shift(0.0, 0.3, 2.0) == pytest.approx(1.0)
    assert variance_shift(0.0, 0.3, 2.0, weight=[1.0, -2.0, 0.5], rho=0.4) == pytest.approx(1.0)


def test_shift_grows_with_rate_and_shrinks_with_correlation_through_weights():
    weight = [1.0] * 16
    # more dropout, more shift (Δ further below 1)
    assert variance_shift(0.5, 0.0, 1.0) < variance_shift(0.1, 0.0, 1.0) < 1.0
    # correlated inputs summed by the unit dilute the diagonal inflation (Δ nearer 1)
    assert variance_shift(0.5, 0.0, 1.0, weight=weight, rho=0.5) > variance_shift(
        0.5, 0.0, 1.0, weight=weight, rho=0.0
    )


def test_correlation_gain_and_cos2_theta_hand_computed():
    # w = (1, 1, 1, 1): cos θ = 1, S = d − 1 = 3
    assert correlation_gain([1, 1, 1, 1]) == pytest.approx(3.0)
    assert cos2_theta([1, 1, 1, 1]) == pytest.approx(1.0)
    # w = (1, −1): Σw = 0, cos θ = 0, S = −1
    assert correlation_gain([1, -1]) == pytest.approx(-1.0)
    assert cos2_theta([1, -1]) == pytest.approx(0.0)


def test_hand_computed_value():
    # q = 0.5, c = 1, v = 1: train = (1 + 1)/0.5 − 1 = 3, so Δ = 1/3
    assert variance_shift(0.5, 1.0, 1.0) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: variance_shift(1.0, 0.0, 1.0), "drop rate must lie in"),
        (lambda: variance_shift(-0.1, 0.0, 1.0), "drop rate must lie in"),
        (lambda: variance_shift(0.1, 0.0, -1.0), "variance cannot be negative"),
        (lambda: variance_shift(0.1, 0.0, 1.0, weight=[1.0], rho=1.5), "correlation must lie"),
        (lambda: variance_shift(0.1, 0.0, 1.0, weight=[], rho=0.1), "at least one entry"),
        (lambda: variance_shift(0.1, 0.0, 1.0, weight=[0.0, 0.0]), "zeros"),
        (lambda: noise_variance_shift(-0.1, 0.0, 1.0), "noise variance cannot be negative"),
        (lambda: uout_noise_var(-1.0), "beta cannot be negative"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    # the rule and the value, in plain words
    with pytest.raises(ValueError, match=message):
        call()

"""BN's lag in closed form (autotune.core.lag) against simulated references: an exponential
average of the batch variances of a drifting variance, and torch's own BatchNorm fed such a
stream; and the lag predicted before training against the lag a trained network measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from torch import nn

from autotune.core.checks import quiet_lightning
from autotune.core.lag import drift_per_step, lag, running_variance_ahead
from autotune.core.spec import parse_spec
from autotune.nn import fitting
from autotune.nn.data import load_data
from autotune.run.preflight import resolve_space

CHANNELS = 4000  # independent replicates of one BN channel: their mean is the expectation


def simulate(momentum, steps, running, variance, drift, *, batch=128, done=0, seed=0):
    """Each channel's running variance after `steps` BN updates with the batch variances of
    Gaussian rows whose variance moves by e^drift a step: BN's rule, step by step."""
    rng = np.random.default_rng(seed)
    r = np.full(CHANNELS, running, dtype=np.float64)
    for j in range(1, steps + 1):
        sigma2 = variance * math.exp(drift * j)
        s2 = sigma2 * rng.chisquare(batch - 1, CHANNELS) / (batch - 1)  # unbiased batch variance
        factor = 1.0 / (done + j) if momentum is None else momentum
        r = (1 - factor) * r + factor * s2
    return r, variance * math.exp(drift * steps)


@pytest.mark.parametrize(
    ("momentum", "steps", "running", "variance", "drift"),
    [
        (0.1, 200, 1.0, 1.0, 0.0),  # caught up: lag 1
        (0.01, 200, 1.0, 0.1, 0.0),  # what is left of r0 = 1 over a small variance
        (0.001, 300, 1.0, 4.0, 0.0),  # barely moved from r0
        (0.1, 300, 1.0, 1.0, 0.01),  # a growing variance, followed 9 steps late
        (0.05, 150, 2.0, 1.0, -0.02),  # a shrinking one
        (0.5, 40, 1.0, 0.3, 0.05),  # a fast momentum keeps up with a fast drift
        (None, 60, 1.0, 0.5, 0.01),  # the cumulative average
    ],
)
def test_the_closed_form_is_the_simulated_exponential_average(
    momentum, steps, running, variance, drift
):
    simulated, end = simulate(momentum, steps, running, variance, drift)
    expected = running_variance_ahead(momentum, steps, running, variance, drift)
    assert simulated.mean() == pytest.approx(expected, rel=0.01)
    # the lag of the expectation; the mean of each channel's σ²/r is within Jensen's few 0.1 %
    assert (end / simulated).mean() == pytest.approx(
        lag(momentum, steps, running, variance, drift), rel=0.02
    )


@pytest.mark.parametrize(("momentum", "drift"), [(0.1, 0.0), (0.03, 0.004), (None, 0.01)])
def test_the_closed_form_is_torchs_batchnorm_fed_a_drifting_variance(momentum, drift):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(512, momentum=momentum)
    bn.train()
    steps, batch, variance = 150, 64, 0.25
    with torch.no_grad():
        for j in range(1, steps + 1):
            bn(math.sqrt(variance * math.exp(drift * j)) * torch.randn(batch, 512))
    # torch starts running_var at 1 and averages unbiased batch variances, as the model does
    expected = running_variance_ahead(momentum, steps, 1.0, variance, drift)
    assert float(bn.running_var.mean()) == pytest.approx(expected, rel=0.02)


def test_resuming_from_a_later_step_is_the_same_average():
    # two halves, the second started from where the first left r: the whole run
    momentum, drift = 0.05, 0.003
    half = running_variance_ahead(momentum, 100, 1.0, 0.2, drift)
    rest = running_variance_ahead(momentum, 100, half, 0.2 * math.exp(100 * drift), drift)
    whole = running_variance_ahead(momentum, 200, 1.0, 0.2, drift)
    assert rest == pytest.approx(whole, rel=1e-12)
    # and for the cumulative average, counting the steps done
    half = running_variance_ahead(None, 30, 1.0, 0.2, drift)
    rest = running_variance_ahead(None, 30, half, 0.2 * math.exp(30 * drift), drift, done=30)
    assert rest == pytest.approx(running_variance_ahead(None, 60, 1.0, 0.2, drift), rel=1e-12)


def test_limits():
    assert lag(0.1, 0, 0.5, 0.5) == 1.0  # no step: as it is
    assert lag(0.1, 500, 0.5, 0.5) == pytest.approx(1.0, abs=1e-12)  # no drift, caught up
    assert lag(1.0, 7, 3.0, 0.5, 0.1) == pytest.approx(1.0)  # momentum 1: the last batch
    assert lag(0.0, 7, 2.0, 0.5) == pytest.approx(0.25)  # momentum 0: r never moves
    # small drift: the average trails by (1 − m)/m steps, lag ≈ 1 + g(1 − m)/m
    assert lag(0.1, 10_000, 1.0, 1.0, 1e-4) == pytest.approx(1 + 1e-4 * 9, rel=1e-3)
    assert drift_per_step(1.0, math.e, 10) == pytest.approx(0.1)
    assert drift_per_step(0.0, 1.0, 10) == 0.0  # a dead channel


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lag(1.5, 10, 1.0, 1.0), "momentum"),
        (lambda: lag(0.1, -1, 1.0, 1.0), "Steps"),
        (lambda: lag(0.1, 10, -1.0, 1.0), "negative"),
        (lambda: drift_per_step(1.0, 2.0, 0), "at least one step"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("momentum", [0.03, 0.01])
def test_the_lag_predicted_before_training_is_the_lag_measured_after(momentum):
    # a low momentum over 2 short epochs: BN's running_var keeps much of its starting 1, above
    # the variance it sees, and the first layer's lag carries into the second's input
    quiet_lightning()
    spec = parse_spec(
        {
            **tiny_spec(search_space={"params": {"bn_momentum": momentum}}),
            "mlflow": {"enabled": False},
        }
    )
    data = load_data(spec.data, seed=spec.train.seed)
    config = resolve_space(spec).defaults()
    predicted = fitting.predict(spec, config, data)
    measured = fitting.fit(spec, config, data).measured
    for layer in predicted.layers:
        assert measured[layer.name].lag < 0.6  # a large lag, far from 1
        # within a factor of 1.4, and below: training grows the variance BN averages, which
        # the prediction, made before any step, takes as holding still
        ratio = measured[layer.name].lag / layer.lag
        assert 1 <= ratio < 1.4, (layer, measured[layer.name])

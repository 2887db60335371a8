"""BN's lag in closed form: how far a BatchNorm layer's running variance is behind the variance of
the input it normalises, from its momentum and how fast that variance moves.

Pure functions of floats: no torch, no state. The measured counterpart is the lag factor of Δ
(autotune/nn/shift.py): Δ = dropout factor × lag, lag = Var(BN input, regularisers on) /
running_var.

In training, each step t replaces BN's running variance r by
    r ← (1 − m)·r + m·s²_t
where m is the momentum and s²_t the unbiased variance of the step's batch, whose expectation is
the variance σ²_t of the BN input under the weights of that step. r starts from r₀ (1 in a fresh
BN layer). After N steps
    r_N = (1 − m)^N·r₀ + m·Σ_{j=1..N} (1 − m)^(N−j)·σ²_j.
Two things keep r_N from σ²_N: what is left of r₀, the weight (1 − m)^N, which a low momentum
over few steps keeps large (0.99^200 ≈ 0.13), and the drift of σ² while the weights move, which
the average follows (1 − m)/m steps late.

The model: σ² moves geometrically, by a factor e^g a step (g > 0: it grows; g = 0: it holds
still), from σ²₀ now to σ²_N = σ²₀·e^(gN) after N steps. With q = (1 − m)·e^(−g),
    r_N / σ²_N = (1 − m)^N·r₀/σ²_N + m·(1 − q^N)/(1 − q)
and the lag is σ²_N / r_N. With no drift and r₀ = σ², the lag is exactly 1. momentum=None is
BN's cumulative average, r = the mean of every s²_t so far (r₀ forgotten at the first step):
    r_N = (n·r₀ + Σ_{j=1..N} σ²_j) / (n + N)
after n steps already averaged.

The expectation of r is what this gives; the lag of one run also carries the noise of the batch
variances (a relative variance of about m/(2 − m)·2/(b − 1) for a batch of b Gaussian rows),
which the mean of σ²/r over many channels raises by that much (Jensen). For the batch sizes a
trial uses this is well under 1 %, and left out.
"""

from __future__ import annotations

import math


def running_variance_ahead(
    momentum: float | None,
    steps: int,
    running: float,
    variance: float,
    drift: float = 0.0,
    *,
    done: int = 0,
) -> float:
    """The expected running variance of a BN layer after `steps` more training steps.

    running: its running variance now; variance: the variance of its input now (σ²₀), moving by
    e^drift a step; momentum: BN's (None: the cumulative average, over `done` steps so far).
    """
    _check(momentum, steps, running, variance, done)
    if steps == 0:
        return running
    if momentum is None:
        total = variance * _geometric_sum(drift, steps) * math.exp(drift)  # Σ_{j=1..N} e^(gj)
        return (done * running + total) / (done + steps)
    end = variance * math.exp(drift * steps)  # σ²_N
    if momentum == 1.0:  # each step forgets the last: r is the last batch's variance
        return end
    log_keep = math.log1p(-momentum)  # log(1 − m)
    # Σ_{j=1..N} (1 − m)^(N−j)·σ²_j = σ²_N·Σ_{k=0..N−1} q^k, log q = log(1 − m) − g
    return math.exp(steps * log_keep) * running + momentum * end * _geometric_sum(
        log_keep - drift, steps
    )


def lag(
    momentum: float | None,
    steps: int,
    running: float,
    variance: float,
    drift: float = 0.0,
    *,
    done: int = 0,
) -> float:
    """BN's lag after `steps` more steps: the input's variance then over the running variance
    then (running_variance_ahead's arguments). 1: the running variance has caught up; below 1,
    it is too large (a variance that shrank, or r₀ = 1 above a small σ²); above 1, too small."""
    end = variance * math.exp(drift * steps)
    ahead = running_variance_ahead(momentum, steps, running, variance, drift, done=done)
    if ahead == 0:
        return 1.0 if end == 0 else math.inf
    return end / ahead


def drift_per_step(before: float, after: float, steps: int) -> float:
    """g, the log-rate a step at which a variance went from `before` to `after` in `steps`."""
    if steps <= 0:
        raise ValueError(f"A drift needs at least one step, but got {steps=}.")
    if before <= 0 or after <= 0:
        return 0.0  # a dead channel: nothing moves
    return math.log(after / before) / steps


def _geometric_sum(log_ratio: float, n: int) -> float:
    """Σ_{k=0..n−1} e^(k·log_ratio), accurate when the ratio is near 1."""
    if log_ratio == 0.0:
        return float(n)
    return math.expm1(n * log_ratio) / math.expm1(log_ratio)


def _check(momentum: float | None, steps: int, running: float, variance: float, done: int) -> None:
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"A BN momentum must lie in [0, 1] or be None, but got {momentum=}.")
    if steps < 0 or done < 0:
        raise ValueError(f"Steps cannot be negative, but got {steps=}, {done=}.")
    if running < 0 or variance < 0:
        raise ValueError(f"A variance cannot be negative, but got {running=}, {variance=}.")

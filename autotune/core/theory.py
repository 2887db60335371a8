"""The variance shift in closed form (Li et al., "Understanding the Disharmony between Dropout and
Batch Normalization by Variance Shift", CVPR 2019, https://arxiv.org/abs/1801.05134).

Pure functions of floats and sequences: no torch, no state.

Conventions, fixed here for the whole project:
- `rate` is the DROP probability q (PyTorch's convention). The paper writes p for the KEEP ratio.
  This module is the one place that converts: p = keep_ratio(rate) = 1 - rate.
- Δ = Var_test / Var_train of what a BatchNorm layer receives. Δ = 1: no shift. Δ < 1: at
  inference BN divides by a variance that is too large (the one dropout inflated in training).

Inputs x_i have mean c, variance v and pairwise correlation ρ. Inverted dropout multiplies x_i by
a_i / p with a_i ~ Bernoulli(p), so E[a x / p] = c, and
    Var_train(a x / p) = (c² + v) / p − c²,     Var_test(x) = v.
1. dropout directly before BN:  Δ = v / ((c² + v)/p − c²)
2. dropout -> one linear unit (weights w, fan-in d) -> BN: the masks are independent, so the
   covariances ρv survive dropout and only the diagonal inflates. With S = d·cos²θ − 1 and
   cos θ = Σw / (√d ‖w‖):
        Δ = (v + vρS) / ((c² + v)/p − c² + vρS)
3. any mean-one multiplicative noise of variance s² (Gaussian dropout: s² = q/p; Uout with
   r ~ U(−β, β): s² = β²/3):  Δ = v / ((c² + v)(1 + s²) − c²)
   Bernoulli dropout is the case s² = q/p, and through a linear unit the same reasoning gives
        Δ = (v + vρS) / (v + s²(c² + v) + vρS)
4. alpha dropout (Klambauer et al., NeurIPS 2017, https://arxiv.org/abs/1706.02515) sets a
   dropped input to α' = −λα and then rescales, y = A(a·x + α'(1 − a)) + B with
   A² = 1 / (p(1 + α'²q)). With g = A²p² = p / (1 + α'²q), the masks again only inflate the
   diagonal:  Var_train = g·(v + vρS + (q/p)(v + (c − α')²)),  Var_test = v + vρS.
   A standard-normal input (c = 0, v = 1) fed straight to BN has Δ = 1: alpha dropout keeps it.

A network is summarised by its worst layer (the Δ farthest from 1, by |log Δ|) and the product of
Δ over its BN layers, a rough measure of how shifts compound along the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def keep_ratio(rate: float) -> float:
    """The paper's p (keep ratio) from a drop rate q: p = 1 − q. The project's only conversion."""
    _check_rate(rate)
    return 1.0 - rate


def variance_shift(
    rate: float,
    mean: float,
    var: float,
    *,
    weight: Sequence[float] | None = None,
    rho: float = 0.0,
) -> float:
    """Δ = Var_test / Var_train of BN's input, for inverted Bernoulli dropout with drop `rate`.

    With `weight=None` the dropout feeds BN directly (form 1). Otherwise it feeds one linear unit
    with that weight vector, whose output feeds BN, and the inputs have pairwise correlation `rho`
    (form 2).
    """
    p = keep_ratio(rate)
    return noise_variance_shift((1.0 - p) / p, mean, var, weight=weight, rho=rho)


def noise_variance_shift(
    noise_var: float,
    mean: float,
    var: float,
    *,
    weight: Sequence[float] | None = None,
    rho: float = 0.0,
) -> float:
    """Δ for any mean-one multiplicative noise of variance `noise_var` (form 3); with a weight
    vector, the noise feeds one linear unit whose output feeds BN, as in form 2."""
    if noise_var < 0:
        raise ValueError(f"A noise variance cannot be negative, but got {noise_var=}.")
    _check_moments(mean, var)
    shared = _shared(var, weight, rho)
    return _ratio(var + shared, var + noise_var * (mean**2 + var) + shared)


ALPHA_PRIME = -1.7580993408473766  # −λα of SELU: the value alpha dropout gives a dropped input


def alpha_dropout_variance_shift(
    rate: float,
    mean: float,
    var: float,
    *,
    weight: Sequence[float] | None = None,
    rho: float = 0.0,
) -> float:
    """Δ for alpha dropout with drop `rate` (form 4), directly before BN or through one unit."""
    _check_moments(mean, var)
    p = keep_ratio(rate)
    q = 1.0 - p
    gain = p / (1.0 + ALPHA_PRIME**2 * q)
    shared = _shared(var, weight, rho)
    test = var + shared
    return _ratio(test, gain * (test + q / p * (var + (mean - ALPHA_PRIME) ** 2)))


def _shared(var: float, weight: Sequence[float] | None, rho: float) -> float:
    """vρS: what correlated inputs add to a unit's variance (per unit of ‖w‖²); 0 without one."""
    if weight is None:
        return 0.0
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"A correlation must lie in [-1, 1], but got {rho=}.")
    return var * rho * correlation_gain(weight)


def correlation_gain(weight: Sequence[float]) -> float:
    """S = d·cos²θ − 1 = (Σw)² / ‖w‖² − 1: how much a unit's weights add up correlated inputs."""
    d = len(weight)
    if d == 0:
        raise ValueError("A weight vector needs at least one entry, but got an empty one.")
    norm2 = math.fsum(w * w for w in weight)
    if norm2 == 0:
        raise ValueError("A weight vector of zeros has no direction (cos θ is undefined).")
    return math.fsum(weight) ** 2 / norm2 - 1.0


def cos2_theta(weight: Sequence[float]) -> float:
    """cos²θ between the weight vector and the all-ones direction: (Σw)² / (d ‖w‖²)."""
    return (correlation_gain(weight) + 1.0) / len(weight)


def gaussian_dropout_noise_var(rate: float) -> float:
    """Gaussian dropout's multiplicative noise variance, q/p (Srivastava et al., JMLR 2014)."""
    return rate / keep_ratio(rate)


def uout_noise_var(beta: float) -> float:
    """Uout's noise variance, β²/3, for x·(1 + r) with r ~ U(−β, β) (Li et al., 2019)."""
    if beta < 0:
        raise ValueError(f"Uout's beta cannot be negative, but got {beta=}.")
    return beta**2 / 3.0


@dataclass(frozen=True)
class ShiftSummary:
    """A network's shifts in two numbers: its worst layer and the product along the path."""

    worst_layer: str | None
    worst_delta: float
    product: float


def summarize_shift(deltas: Mapping[str, float]) -> ShiftSummary:
    """The layer whose Δ is farthest from 1 (by |log Δ|) and the product of all Δ; Δ = 1 and no
    worst layer where no layer is shifted."""
    if not deltas:
        return ShiftSummary(None, 1.0, 1.0)
    for name, delta in deltas.items():
        if not (math.isfinite(delta) and delta > 0):
            raise ValueError(
                f"A variance shift must be positive and finite, but {name} has {delta}."
            )
    worst = max(deltas, key=lambda name: abs(math.log(deltas[name])))
    if deltas[worst] == 1.0:  # no layer is shifted: none is the worst
        return ShiftSummary(None, 1.0, 1.0)
    return ShiftSummary(worst, deltas[worst], math.prod(deltas.values()))


def _ratio(test: float, train: float) -> float:
    """test / train, with 0/0 (a constant input, nothing to shift) taken as no shift."""
    if train == 0:
        return 1.0
    return test / train


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"A drop rate must lie in [0, 1), but got {rate=}.")


def _check_moments(mean: float, var: float) -> None:
    if var < 0:
        raise ValueError(f"A variance cannot be negative, but got {var=}.")
    if not (math.isfinite(mean) and math.isfinite(var)):
        raise ValueError(f"Mean and variance must be finite, but got {mean=}, {var=}.")

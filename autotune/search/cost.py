"""What a configuration is predicted to cost in the metric, learned within the study.

The variance-shift gate used to stop a trial on its predicted Δ alone, but a shifted network is
not always a worse one (on the digits mlp the shift and the accuracy did not correlate). This
model asks the question the gate should ask: given what the trials that trained so far scored,
what will this one score? It regresses the final metric of the trials that trained on

- the shift the theory predicts: |log Δ| of the worst layer's dropout factor (the `predicted_delta`
  attr) and, where the trial stored it, of the worst whole Δ (dropout × lag); after the first
  epoch, the prediction from the trial's own weights instead (`predicted_shift_after_epoch_1`);
- the sampled parameters (the rate, placement, kind and momentum of each block, or whatever the
  space holds): numbers as they are (a numeric choice too), other choices one-hot;
- from the first epoch on, the metric the trial reported at that epoch.

A pruned trial has no final metric; its outcome is its metric at the epoch it stopped after,
carried on to the end by the completed trials' mean gain from that epoch (`outcomes`). Without
them a pruned study would learn from its few completed trials only, most of them late.

The model is ridge regression on standardised features, with its penalty chosen by leave-one-out
error from a grid, so that with few trials or features that say nothing it falls back towards the
mean of the outcomes, and its leave-one-out error is the spread its predictions are given. The
mean alone is a candidate too: where no penalty predicts the outcomes better than their mean
does, the model has no skill (`skilful` False), and a gate that read its forecast would stop
trials on noise (with the line at the top quarter and optimism below 0.67 spreads, every one).
Only the Python standard library and numpy: plain Optuna code can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from autotune.core.names import DELTA_KEY, PREDICTED_SHIFT_ATTR, TRAINED_PREDICTION_ATTR

# the ridge penalties tried, on standardised features (the number of rows is of the same order);
# infinity is the mean alone, which a finite penalty must beat for the model to have skill
PENALTIES = (math.inf, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)


def features(trial: FrozenTrial, step: int, delta_key: str = DELTA_KEY) -> dict[str, float]:
    """What the model knows of `trial` at `step` (0: before training; s: after epoch s)."""
    row: dict[str, float] = {}
    stored = trial.user_attrs.get(PREDICTED_SHIFT_ATTR)
    if step >= 1 and isinstance(trial.user_attrs.get(TRAINED_PREDICTION_ATTR), dict):
        stored = trial.user_attrs[TRAINED_PREDICTION_ATTR]
        row.update(_worst(stored, "summary", "dropout"))
    else:
        delta = trial.user_attrs.get(delta_key)
        if _positive(delta):
            row["shift: dropout"] = abs(math.log(delta))
    if isinstance(stored, dict):
        row.update(_worst(stored, "delta_summary", "Δ"))
    for name, value in trial.params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            row[f"{name}={value}"] = 1.0
        else:
            row[name] = float(value)
            row[f"{name} set"] = 1.0
    if step >= 1:
        value = trial.intermediate_values.get(step)
        if _finite(value):
            row["metric at step"] = float(value)  # type: ignore[arg-type]
    return row


def _worst(stored: dict, summary: str, label: str) -> dict[str, float]:
    """|log| of a stored prediction's worst value, under `shift: <label>`, if it holds one."""
    worst = (stored.get(summary) or {}).get("worst_delta")
    return {f"shift: {label}": abs(math.log(worst))} if _positive(worst) else {}


def _positive(value: object) -> bool:
    return _finite(value) and value > 0  # type: ignore[operator]


@dataclass(frozen=True)
class Forecast:
    """A predicted final metric and the spread of such predictions (leave-one-out)."""

    value: float
    spread: float


class CostModel:
    """Ridge regression of the final metric on `features`, fitted to the completed trials."""

    def __init__(self, rows: Sequence[dict[str, float]], targets: Sequence[float]) -> None:
        if len(rows) != len(targets) or len(rows) < 3:
            raise ValueError(f"a cost model needs 3 or more trials, got {len(rows)}")
        names = sorted({name for row in rows for name in row})
        x = np.array([[row.get(name, 0.0) for name in names] for row in rows], dtype=float)
        y = np.asarray(targets, dtype=float)
        self.mean_x, scale = x.mean(axis=0), x.std(axis=0)
        keep = scale > 1e-12  # a feature the same in every trial says nothing
        self.names = [name for name, kept in zip(names, keep, strict=True) if kept]
        self.mean_x, self.scale = self.mean_x[keep], scale[keep]
        self.mean_y = float(y.mean())
        z = (x[:, keep] - self.mean_x) / self.scale
        self.penalty, self.coef, self.loo_error = _ridge(z, y - self.mean_y)
        # the features every trial it learned from had: a row without one is not like them
        self.always = [name for name in self.names if all(name in row for row in rows)]

    @property
    def skilful(self) -> bool:
        """Whether some penalty predicted the outcomes (left out) better than their mean did."""
        return math.isfinite(self.penalty)

    def knows(self, row: dict[str, float]) -> bool:
        """Whether `row` has every feature that all the model's trials had: a missing one (a
        metric that was not finite, a parameter every trial sampled) would read as 0, a value
        the model never saw."""
        return all(name in row for name in self.always)

    def forecast(self, row: dict[str, float]) -> Forecast:
        x = np.array([row.get(name, 0.0) for name in self.names], dtype=float)
        z = (x - self.mean_x) / self.scale
        return Forecast(self.mean_y + float(z @ self.coef), self.loo_error)


def _ridge(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, float]:
    """The penalty of least leave-one-out error, its coefficients, and that error (an RMS);
    on a tie the earlier penalty in PENALTIES, the mean alone first."""
    n, k = z.shape
    best: tuple[float, np.ndarray, float] | None = None
    for penalty in PENALTIES:
        if k == 0 or math.isinf(penalty):
            coef, hat = np.zeros(k), np.zeros(n)
        else:
            inverse = np.linalg.inv(z.T @ z + penalty * np.eye(k))
            coef = inverse @ z.T @ y
            hat = np.einsum("ij,jk,ik->i", z, inverse, z)
        # the mean was taken from all rows: leaving one out also moves it by 1/n
        leverage = np.minimum(hat + 1.0 / n, 1.0 - 1e-9)
        residual = (y - z @ coef) / (1.0 - leverage)
        error = float(np.sqrt(np.mean(residual**2)))
        if best is None or error < best[2]:
            best = (penalty, coef, error)
    assert best is not None
    return best


def outcomes(trials: Sequence[FrozenTrial]) -> dict[int, float]:
    """The final metric of each trial that trained, by trial number: a completed trial's value,
    and for a trial pruned after epoch t its metric at t plus the mean gain from epoch t to the
    end among the completed trials that reported t (a learning curve carried on as the average
    one went). A trial stopped before training, or after an epoch no completed trial reported,
    has none."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    found = {t.number: float(t.value) for t in complete}  # type: ignore[arg-type]
    gains: dict[int, list[float]] = {}  # step -> the completed trials' gains from it to the end
    for t in complete:
        for step, value in t.intermediate_values.items():
            if _finite(value):
                gains.setdefault(step, []).append(t.value - value)  # type: ignore[operator]
    for trial in trials:
        if trial.state != TrialState.PRUNED or trial.last_step is None:
            continue
        from_step = gains.get(trial.last_step)
        reached = trial.intermediate_values.get(trial.last_step)
        if from_step and _finite(reached):
            found[trial.number] = float(reached) + sum(from_step) / len(from_step)
    return found


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fit_cost_model(
    trials: Sequence[FrozenTrial], step: int, delta_key: str = DELTA_KEY
) -> tuple[CostModel, list[float]] | None:
    """The model of the final metric at `step` from the trials that trained (`outcomes`), and
    those outcomes; None below 3 trials with an outcome (and the step reported, from 1 on)."""
    found = outcomes(trials)
    rows, targets = [], []
    for trial in trials:
        if trial.number not in found or delta_key not in trial.user_attrs:
            continue
        row = features(trial, step, delta_key)
        if step >= 1 and "metric at step" not in row:
            continue  # a trial that did not report this step cannot teach it
        rows.append(row)
        targets.append(found[trial.number])
    return (CostModel(rows, targets), targets) if len(rows) >= 3 else None

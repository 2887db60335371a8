"""A pruner seeded by the predicted variance shift: a real optuna.pruners.BasePruner.

Before training, the objective predicts each BN layer's shift Δ (autotune.nn.prediction) and puts
the network's worst dropout factor on the trial as the user attr `predicted_delta`. Then:

1. The gate, before the first epoch. Until `learn_after` trials have trained it knows only the
   theory: a trial whose worst Δ is past the threshold (|log Δ| > |log threshold|, so Δ < 0.5 and
   Δ > 2 are both past 0.5) stops before it trains. From then on (`gate="cost"`, the default) it
   decides on the predicted cost in the metric: a model learned from the trials that trained
   (autotune.search.cost) predicts this trial's final metric from its predicted factors and its
   parameters, and a trial whose prediction, made optimistic by `optimism` times the model's
   leave-one-out error, falls short of their top `quantile` stops (never where the model
   predicts them no better than their mean). With `gate="delta"` the line stays on Δ instead,
   learned from the completed trials (`learn_threshold`: no trial more shifted than any of the
   best quarter, times `margin`).
   Either way a share `exploration` of the trials the gate would stop train anyway, so that the
   data can overrule the model. Which trials explore is fixed by the trial number and `seed`, so
   asking again gives the same answer.
2. The cost gate again after each of the first `cost_steps` epochs, the model now also knowing the
   metric of that epoch and Δ predicted from the trial's own weights.
3. During training, the base pruner decides, modulated by how close Δ is to 1. With
   closeness c = 1 − |log Δ| / |log threshold| (1 at Δ = 1, 0 at the threshold and past it):
   - a median or percentile base keeps fewer trials far from Δ = 1: its percentile becomes
     percentile · (1 − strictness · (1 − c)) (the median's 50 becomes 25 at the threshold with
     strictness 0.5), and its warm-up grows by round(patience · c) epochs near Δ = 1;
   - any other base (hyperband, successive halving) is asked at every report, as it is, and its
     decision counts only once the trial has reported round(patience · c) epochs past its first.
     A wrapped HyperbandPruner is no longer the study's pruner as Optuna's samplers see it, so
     they do not sample per bracket.

The defaults are the variant chosen by benchmarks/pruners.py (docs/benchmarks.md).

A trial without `predicted_delta` is left to the base pruner alone, so the pruner also works in
plain Optuna code that predicts nothing:

    pruner = VarianceShiftPruner(optuna.pruners.MedianPruner(), threshold=0.5)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    trial = study.ask()
    trial.set_user_attr("predicted_delta", 0.3)  # e.g. predict_shift(...).summary.worst_delta
    trial.should_prune()  # True: 0.3 is past 0.5, and this trial does not explore
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import optuna
from optuna.pruners import BasePruner, MedianPruner, NopPruner, PercentilePruner
from optuna.trial import FrozenTrial, TrialState

from autotune.core.direction import best_first, maximizes
from autotune.core.names import DELTA_KEY
from autotune.search.cost import features, fit_cost_model
from autotune.search.optuna_private import percentile_settings


@dataclass(frozen=True)
class Verdict:
    """What the gate makes of a trial, before exploration: whether it is past the line, why."""

    past: bool
    reason: str


class VarianceShiftPruner(BasePruner):
    """Stop by predicted cost or shift before training and after the first epochs, and by `base`
    during training.

    Args:
        base: the pruner used during training; None: NopPruner (the gate alone).
        gate: "cost", the predicted metric once `learn_after` trials trained; "delta", the
            predicted Δ alone.
        threshold: the worst Δ past which a trial is stopped before training while there is
            nothing to learn from (and with gate "delta" and no learned line); None: no gate.
        exploration: the share of gated trials that train anyway, in [0, 1].
        quantile: the cost gate keeps a trial predicted to land in this top share of the
            completed trials.
        optimism: leave-one-out errors added to a trial's predicted metric before the cost gate
            compares it (higher: fewer trials stopped, fewer wrongly).
        cost_steps: epochs after which the cost gate decides again, with the epoch's metric.
        strictness: how much lower a median/percentile base's percentile gets far from Δ = 1.
        patience: extra warm-up epochs granted near Δ = 1 before the base may prune.
        learn_threshold: with gate "delta", replace the threshold with one learned from
            completed trials.
        learn_after: trials needed before the gate learns: for a cost model, trials that
            trained (completed, or pruned after an epoch) and reported the step it decides at;
            for a line on Δ, completed trials.
        margin: slack on the learned threshold, as a factor on |log Δ| (at least 1).
        seed: fixes which gated trials explore.
        delta_key: the user attr that carries the predicted Δ.
    """

    def __init__(
        self,
        base: BasePruner | None = None,
        *,
        gate: str = "cost",
        threshold: float | None = 0.5,
        exploration: float = 0.1,
        quantile: float = 0.25,
        optimism: float = 0.5,
        cost_steps: int = 3,
        strictness: float = 0.5,
        patience: int = 0,
        learn_threshold: bool = True,
        learn_after: int = 10,
        margin: float = 1.25,
        seed: int = 0,
        delta_key: str = DELTA_KEY,
    ) -> None:
        if gate not in GATES:
            raise ValueError(f"The gate is one of {', '.join(GATES)}, but got {gate=}.")
        if threshold is not None and not 0 < threshold < 1:
            raise ValueError(f"The threshold is a Δ in (0, 1), but got {threshold=}.")
        if not 0 <= exploration <= 1:
            raise ValueError(f"The exploration share must lie in [0, 1], but got {exploration=}.")
        if not 0 < quantile < 1:
            raise ValueError(f"The quantile is a share in (0, 1), but got {quantile=}.")
        if not (math.isfinite(optimism) and optimism >= 0):
            raise ValueError(f"Optimism cannot be negative, but got {optimism=}.")
        if cost_steps < 0:
            raise ValueError(f"cost_steps cannot be negative, but got {cost_steps=}.")
        if not 0 <= strictness < 1:
            raise ValueError(f"Strictness must lie in [0, 1), but got {strictness=}.")
        if patience < 0:
            raise ValueError(f"Patience cannot be negative, but got {patience=}.")
        if learn_after < 3 and gate == "cost":
            raise ValueError(f"A cost model needs at least 3 trials to learn, got {learn_after=}.")
        if learn_after < 1:
            raise ValueError(f"A threshold needs at least one trial to learn, got {learn_after=}.")
        if margin < 1:
            raise ValueError(f"The margin is a factor of at least 1, but got {margin=}.")
        self.base = base if base is not None else NopPruner()
        self.gate = gate
        self.threshold = threshold
        self.exploration = exploration
        self.quantile = quantile
        self.optimism = optimism
        self.cost_steps = cost_steps
        self.strictness = strictness
        self.patience = patience
        self.learn_threshold = learn_threshold
        self.learn_after = learn_after
        self.margin = margin
        self.seed = seed
        self.delta_key = delta_key
        self.rules: dict[int, str] = {}  # trial number -> the rule that stopped it

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        stop, rule = self.decide(study, trial)
        if stop and trial.last_step is not None:  # in training: read once (pruning_rule)
            self.rules[trial.number] = rule
        return stop

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> tuple[bool, str]:
        """Whether to stop the trial now, and by which rule, in words."""
        delta = trial.user_attrs.get(self.delta_key)
        if delta is None:  # nothing predicted: the base alone
            return self.base.prune(study, trial), f"by {rule_name(self.base)}"
        if trial.last_step is None:  # before training: the gate
            verdict = self.verdict(study, trial)
            return self.stops(verdict, trial.number), verdict.reason if verdict else ""
        step = trial.last_step
        if 1 <= step <= self.cost_steps:
            verdict = self.cost_verdict(study, trial, step)
            if verdict is not None and self.stops(verdict, trial.number):
                return True, f"by the cost gate: {verdict.reason}"
        return self._base_decides(study, trial, delta)

    # -- the gate ---------------------------------------------------------------------------------

    def gated(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Whether the gate stops this trial before training."""
        return self.stops(self.verdict(study, trial), trial.number)

    def stops(self, verdict: Verdict | None, number: int) -> bool:
        """Whether `verdict` stops trial `number`: past the line, and not one that explores."""
        return verdict is not None and verdict.past and not self.explores(number)

    def verdict(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """The gate's verdict on a trial before training (exploration aside); None: no gate."""
        cost = self.cost_verdict(study, trial, 0)
        if cost is not None:
            return cost
        delta = trial.user_attrs.get(self.delta_key)
        limit = self.gate_distance(study)
        if limit is None or delta is None:
            return None
        past = shift_distance(delta) > limit
        where = "outside" if past else "within"
        return Verdict(past, f"{where} the gate's [{math.exp(-limit):.3f}, {math.exp(limit):.3f}]")

    def explores(self, number: int) -> bool:
        """Whether trial `number` trains even when the gate would stop it."""
        return random.Random(f"{self.seed}:{number}").random() < self.exploration

    def cost_verdict(self, study: optuna.Study, trial: FrozenTrial, step: int) -> Verdict | None:
        """Whether the trial's predicted final metric, made optimistic, misses the top quantile
        of the trials that trained (their outcomes, autotune.search.cost); never, where the
        model predicts them no better than their mean; None: gate "delta", or fewer than
        `learn_after` trials with an outcome to learn from."""
        if self.gate != "cost":
            return None
        trained = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        fitted = fit_cost_model(trained, step, self.delta_key)
        if fitted is None:
            return None
        model, known = fitted
        if len(known) < self.learn_after:
            return None
        when = "before training" if step == 0 else f"after epoch {step}"
        row = features(trial, step, self.delta_key)
        if not model.knows(row):  # e.g. a metric that was not finite: no forecast to trust
            return None
        if not model.skilful:  # its forecast is the mean for every trial: nothing to stop on
            return Verdict(
                False,
                f"{when}, the cost model predicts the {len(known)} trials that trained no "
                "better than their mean does",
            )
        up = maximizes(study)
        ranked = sorted(known, reverse=up)
        line = ranked[max(1, int(len(ranked) * self.quantile)) - 1]
        forecast = model.forecast(row)
        hope = forecast.value + (1 if up else -1) * self.optimism * forecast.spread
        return Verdict(
            hope < line if up else hope > line,
            f"predicted final metric {forecast.value:.4g} ± {forecast.spread:.2g} {when}, "
            f"against {line:.4g}, the top {100 * self.quantile:.0f} % of {len(ranked)} "
            f"trials that trained",
        )

    def gate_distance(self, study: optuna.Study) -> float | None:
        """|log Δ| past which the Δ gate stops a trial: learned, fixed, or None for no gate."""
        learned = (
            self.learned_distance(study) if self.learn_threshold and self.gate == "delta" else None
        )
        if learned is not None:
            return learned
        return None if self.threshold is None else shift_distance(self.threshold)

    def learned_distance(self, study: optuna.Study) -> float | None:
        """The largest |log Δ| among the best quarter of completed trials, times the margin."""
        complete = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and self.delta_key in t.user_attrs
        ]
        if len(complete) < self.learn_after:
            return None
        ranked = best_first(complete, maximizes(study), key=lambda t: t.value)
        best = ranked[: max(1, len(ranked) // 4)]
        widest = max(shift_distance(t.user_attrs[self.delta_key]) for t in best)
        return max(widest, MIN_LEARNED_DISTANCE) * self.margin

    # -- during training --------------------------------------------------------------------------

    def closeness(self, study: optuna.Study, distance: float) -> float:
        """1 at Δ = 1, falling linearly in |log Δ| to 0 at the gate's threshold and past it."""
        limit = self.gate_distance(study)
        if limit is None:
            limit = shift_distance(0.5)  # no gate: closeness still needs a scale
        return max(0.0, 1.0 - distance / limit)

    def _base_decides(
        self, study: optuna.Study, trial: FrozenTrial, delta: float
    ) -> tuple[bool, str]:
        c = self.closeness(study, shift_distance(delta))
        grace = round(self.patience * c)
        if isinstance(self.base, (MedianPruner, PercentilePruner)):
            pruner = self._percentile(c, grace)
            kept, was = percentile_settings(pruner)["percentile"], self.base_percentile()
            narrowed = f", narrowed from {was:.0f} % for its predicted Δ {delta:.3f}"
            return pruner.prune(study, trial), (
                f"by {rule_name(self.base)}: not in the best {kept:.0f} % of the trials at "
                f"epoch {trial.last_step}{narrowed if kept < was else ''}"
            )
        # asked at every report, so that a rung-based base records each rung's own value; its
        # decision counts once the trial is `grace` epochs past its first report
        decision = self.base.prune(study, trial)
        first = min(trial.intermediate_values) if trial.intermediate_values else 0
        assert trial.last_step is not None  # checked by prune()
        return decision and trial.last_step - first >= grace, f"by {rule_name(self.base)}"

    def base_percentile(self) -> float:
        """The percentile of trials a median or percentile base keeps (the median: 50)."""
        assert isinstance(self.base, PercentilePruner)  # MedianPruner is one
        return float(percentile_settings(self.base)["percentile"])

    def pruned_by(self, number: int) -> str:
        """The rule that stopped trial `number` in training, once: "" where none did."""
        return self.rules.pop(number, "")

    def _percentile(self, closeness: float, grace: int) -> PercentilePruner:
        """The base's percentile rule, stricter as closeness falls, warmer by `grace` epochs."""
        assert isinstance(self.base, PercentilePruner)  # MedianPruner is one
        settings = percentile_settings(self.base)
        settings["percentile"] *= 1.0 - self.strictness * (1.0 - closeness)
        settings["n_warmup_steps"] += grace
        return PercentilePruner(**settings)


GATES = ("cost", "delta")
RULES = {
    "MedianPruner": "the median rule",
    "PercentilePruner": "the percentile rule",
    "SuccessiveHalvingPruner": "successive halving",
    "HyperbandPruner": "Hyperband",
    "ThresholdPruner": "the threshold rule",
    "PatientPruner": "the patient rule",
    "WilcoxonPruner": "the Wilcoxon rule",
}


def rule_name(pruner: BasePruner) -> str:
    """A pruner's rule in words: "the median rule", or its class's name."""
    return RULES.get(type(pruner).__name__, type(pruner).__name__)


def pruning_rule(pruner: BasePruner, number: int) -> str:
    """Which rule of the study's pruner stopped trial `number` in training, in words."""
    if isinstance(pruner, VarianceShiftPruner):
        return pruner.pruned_by(number)
    return f"by {rule_name(pruner)}"


# a learned line never closer to 1 than Δ = 0.9 (or 1/0.9): the best trials having Δ = 1 must not
# gate every trial that has any dropout at all
MIN_LEARNED_DISTANCE = abs(math.log(0.9))


def shift_distance(delta: float) -> float:
    """|log Δ|: how far a shift is from none, the same for Δ and 1/Δ."""
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"A variance shift must be positive and finite, but got {delta!r}.")
    return abs(math.log(delta))

"""The cost model (autotune.search.cost) and the cost gate it gives VarianceShiftPruner: what the
model learns from completed trials, and when the gate stops a trial, in plain Optuna."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.pruners import NopPruner
from optuna.trial import TrialState, create_trial

from autotune.core.names import DELTA_KEY, PREDICTED_SHIFT_ATTR, TRAINED_PREDICTION_ATTR
from autotune.pruners import VarianceShiftPruner
from autotune.search.cost import CostModel, features, fit_cost_model, outcomes

optuna.logging.set_verbosity(optuna.logging.WARNING)

RATE = FloatDistribution(0.0, 0.5)
KIND = CategoricalDistribution(["dropout", "gaussian"])


def _frozen(
    value: float | None,
    *,
    rate: float = 0.1,
    kind: str = "dropout",
    delta: float = 1.0,
    reports: dict[int, float] | None = None,
    attrs: dict | None = None,
) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=TrialState.COMPLETE if value is not None else TrialState.RUNNING,
        value=value,
        params={"rate": rate, "kind": kind},
        distributions={"rate": RATE, "kind": KIND},
        user_attrs={DELTA_KEY: delta, **(attrs or {})},
        intermediate_values=reports or {},
    )


def _numbered(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Copies numbered 0, 1, ... (create_trial numbers every trial -1)."""
    numbered = []
    for number, trial in enumerate(trials):
        numbered.append(copy.copy(trial))
        numbered[-1].number = number
    return numbered


# --- the features --------------------------------------------------------------------------------


def test_features_hold_the_shift_the_parameters_and_the_metric_of_the_step() -> None:
    stored = {"summary": {"worst_delta": 0.5}, "delta_summary": {"worst_delta": 0.25}}
    trained = {"summary": {"worst_delta": 0.8}, "delta_summary": {"worst_delta": 0.4}}
    trial = _frozen(
        0.9,
        rate=0.3,
        kind="gaussian",
        delta=0.5,
        reports={1: 0.7, 2: 0.8},
        attrs={PREDICTED_SHIFT_ATTR: stored, TRAINED_PREDICTION_ATTR: trained},
    )

    before = features(trial, 0)
    assert before == pytest.approx(
        {
            "shift: dropout": math.log(2),
            "shift: Δ": math.log(4),
            "rate": 0.3,
            "rate set": 1.0,
            "kind=gaussian": 1.0,
        }
    )
    # after an epoch: Δ from the trial's own weights, and that epoch's metric
    after = features(trial, 2)
    assert after["shift: dropout"] == pytest.approx(abs(math.log(0.8)))
    assert after["shift: Δ"] == pytest.approx(abs(math.log(0.4)))
    assert after["metric at step"] == 0.8


def test_a_trial_without_a_stored_prediction_has_the_gate_attr_alone() -> None:
    row = features(_frozen(0.9, delta=2.0), 1)
    assert row["shift: dropout"] == pytest.approx(math.log(2))
    assert "shift: Δ" not in row and "metric at step" not in row


def _pruned(reports: dict[int, float]) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=TrialState.PRUNED,
        params={"rate": 0.1, "kind": "dropout"},
        distributions={"rate": RATE, "kind": KIND},
        intermediate_values=reports,
    )


def test_a_pruned_trial_is_carried_on_by_the_mean_gain_of_the_completed() -> None:
    done = [_frozen(0.9, reports={3: 0.8}), _frozen(0.7, reports={3: 0.5})]
    gated = create_trial(state=TrialState.PRUNED, params={}, distributions={})
    found = outcomes(_numbered([*done, _pruned({1: 0.2, 3: 0.4}), gated]))
    # the completed gained 0.1 and 0.2 after epoch 3: the pruned one ends at 0.4 + 0.15
    assert found == pytest.approx({0: 0.9, 1: 0.7, 2: 0.55})


def test_a_pruned_trial_of_a_minimised_metric_is_carried_on_the_same_way() -> None:
    # a loss falls: the completed lost 0.2 and 0.4 after epoch 2, the pruned one ends at 0.9 − 0.3
    done = [_frozen(0.2, reports={2: 0.4}), _frozen(0.3, reports={2: 0.7})]
    found = outcomes(_numbered([*done, _pruned({1: 1.2, 2: 0.9})]))
    assert found == pytest.approx({0: 0.2, 1: 0.3, 2: 0.6})


# --- the model -----------------------------------------------------------------------------------


def _rows(n: int, rng: np.random.Generator) -> list[dict[str, float]]:
    return [{"a": float(a), "b": float(b)} for a, b in rng.normal(size=(n, 2))]


def test_a_linear_relation_is_learned_and_its_error_is_the_noise() -> None:
    rng = np.random.default_rng(0)
    rows = _rows(40, rng)
    targets = [0.9 - 0.05 * r["a"] + rng.normal(0, 0.005) for r in rows]

    model = CostModel(rows, targets)

    assert model.forecast({"a": 1.0, "b": 0.0}).value == pytest.approx(0.85, abs=0.005)
    assert model.forecast({"a": -1.0, "b": 3.0}).value == pytest.approx(0.95, abs=0.005)
    # the leave-one-out error measures the noise, not the spread of the targets
    assert 0.003 < model.loo_error < 0.008
    assert model.loo_error < 0.2 * np.std(targets)
    assert model.skilful


def test_features_that_say_nothing_leave_the_mean_and_its_spread() -> None:
    rng = np.random.default_rng(1)
    rows = _rows(12, rng)
    targets = list(0.9 + rng.normal(0, 0.02, size=12))

    model = CostModel(rows, targets)
    forecast = model.forecast({"a": 3.0, "b": -3.0})

    # no penalty beats the mean: the forecast stays near it, with the targets' sd, unskilled
    assert model.penalty >= 100
    assert not model.skilful
    assert forecast.value == pytest.approx(np.mean(targets), abs=0.01)
    assert forecast.spread == pytest.approx(np.std(targets), rel=0.35)


def test_a_feature_the_same_in_every_trial_is_dropped() -> None:
    rows = [{"a": float(i), "same": 1.0} for i in range(5)]
    model = CostModel(rows, [0.1 * i for i in range(5)])
    assert model.names == ["a"]
    assert math.isfinite(model.forecast({"a": 2.0, "same": 7.0}).value)


def test_fewer_than_three_usable_trials_give_no_model() -> None:
    assert fit_cost_model(_numbered([_frozen(0.9), _frozen(0.8)]), 0) is None
    # at step 1, a completed trial that never reported step 1 cannot teach it
    unreported = _numbered([_frozen(0.9), _frozen(0.8), _frozen(0.7, reports={1: 0.5})])
    assert fit_cost_model(unreported, 1) is None
    assert fit_cost_model(_numbered([_frozen(0.9, reports={1: 0.5})] * 3), 1) is not None
    with pytest.raises(ValueError, match="3 or more"):
        CostModel([{"a": 1.0}], [0.5])


# --- the gate ------------------------------------------------------------------------------------


def _study(direction: str = "maximize", **settings) -> optuna.Study:
    pruner = VarianceShiftPruner(NopPruner(), exploration=0.0, learn_after=10, seed=0, **settings)
    return optuna.create_study(direction=direction, pruner=pruner)


def _sign(direction: str) -> float:
    return 1.0 if direction == "maximize" else -1.0


def _trained_trials(study: optuna.Study, n: int = 16) -> None:
    """Completed trials whose final metric falls with the rate: 0.95 − 0.4·rate (maximize)."""
    sign = _sign(study.direction.name.lower())
    rng = random.Random(0)
    for i in range(n):
        rate = 0.5 * i / (n - 1)
        final = 0.95 - 0.4 * rate + rng.gauss(0, 0.003)
        trial = create_trial(
            value=sign * final,
            params={"rate": rate},
            distributions={"rate": RATE},
            user_attrs={DELTA_KEY: 1.0},
            intermediate_values={1: sign * (final - 0.1)},
        )
        study.add_trial(trial)


def _enqueued(study: optuna.Study, rate: float, delta: float = 1.0) -> optuna.Trial:
    study.enqueue_trial({"rate": rate})
    trial = study.ask()
    trial.suggest_float("rate", 0.0, 0.5)
    trial.set_user_attr(DELTA_KEY, delta)
    return trial


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_gate_stops_a_trial_predicted_out_of_the_top_quarter(direction: str) -> None:
    study = _study(direction)
    _trained_trials(study)

    # the top quarter of 16 is rates up to 0.1; the model learned that the metric falls with it
    assert not _enqueued(study, 0.02).should_prune()
    doomed = _enqueued(study, 0.45)
    assert doomed.should_prune()
    verdict = study.pruner.verdict(study, study.trials[doomed.number])
    assert verdict is not None and verdict.past
    assert "the top 25 % of 16 trials that trained" in verdict.reason


def test_the_cost_gate_does_not_look_at_delta_once_it_has_learned() -> None:
    study = _study()
    _trained_trials(study)
    # Δ = 0.2 is far past the fixed threshold, but every trained trial had Δ = 1: the model
    # has no evidence on Δ, and the rate predicts a top-quarter metric
    assert not _enqueued(study, 0.02, delta=0.2).should_prune()


def test_before_learn_after_trials_the_fixed_delta_threshold_applies() -> None:
    study = _study()
    _trained_trials(study, n=9)
    assert study.pruner.cost_verdict(study, study.trials[-1], 0) is None
    assert _enqueued(study, 0.45, delta=1.0).should_prune() is False
    assert _enqueued(study, 0.02, delta=0.3).should_prune() is True


def test_a_model_without_skill_stops_nothing() -> None:
    # the metric is noise around 0.9, whatever the rate: every forecast is the mean, and with
    # the line at the top quarter and optimism 0, a gate reading it would stop almost all
    study = _study(optimism=0.0)
    rng = random.Random(3)
    for i in range(16):
        study.add_trial(
            create_trial(
                value=0.9 + rng.gauss(0, 0.01),
                params={"rate": 0.5 * i / 15},
                distributions={"rate": RATE},
                user_attrs={DELTA_KEY: 1.0},
            )
        )
    trial = _enqueued(study, 0.45)
    assert not trial.should_prune()
    verdict = study.pruner.verdict(study, study.trials[trial.number])
    assert verdict is not None and not verdict.past
    assert "no better than their mean" in verdict.reason


def test_optimism_keeps_trials_the_model_is_unsure_of() -> None:
    strict, lenient = _study(optimism=0.0), _study(optimism=50.0)
    for study in (strict, lenient):
        _trained_trials(study)
    assert _enqueued(strict, 0.2).should_prune()
    assert not _enqueued(lenient, 0.2).should_prune()


def test_exploring_trials_train_past_the_cost_gate() -> None:
    pruner = VarianceShiftPruner(NopPruner(), exploration=1.0, learn_after=10)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    _trained_trials(study)
    trial = _enqueued(study, 0.45)
    assert pruner.verdict(study, study.trials[trial.number]).past
    assert not trial.should_prune()


def test_after_the_first_epoch_the_gate_reads_its_metric() -> None:
    study = _study()
    _trained_trials(study)
    # a rate the model likes, but a first epoch far below that of the good trials
    trial = _enqueued(study, 0.02)
    assert not trial.should_prune()
    trial.report(0.4, 1)
    assert trial.should_prune()
    # and a first epoch like the best trials' passes
    good = _enqueued(study, 0.02)
    good.report(0.85, 1)
    assert not good.should_prune()


def test_the_gate_decides_again_after_each_of_the_first_cost_steps_epochs() -> None:
    study = _study(cost_steps=2)
    rng = random.Random(1)
    for i in range(16):  # the metric climbs 0.1 an epoch towards a final that falls with the rate
        rate = 0.5 * i / 15
        final = 0.95 - 0.4 * rate + rng.gauss(0, 0.003)
        curve = {epoch: final - 0.1 * (4 - epoch) for epoch in (1, 2, 3)}
        study.add_trial(
            create_trial(
                value=final,
                params={"rate": rate},
                distributions={"rate": RATE},
                user_attrs={DELTA_KEY: 1.0},
                intermediate_values=curve,
            )
        )
    # a good rate and a first epoch like the best trials', then a second far below theirs
    trial = _enqueued(study, 0.02)
    trial.report(0.65, 1)
    assert not trial.should_prune()
    trial.report(0.3, 2)
    assert trial.should_prune()
    # the same fall after epoch 3 is past cost_steps: the base alone decides (NopPruner)
    late = _enqueued(study, 0.02)
    for epoch, value in ((1, 0.65), (2, 0.75), (3, 0.3)):
        late.report(value, epoch)
    assert not late.should_prune()


def test_an_epoch_whose_metric_is_not_finite_gets_no_forecast() -> None:
    # without its metric the row would read 0 where every trained trial had one: no verdict,
    # the base decides (NopPruner)
    study = _study()
    _trained_trials(study)
    trial = _enqueued(study, 0.02)
    trial.report(float("nan"), 1)
    assert study.pruner.cost_verdict(study, study.trials[trial.number], 1) is None
    assert not trial.should_prune()


def test_past_cost_steps_the_base_alone_decides() -> None:
    study = _study(cost_steps=0)
    _trained_trials(study)
    trial = _enqueued(study, 0.02)
    trial.report(0.4, 1)
    assert not trial.should_prune()  # the base is NopPruner


def test_gate_delta_keeps_the_line_on_delta() -> None:
    study = _study(gate="delta", learn_threshold=False)
    _trained_trials(study)
    assert study.pruner.cost_verdict(study, study.trials[-1], 0) is None
    assert not _enqueued(study, 0.45, delta=1.0).should_prune()
    assert _enqueued(study, 0.02, delta=0.3).should_prune()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gate": "metric"}, "The gate is one of cost, delta"),
        ({"quantile": 1.0}, "The quantile is a share in"),
        ({"optimism": -1.0}, "Optimism cannot be negative"),
        ({"cost_steps": -1}, "cost_steps cannot be negative"),
        ({"learn_after": 2}, "A cost model needs at least 3 trials"),
    ],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VarianceShiftPruner(**settings)


def test_it_drives_study_optimize_and_stops_the_bad_half_before_training() -> None:
    pruner = VarianceShiftPruner(NopPruner(), exploration=0.0, learn_after=8, seed=0)
    study = optuna.create_study(
        direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def objective(trial: optuna.Trial) -> float:
        rate = trial.suggest_float("rate", 0.0, 0.5)
        trial.set_user_attr(DELTA_KEY, 1.0)
        if trial.should_prune():
            raise optuna.TrialPruned()
        score = 0.95 - 0.4 * rate
        for epoch in range(1, 4):
            trial.report(score - 0.1 / epoch, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return score

    study.optimize(objective, n_trials=40)
    late = study.trials[10:]
    gated = [t for t in late if t.state == TrialState.PRUNED and not t.intermediate_values]
    trained = [t for t in late if t.state == TrialState.COMPLETE]
    # once it has learned, a high rate stops before training and a low one trains
    assert gated and trained
    assert min(t.params["rate"] for t in gated) > max(t.params["rate"] for t in trained)
    assert study.best_params["rate"] < 0.1

"""autotune.pruners.VarianceShiftPruner in plain Optuna: in-memory studies, ask/report/tell."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
from optuna.pruners import (
    BasePruner,
    HyperbandPruner,
    MedianPruner,
    NopPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
)
from optuna.trial import TrialState

from autotune.pruners import DELTA_KEY, MIN_LEARNED_DISTANCE, VarianceShiftPruner, shift_distance

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOG2 = math.log(2.0)  # |log Δ| at the default threshold 0.5, and at 2


class _PruneOnceReported(BasePruner):
    """A base that prunes whenever it is asked after a report: shows exactly when it is asked."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.last_step is not None


class _AlwaysPrune(BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def _study(pruner: BasePruner, direction: str = "maximize") -> optuna.Study:
    return optuna.create_study(direction=direction, pruner=pruner)


def _ask(study: optuna.Study, delta: float | None) -> optuna.Trial:
    """A new trial carrying `delta` as its predicted worst Δ (none when delta is None)."""
    trial = study.ask()
    if delta is not None:
        trial.set_user_attr(DELTA_KEY, delta)
    return trial


def _complete(
    study: optuna.Study, values: dict[int, float], delta: float | None = 1.0, value: float = 0.0
) -> None:
    """A finished trial with `values` reported at their steps, never asked whether to prune."""
    trial = _ask(study, delta)
    for step, intermediate in values.items():
        trial.report(intermediate, step)
    study.tell(trial, value)


def _first_pruned_step(study: optuna.Study, delta: float, value: float, steps: int) -> int | None:
    """Report `value` at steps 1..steps; the step at which the pruner first says prune."""
    trial = _ask(study, delta)
    for step in range(1, steps + 1):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return step
    study.tell(trial, value)
    return None


# --- (a) the gate --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "gated"),
    [
        (0.3, True),  # past 0.5: stopped
        (0.49, True),
        (0.5, False),  # on the line: trains
        (0.7, False),
        (1.0, False),
        (1.9, False),
        (2.0, False),  # |log 2| = |log 0.5|: on the line from above
        (2.1, True),  # past 1/0.5 = 2: |log Δ| is symmetric, so stopped too
        (10.0, True),
    ],
)
def test_the_gate_prunes_a_shifted_trial_before_any_report(delta: float, gated: bool) -> None:
    study = _study(
        VarianceShiftPruner(
            MedianPruner(), threshold=0.5, exploration=0.0, learn_threshold=False, patience=2
        )
    )
    trial = _ask(study, delta)

    # nothing reported yet: the gate alone decides, on |log Δ| against |log 0.5|
    assert trial.should_prune() is gated
    # the gate's line is |log threshold|
    assert study.pruner.gate_distance(study) == pytest.approx(LOG2)


def test_a_gated_trial_ends_pruned_without_values_and_a_passing_one_trains_on() -> None:
    study = _study(
        VarianceShiftPruner(threshold=0.5, exploration=0.0, learn_threshold=False, patience=2)
    )
    shifted, fine = _ask(study, 0.3), _ask(study, 0.9)

    # Δ = 0.3 is stopped before it reports; Δ = 0.9 is not
    assert shifted.should_prune() and not fine.should_prune()
    study.tell(shifted, state=TrialState.PRUNED)
    fine.report(0.5, 1)
    # the gated trial is PRUNED and reported nothing
    frozen = study.trials[0]
    assert frozen.state == TrialState.PRUNED
    assert frozen.values is None and frozen.intermediate_values == {}
    # the trial inside the line reports, and the gate (with no base) never stops it afterwards
    assert not fine.should_prune()


# --- (b) exploration -----------------------------------------------------------------------------


@pytest.mark.parametrize("exploration", [0.1, 0.25, 0.5])
def test_the_share_of_gated_trials_that_explore_is_the_exploration(exploration: float) -> None:
    pruner = VarianceShiftPruner(
        threshold=0.5, exploration=exploration, seed=3, learn_threshold=False, patience=2
    )
    share = sum(pruner.explores(number) for number in range(2000)) / 2000

    # a Bernoulli(exploration) draw per trial number: within 0.03 (more than 4 sd at 2000 draws)
    assert abs(share - exploration) < 0.03, f"explore share {share:.3f}, expected {exploration}"


def test_which_trials_explore_is_fixed_by_trial_number_and_seed() -> None:
    pruner = VarianceShiftPruner(
        threshold=0.5, exploration=0.3, seed=3, learn_threshold=False, patience=2
    )
    study = _study(pruner)
    trials = [_ask(study, 0.2) for _ in range(60)]
    first = [t.should_prune() for t in trials]

    # every trial past the line is gated unless its number explores
    assert first == [not pruner.explores(t.number) for t in trials]
    # both kinds occur among 60 trials at 30 %
    assert any(first) and not all(first)
    # asking again gives the same answer
    assert [t.should_prune() for t in trials] == first
    # a new pruner with the same seed picks the same trials; another seed picks others
    same = VarianceShiftPruner(
        threshold=0.5, exploration=0.3, seed=3, learn_threshold=False, patience=2
    )
    other = VarianceShiftPruner(
        threshold=0.5, exploration=0.3, seed=4, learn_threshold=False, patience=2
    )
    assert [same.explores(n) for n in range(60)] == [pruner.explores(n) for n in range(60)]
    assert [other.explores(n) for n in range(60)] != [pruner.explores(n) for n in range(60)]


@pytest.mark.parametrize(("exploration", "gated"), [(1.0, False), (0.0, True)])
def test_exploration_one_gates_nothing_and_zero_gates_every_shifted_trial(
    exploration: float, gated: bool
) -> None:
    study = _study(
        VarianceShiftPruner(
            threshold=0.5, exploration=exploration, learn_threshold=False, patience=2
        )
    )
    answers = {_ask(study, delta).should_prune() for delta in (0.1, 0.3, 3.0, 20.0) * 25}

    # 100 trials past the line: all train at 1, none at 0
    assert answers == {gated}


# --- (c) a median or percentile base near Δ = 1 --------------------------------------------------


def _median_study() -> optuna.Study:
    """Four completed trials scoring 0.2, 0.4, 0.6, 0.8 at each of steps 1..4, maximized.

    The median at each step is 0.5 and the top quarter's edge (numpy's 75th percentile, linear)
    is 0.65. The base's n_warmup_steps=1 lets it prune from step 1, the first epoch.
    """
    base = MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    pruner = VarianceShiftPruner(
        base, threshold=0.5, exploration=0.0, strictness=0.5, patience=2, learn_threshold=False
    )
    study = _study(pruner)
    for score in (0.2, 0.4, 0.6, 0.8):
        _complete(study, {step: score for step in range(1, 5)}, value=score)
    return study


def test_near_delta_one_a_trial_below_the_median_gets_the_patience_epochs() -> None:
    study = _median_study()

    # the median alone stops a trial at 0.45 < 0.5 at its first epoch past warm-up
    trial = _ask(study, None)
    trial.report(0.45, 1)
    assert study.pruner.base.prune(study, study.trials[trial.number])
    # at Δ = 1 (closeness 1) the warm-up grows by patience 2: steps 1 and 2 are spared, step 3 not
    assert _first_pruned_step(study, 1.0, 0.45, 4) == 3
    # at Δ = 0.5 or 2 (closeness 0) there is no grace: the same values stop at step 1
    assert _first_pruned_step(study, 0.5, 0.45, 4) == 1
    assert _first_pruned_step(study, 2.0, 0.45, 4) == 1


def test_far_from_delta_one_the_percentile_is_stricter() -> None:
    study = _median_study()

    # 0.55 is above the median 0.5: at Δ = 1 the median keeps it to the end
    assert _first_pruned_step(study, 1.0, 0.55, 4) is None
    # at the threshold the percentile is 50·(1 − 0.5) = 25: only the top quarter (above 0.65)
    # survives, so 0.55 stops at the first epoch past warm-up
    assert _first_pruned_step(study, 0.5, 0.55, 4) == 1
    assert _first_pruned_step(study, 2.0, 0.55, 4) == 1
    # above the top quarter it survives there too
    assert _first_pruned_step(study, 0.5, 0.7, 4) is None


def _expected_percentile(base_percentile: float, delta: float, strictness: float = 0.5) -> float:
    """The docstring's rule: percentile · (1 − strictness · (1 − c)), c = 1 − |log Δ| / log 2."""
    closeness = max(0.0, 1.0 - abs(math.log(delta)) / LOG2)
    return base_percentile * (1.0 - strictness * (1.0 - closeness))


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("base_percentile", [50.0, 40.0])
@pytest.mark.parametrize("delta", [1.0, 0.8, 0.6, 0.5, 1 / 0.6, 0.2])
def test_the_effective_percentile_follows_the_closeness(
    direction: str, base_percentile: float, delta: float
) -> None:
    if base_percentile == 50.0:
        base: BasePruner = MedianPruner(n_startup_trials=0, n_warmup_steps=0)
    else:
        base = PercentilePruner(base_percentile, n_startup_trials=0, n_warmup_steps=0)
    pruner = VarianceShiftPruner(
        base, threshold=0.5, exploration=1.0, patience=2, learn_threshold=False
    )
    study = _study(pruner, direction)
    for i in range(101):  # scores 0.00, 0.01, ..., 1.00 at step 3: numpy's q-th percentile is q/100
        _complete(study, {3: i / 100}, value=i / 100)
    keep = _expected_percentile(base_percentile, delta) / 100  # the share of trials kept
    cutoff = 1.0 - keep if direction == "maximize" else keep
    worse = -0.005 if direction == "maximize" else 0.005

    def pruned(score: float) -> bool:
        trial = _ask(study, delta)
        trial.report(score, 3)  # step 3: past any warm-up the patience adds
        return trial.should_prune()

    # just on the worse side of the effective percentile's cutoff: pruned
    assert pruned(cutoff + worse), f"Δ={delta}: expected cutoff {cutoff:.4f}"
    # just on the better side: kept
    assert not pruned(cutoff - worse), f"Δ={delta}: expected cutoff {cutoff:.4f}"


# --- (d) no gate: nothing reported, nothing pruned -----------------------------------------------


@pytest.mark.parametrize("delta", [1e-3, 0.3, 1.0, 5.0, 1e3])
@pytest.mark.parametrize("base", [None, MedianPruner(n_startup_trials=0), _AlwaysPrune()])
def test_without_a_gate_a_trial_that_reported_nothing_is_never_pruned(
    delta: float, base: BasePruner | None
) -> None:
    study = _study(
        VarianceShiftPruner(
            base, threshold=None, exploration=0.0, learn_threshold=False, patience=2
        )
    )
    _complete(study, {1: 0.9}, value=0.9)
    trial = _ask(study, delta)

    # threshold None: no gate, whatever Δ, even with a base that would prune anything
    assert not trial.should_prune()
    # and the gate's line is None
    assert study.pruner.gate_distance(study) is None


def test_without_a_gate_and_before_learning_nothing_is_gated() -> None:
    pruner = VarianceShiftPruner(
        gate="delta", threshold=None, learn_threshold=True, learn_after=3, patience=2
    )
    study = _study(pruner)
    _complete(study, {1: 0.9}, delta=1.0, value=0.9)

    # one completed trial of three: nothing learned yet and no fixed line, so no gate
    assert not _ask(study, 0.01).should_prune()


# --- (e) no predicted Δ: the base alone ----------------------------------------------------------


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_trial_without_a_predicted_delta_gets_the_base_pruners_answer(direction: str) -> None:
    base = MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    wrapped = VarianceShiftPruner(
        base, threshold=0.5, exploration=0.0, patience=3, learn_threshold=False
    )
    study = _study(wrapped, direction)
    for score in (0.2, 0.4, 0.6, 0.8):
        _complete(study, {step: score for step in range(4)}, delta=0.3, value=score)
    answers = []
    for score in (0.1, 0.3, 0.5, 0.7, 0.9):
        trial = _ask(study, None)
        for step in range(4):
            trial.report(score, step)
            frozen = study.trials[trial.number]
            answers.append((wrapped.prune(study, frozen), base.prune(study, frozen)))

    # the wrapper says exactly what the median says, step by step
    assert [mine for mine, _ in answers] == [theirs for _, theirs in answers]
    # and the median did prune some and keep some: the comparison is not vacuous
    assert {mine for mine, _ in answers} == {True, False}


def test_a_trial_without_a_predicted_delta_is_not_gated() -> None:
    study = _study(
        VarianceShiftPruner(
            NopPruner(), threshold=0.5, exploration=0.0, learn_threshold=False, patience=2
        )
    )

    # no predicted Δ, nothing reported: the base (which never prunes) decides, not the gate
    assert not _ask(study, None).should_prune()


# --- (f) other bases: a delayed decision ---------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "pruned_at"),
    [
        (1.0, 3),  # closeness 1: round(2 · 1) = 2 epochs past the first
        (0.8, 2),  # closeness 1 − log 1.25 / log 2 = 0.68: round(1.36) = 1 epoch
        (1.25, 2),  # the same closeness from above
        (0.6, 2),  # closeness 0.26: round(0.53) = 1 epoch
        (0.55, 1),  # closeness 0.14: round(0.28) = 0, at once
        (0.5, 1),  # closeness 0: the base's decision stands at once
        (0.2, 1),  # past the line (an exploring trial): closeness 0 as well
    ],
)
def test_another_base_is_honoured_after_patience_times_closeness_epochs(
    delta: float, pruned_at: int
) -> None:
    pruner = VarianceShiftPruner(
        _PruneOnceReported(), threshold=0.5, exploration=1.0, patience=2, learn_threshold=False
    )
    closeness = max(0.0, 1.0 - abs(math.log(delta)) / LOG2)

    # the hand-computed step is the rule's: round(patience · closeness) epochs past the first
    assert pruned_at == 1 + round(2 * closeness)
    # the base prunes at every report; the wrapper lets it act only from that step on
    assert _first_pruned_step(_study(pruner), delta, 0.5, 5) == pruned_at


def test_a_successive_halving_base_is_delayed_near_delta_one() -> None:
    base = SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    study = _study(
        VarianceShiftPruner(base, threshold=0.5, exploration=0.0, patience=2, learn_threshold=False)
    )

    # the first trial at rung 0 (step 1) is promoted: it is the best so far
    assert _first_pruned_step(study, 0.5, 0.9, 1) is None
    # at closeness 0 a worse trial is stopped at rung 0, its first report
    assert _first_pruned_step(study, 0.5, 0.1, 3) == 1
    # at Δ = 1 the rung-0 verdict falls within the round(2 · 1) = 2 epochs of grace: waived, and
    # with no rival at the later rungs the trial runs on
    trial = _ask(study, 1.0)
    verdicts = []
    for step, value in ((1, 0.1), (2, 0.95), (3, 0.95)):
        trial.report(value, step)
        verdicts.append(trial.should_prune())
    assert verdicts == [False, False, False]
    # the base was still asked at every report: rung 0 holds the step-1 value, not a later one
    assert study._storage.get_trial(trial._trial_id).system_attrs["completed_rung_0"] == 0.1


def test_a_hyperband_base_runs_inside_the_wrapper() -> None:
    base = HyperbandPruner(min_resource=1, max_resource=4, reduction_factor=2)
    study = _study(
        VarianceShiftPruner(base, threshold=0.5, exploration=0.0, patience=0, learn_threshold=False)
    )
    for score in (0.9, 0.8, 0.7, 0.6):
        _first_pruned_step(study, 0.9, score, 4)
    stopped = [_first_pruned_step(study, 0.9, 0.01, 4) for _ in range(6)]

    # hyperband's brackets work through the wrapper: a trial far worse than all is stopped
    assert any(step is not None for step in stopped), stopped


# --- (g) the learned threshold -------------------------------------------------------------------

# (rank, Δ): rank 0 is the best; 8 trials, so the best quarter is ranks 0 and 1
RANKED = [(0, 0.8), (1, 1.1), (2, 0.6), (3, 0.4), (4, 1.0), (5, 0.3), (6, 3.0), (7, 0.95)]


def _learning_study(direction: str, ranked: list[tuple[int, float]]) -> optuna.Study:
    pruner = VarianceShiftPruner(
        gate="delta",
        threshold=0.5,
        exploration=0.0,
        learn_threshold=True,
        learn_after=8,
        margin=1.25,
        patience=2,
    )
    study = _study(pruner, direction)
    for rank, delta in ranked:
        score = 1.0 - rank / 10 if direction == "maximize" else rank / 10
        _complete(study, {1: score}, delta=delta, value=score)
    return study


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_before_learn_after_trials_the_fixed_threshold_applies(direction: str) -> None:
    study = _learning_study(direction, RANKED[:7])

    # seven completed trials of eight: the line is still |log 0.5|
    assert study.pruner.gate_distance(study) == pytest.approx(LOG2)
    assert study.pruner.learned_distance(study) is None
    # so Δ = 0.7 trains and Δ = 0.4 does not
    assert not _ask(study, 0.7).should_prune()
    assert _ask(study, 0.4).should_prune()


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_after_learn_after_trials_the_best_quarter_sets_the_line(direction: str) -> None:
    study = _learning_study(direction, RANKED)
    learned = max(abs(math.log(0.8)), abs(math.log(1.1))) * 1.25  # the best two: 0.8 and 1.1

    # the line is the best quarter's widest |log Δ| times the margin: Δ ≈ 0.757
    assert study.pruner.gate_distance(study) == pytest.approx(learned)
    # Δ = 0.7 passed the fixed line 0.5 but is more shifted than the learned one: gated
    assert _ask(study, 0.7).should_prune()
    assert _ask(study, 1 / 0.7).should_prune()
    # Δ = 0.78 is inside it
    assert not _ask(study, 0.78).should_prune()


def test_trials_without_a_predicted_delta_do_not_count_towards_learning() -> None:
    study = _learning_study("maximize", RANKED[:7])
    _complete(study, {1: 0.99}, delta=None, value=0.99)

    # eight completed trials, but one predicted nothing: still the fixed line
    assert study.pruner.learned_distance(study) is None


def test_the_learned_line_never_comes_closer_to_one_than_delta_point_nine() -> None:
    ranked = [(0, 1.0), (1, 0.98), *RANKED[2:]]
    study = _learning_study("maximize", ranked)

    # the best quarter is barely shifted: the floor |log 0.9| times the margin applies
    assert study.pruner.gate_distance(study) == pytest.approx(abs(math.log(0.9)) * 1.25)
    assert pytest.approx(abs(math.log(0.9))) == MIN_LEARNED_DISTANCE
    # so a trial at Δ = 0.9 still trains, one at 0.85 does not
    assert not _ask(study, 0.9).should_prune()
    assert _ask(study, 0.85).should_prune()


# --- (h) errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"threshold": 1.0}, "threshold=1.0"),
        ({"threshold": 0.0}, "threshold=0.0"),
        ({"threshold": 2.0}, "threshold=2.0"),
        ({"exploration": -0.1}, "exploration=-0.1"),
        ({"exploration": 1.5}, "exploration=1.5"),
        ({"strictness": 1.0}, "strictness=1.0"),
        ({"strictness": -0.5}, "strictness=-0.5"),
        ({"patience": -1}, "patience=-1"),
        ({"learn_after": 0}, "learn_after=0"),
        ({"margin": 0.9}, "margin=0.9"),
    ],
)
def test_constructor_errors_name_the_argument_and_its_value(kwargs: dict, named: str) -> None:
    # one ValueError per rule, naming the argument and the value it got
    with pytest.raises(ValueError, match=named):
        VarianceShiftPruner(**kwargs)


@pytest.mark.parametrize("delta", [0.0, -0.5, math.nan, math.inf])
def test_shift_distance_refuses_a_non_positive_or_non_finite_delta(delta: float) -> None:
    # Δ is a ratio of variances: positive and finite
    with pytest.raises(ValueError, match="positive and finite"):
        shift_distance(delta)


@pytest.mark.parametrize("delta", [0.5, 0.3, 0.9, 1.0])
def test_shift_distance_is_symmetric_in_delta_and_its_inverse(delta: float) -> None:
    # |log Δ| = |log 1/Δ|, a hand-computed value
    assert shift_distance(delta) == pytest.approx(shift_distance(1 / delta))
    assert shift_distance(delta) == pytest.approx(-math.log(delta))


# --- (i) as the study's pruner -------------------------------------------------------------------


@pytest.mark.parametrize(
    "base",
    [
        MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
        HyperbandPruner(min_resource=1, max_resource=5, reduction_factor=2),
    ],
)
def test_it_drives_study_optimize(base: BasePruner) -> None:
    pruner = VarianceShiftPruner(
        base,
        gate="delta",
        threshold=0.5,
        exploration=0.2,
        seed=1,
        learn_threshold=False,
        patience=2,
    )
    study = optuna.create_study(
        direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def objective(trial: optuna.Trial) -> float:
        delta = trial.suggest_float("delta", 0.1, 10.0, log=True)
        trial.set_user_attr(DELTA_KEY, delta)
        if trial.should_prune():  # the gate, before any epoch
            raise optuna.TrialPruned()
        score = 1.0 - abs(math.log(delta)) / 3
        for epoch in range(1, 6):
            trial.report(score * epoch / 5, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return score

    study.optimize(objective, n_trials=40)
    gated = [
        t
        for t in study.trials
        if shift_distance(t.params["delta"]) > LOG2 and not pruner.explores(t.number)
    ]

    # the seeded draw puts trials both inside and past the line
    assert 0 < len(gated) < len(study.trials)
    # every trial past the line that does not explore ended PRUNED before its first report
    for trial in gated:
        assert trial.state == TrialState.PRUNED
        assert trial.values is None and trial.intermediate_values == {}
    # every other trial reported at least one epoch
    for trial in study.trials:
        if trial not in gated:
            assert trial.intermediate_values, trial.number


def test_the_defaults_are_the_benchmarked_ones() -> None:
    pruner = VarianceShiftPruner()
    # the learned gate and no extra warm-up: the variant that met the benchmark's claim
    assert pruner.learn_threshold is True and pruner.patience == 0
    # over no base, a gate at Δ 0.5 with a tenth exploring
    assert isinstance(pruner.base, NopPruner)
    assert (pruner.threshold, pruner.exploration) == (0.5, 0.1)


def test_the_public_path_needs_optuna_alone() -> None:
    code = (
        "import sys\n"
        "from autotune.pruners import VarianceShiftPruner\n"
        "from autotune.search.pruners import VarianceShiftPruner as inner\n"
        "assert VarianceShiftPruner is inner\n"
        "print(','.join(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""

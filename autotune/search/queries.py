"""Read-only questions about a stored study: which trials finished, the best and the top ones,
how many are in each state, a trial's configuration, and which trial the study recommends.

The answers come from the Optuna storage alone, so `export`, `report`, the progress bar and the
end of a run ask the same questions of a study run anywhere. The robust ranking is read here
(`current_ranking`, `recommended_trial`, `kept_digest`); `autotune.run.robust` writes it.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.core.direction import best_first, maximizes
from autotune.core.names import (
    CONFIG_ATTR,
    RECALIBRATE_ATTR,
    ROBUST_ATTR,
    TEST_ATTR,
    WEIGHTS_DIGEST,
)
from autotune.core.space import TrialConfig
from autotune.core.spec import Spec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def count_finished(study: optuna.Study) -> int:
    """The trials that spent the budget: COMPLETE or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial, or None when no trial has completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def state_counts(study: optuna.Study) -> dict[str, int]:
    """How many trials are in each state, by state name."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def top_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    """The k best COMPLETE trials, best first."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    return best_first(complete, maximizes(study), key=lambda t: t.value)[:k]


def trial_config(trial: FrozenTrial) -> TrialConfig:
    """The configuration a trial ran, from its user attrs."""
    attrs = trial.user_attrs
    return TrialConfig.from_dicts(
        attrs[CONFIG_ATTR], recalibrate_bn=attrs.get(RECALIBRATE_ATTR, False)
    )


def distinct_top(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k best complete trials with different configurations (TPE may try one twice)."""
    seen, top = set(), []
    for trial in top_trials(study, len(study.trials)):
        key = repr(trial_config(trial))
        if key not in seen:
            seen.add(key)
            top.append(trial)
        if len(top) == k:
            break
    return top


def current_ranking(study: optuna.Study, spec: Spec) -> dict[str, Any] | None:
    """The stored robust ranking while it still answers the spec: recommend.top_k asks for one
    and it was made from today's top configurations; else None."""
    stored = study.user_attrs.get(ROBUST_ATTR)
    if spec.recommend.top_k == 0 or stored is None:
        return None
    trained = [row[1] for row in stored["signature"]["candidates"] if row[1] is not None]
    today = [t.number for t in distinct_top(study, spec.recommend.top_k)]
    return stored if trained == today else None


def current_choice(study: optuna.Study, spec: Spec) -> int | None:
    """The stored robust choice while it still answers the spec (current_ranking)."""
    ranking = current_ranking(study, spec)
    return None if ranking is None else ranking.get("choice")


def recommended_trial(study: optuna.Study, spec: Spec) -> FrozenTrial | None:
    """The trial the study recommends: the robust choice when there is a current one, else the
    best trial."""
    choice = current_choice(study, spec)
    return study.trials[choice] if choice is not None else best_trial(study)


def kept_digest(study: optuna.Study, number: int) -> str | None:
    """The digest of the weights the robust phase kept for trial `number`, if it kept any."""
    stored = study.user_attrs.get(ROBUST_ATTR) or {}
    for row in stored.get("rows", []):
        if row["trial"] == number:
            return row.get(WEIGHTS_DIGEST)
    return None


def weights_digest(study: optuna.Study, trial: FrozenTrial) -> str | None:
    """The digest of the trial's saved weights: its own record, or the robust phase's where it
    trained the trial again and kept those."""
    return trial.user_attrs.get(WEIGHTS_DIGEST) or kept_digest(study, trial.number)


def current_scores(study: optuna.Study, chosen: FrozenTrial | None) -> dict[str, Any] | None:
    """The stored test scores while they are the recommended trial's (a resumed study may come
    to recommend another, not yet scored)."""
    stored = study.user_attrs.get(TEST_ATTR)
    if stored is None or chosen is None or stored.get("trial") != chosen.number:
        return None
    return stored


def held_out_key(metric: str) -> str:
    """What the test split reports of the study's metric: the accuracy for val_acc, the loss
    for the losses."""
    return "acc" if metric == "val_acc" else "loss"

"""Read-only questions about a stored study: which trials finished, the best and the top ones,
how many are in each state, a trial's configuration, and which trial the study recommends.

The answers come from the Optuna storage alone, so `export`, `report`, the progress bar and the
end of a run ask the same questions of a study run anywhere. The robust ranking is read here
(`current_ranking`, `recommended_trial`, `kept_digest`); `autotune.run.robust` writes it.
"""

from __future__ import annotations

import math
from pathlib import Path
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
    baseline_weights,
    trial_weights,
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
    if spec.recommend.wanted_top_k == 0 or stored is None:
        return None
    trained = [row[1] for row in stored["signature"]["candidates"] if row[1] is not None]
    today = [t.number for t in distinct_top(study, spec.recommend.wanted_top_k)]
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


def recommended_baseline(study: optuna.Study, spec: Spec) -> dict[str, Any] | None:
    """The baseline's row of the robust ranking where that ranking recommends it instead of a
    tuned trial (as good and simpler: run.robust.against_baselines); else None."""
    ranking = current_ranking(study, spec) or {}
    name = (ranking.get("verdict") or {}).get("recommend")
    return next((row for row in ranking["rows"] if row["name"] == name), None) if name else None


def recommended_config(study: optuna.Study, spec: Spec) -> tuple[str, TrialConfig] | None:
    """What the study recommends, named ("trial 7", or a baseline's name such as "bn_only"),
    and its configuration; None before any trial completed."""
    baseline = recommended_baseline(study, spec)
    if baseline is not None:
        config = TrialConfig.from_dicts(
            baseline["blocks"], recalibrate_bn=baseline.get("recalibrate_bn", False)
        )
        return baseline["name"], config
    trial = recommended_trial(study, spec)
    return None if trial is None else (f"trial {trial.number}", trial_config(trial))


def recommended_weights(study: optuna.Study, spec: Spec) -> tuple[Path, str | None]:
    """Where the recommendation's weights are saved, and the digest they were saved with (None
    where none was recorded): a baseline's from the robust phase, else the trial's."""
    baseline = recommended_baseline(study, spec)
    if baseline is not None:
        return baseline_weights(spec.output_dir, baseline["name"]), baseline.get(WEIGHTS_DIGEST)
    trial = recommended_trial(study, spec)
    assert trial is not None, "no recommendation before a trial completed"
    return trial_weights(spec.output_dir, trial.number), weights_digest(study, trial)


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


def current_scores(study: optuna.Study, spec: Spec) -> dict[str, Any] | None:
    """The stored test scores while they are the recommendation's (a resumed study may come
    to recommend another, not yet scored)."""
    stored = study.user_attrs.get(TEST_ATTR)
    chosen = recommended_config(study, spec)
    if stored is None or chosen is None or stored.get("recommended") != chosen[0]:
        return None
    return stored


def held_out_key(metric: str) -> str:
    """What the test split reports of the study's metric: the accuracy for val_acc, the loss
    for the losses."""
    return "acc" if metric == "val_acc" else "loss"

"""How each trial ended, and why, from the Optuna storage alone.

Optuna keeps five states; a user needs to tell apart what they hide. A PRUNED trial either was
stopped in training by the pruner's rule at some epoch, or was gated before training by the
predicted variance shift or cost: no epoch reported, nothing spent. A FAIL trial either failed
(its reason is in `fail_reason`), was interrupted by Ctrl-C or SIGTERM (it resumes: not the
configuration's fault), or never started because other workers took the budget's last slots.
The progress lines, the summary's counts, `autotune trials` and the report all ask here, so they
say the same thing of a study run anywhere, by any version: a study stored before the reasons
were recorded still reads, from its states and its reported epochs.
"""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.core.names import (
    CONFIG_ATTR,
    FAIL_REASON_ATTR,
    INTERRUPTED_ATTR,
    PRUNED_REASON_ATTR,
    SURPLUS_ATTR,
)

COMPLETE, PRUNED, GATED, FAILED = "complete", "pruned", "gated", "failed"
INTERRUPTED, NOT_STARTED, RUNNING, WAITING = "interrupted", "not started", "running", "waiting"
# the order counts are said in; the last four only where there are any
ENDINGS = (COMPLETE, PRUNED, GATED, FAILED, INTERRUPTED, NOT_STARTED, RUNNING, WAITING)
ALWAYS_SAID = (COMPLETE, PRUNED, GATED, FAILED)
WORKER_DIED = "its worker stopped without a word (killed, or its node lost)"


def ending(trial: FrozenTrial) -> str:
    """One of ENDINGS: how the trial ended, or that it has not yet."""
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        return COMPLETE
    if trial.state == TrialState.PRUNED:
        return GATED if trial.last_step is None else PRUNED
    if trial.state == TrialState.FAIL:
        if attrs.get(INTERRUPTED_ATTR):
            return INTERRUPTED
        return NOT_STARTED if attrs.get(SURPLUS_ATTR) else FAILED
    return RUNNING if trial.state == TrialState.RUNNING else WAITING


def epochs_run(trial: FrozenTrial) -> int:
    """The epochs the trial reported: 0 for one gated, not started or failed before training."""
    return max(trial.intermediate_values, default=0)


def why(trial: FrozenTrial) -> str:
    """Why it ended, in a line, without how: the pruner's rule, the gate's prediction, the
    first line of a failure; for a complete trial, nothing."""
    kind = ending(trial)
    if kind in (PRUNED, GATED):
        return _after_colon(trial.user_attrs.get(PRUNED_REASON_ATTR))
    if kind in (FAILED, NOT_STARTED):
        # the objective records every failure it sees: without a reason, its worker died
        reason = trial.user_attrs.get(FAIL_REASON_ATTR) or WORKER_DIED
        return _after_colon(reason, keep=kind == FAILED)
    if kind == INTERRUPTED:
        sampled = trial.params or trial.user_attrs.get(CONFIG_ATTR)
        return "by a signal; its configuration runs again on resume" if sampled else "by a signal"
    return ""


def told(trial: FrozenTrial, metric: str) -> str:
    """The trial's ending as the progress line says it: "complete: val_acc=0.9722 after 12
    epochs", "pruned after epoch 3: ...", "gated before training: predicted Δ ...", "failed:
    ValueError: ..."."""
    kind = ending(trial)
    if kind == COMPLETE:
        value = "no value" if trial.value is None else f"{metric}={trial.value:.4f}"
        return f"complete: {value} after {epochs_run(trial)} epochs"
    said = {PRUNED: f"pruned after epoch {epochs_run(trial)}", GATED: "gated before training"}
    head = said.get(kind, kind)
    reason = why(trial)
    return f"{head}: {reason}" if reason else head


def _after_colon(reason: object, keep: bool = False) -> str:
    """A stored reason's first line, less the "pruned after epoch 3: " it opens with (the
    line says that itself); `keep`: a failure's "ValueError: " stays."""
    lines = str(reason or "").strip().splitlines()
    if not lines:
        return ""
    _, colon, rest = lines[0].partition(": ")
    return lines[0] if keep or not colon else rest


def ending_counts(study: optuna.Study) -> dict[str, int]:
    """How many trials ended each way: every one of ALWAYS_SAID, the others where nonzero."""
    counted = Counter(ending(t) for t in study.get_trials(deepcopy=False))
    return {kind: counted[kind] for kind in ENDINGS if kind in ALWAYS_SAID or counted[kind]}


def counts_line(counts: dict[str, int]) -> str:
    """ "8 complete, 2 pruned, 1 gated, 0 failed": the counts in ENDINGS' order."""
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())

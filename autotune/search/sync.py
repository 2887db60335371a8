"""`sync_study`: what MLflow misses of a study, logged from the Optuna storage (the source of
truth), after the tracking server went away, a worker died, or by `autotune sync`. A trial's
record is a `run_fields.TrialRecord`; `Tracker.log_trial` writes it; one whole run of each
trial is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from autotune.core.names import CONFIG_ATTR, PARENT_ATTR, PARTIAL, RELOGGED_RUN, STATE_TAG
from autotune.search.run_fields import RUN_STATUS, TrialRecord, trial_run_id
from autotune.search.tracking import Tracker

if TYPE_CHECKING:
    import optuna


def sync_study(
    tracker: Tracker, study: optuna.Study, metric: str, only: Iterable[int] | None = None
) -> int:
    """Log to MLflow what it misses of the study, from the Optuna storage: a child run for each
    finished trial that has none whole (its run missing, or cut short because the server went
    away or its worker died: that run is deleted and the trial logged again), and no second
    run of any trial. `only`: these trial numbers. Returns how many trials were logged; the
    parent run is left as it is (finish.sync_parent_run ends one a run could not end).

    Raises when MLflow does not answer."""
    if not tracker.enabled:
        return 0
    known = study.user_attrs.get(PARENT_ATTR)
    tracker.parent_run_id = tracker.find_parent({}, known, resume=False)
    if known != tracker.parent_run_id:
        study.set_user_attr(PARENT_ATTR, tracker.parent_run_id)
    wanted = None if only is None else set(only)
    runs = tracker.trial_runs()
    logged = 0
    trials = study.get_trials(deepcopy=False)
    study_attrs = study.user_attrs  # read once: each read is a query of the storage
    for trial in trials:
        if wanted is not None and trial.number not in wanted:
            continue
        if not trial.state.is_finished() or CONFIG_ATTR not in trial.user_attrs:
            continue  # still running, or ended before it had a configuration: nothing to log
        record = TrialRecord(trial, metric)
        if not any(_is_whole(run, record.state) for run in runs.get(trial.number, [])):
            tracker.log_trial(record)
            logged += 1
            runs[trial.number] = tracker.trial_runs(trial.number).get(trial.number, [])
        kept = _keep_one(tracker, runs.get(trial.number, []), record.state)
        if kept is not None and kept != trial_run_id(study_attrs, trial):
            study.set_user_attr(RELOGGED_RUN.format(trial.number), kept)
        tracker.missed.discard(trial.number)
    return logged


def _keep_one(tracker: Tracker, runs: list[Any], state: str) -> str | None:
    """Delete every run of a trial but one whole run, and return its id. Two processes that log
    the same trial at once each keep the same one: the oldest, then the smallest id."""
    whole = sorted(
        (run for run in runs if _is_whole(run, state)),
        key=lambda run: (run.info.start_time, run.info.run_id),
    )
    for run in runs:
        if not whole or run is not whole[0]:
            tracker.client.delete_run(run.info.run_id)
    return whole[0].info.run_id if whole else None


def _is_whole(run: Any, state: str) -> bool:
    tags = run.data.tags
    return (
        tags.get(STATE_TAG) == state
        and PARTIAL not in tags
        and run.info.status == RUN_STATUS[state]
    )

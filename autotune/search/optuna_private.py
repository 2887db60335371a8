"""Every use of Optuna's private API, in one place: what autotune needs of a study, a trial or a
pruner that Optuna has no public call for.

Written against Optuna 5.0 (pyproject: `optuna>=5`); each function names the internals it relies
on, which are the same in Optuna 3.0 to 5.0. When an upgrade breaks one, it breaks here, and
`tests/test_optuna_private.py` says which. Public calls are used where Optuna has one:
`optuna.storages.fail_stale_trials` (public, experimental) fails the trials whose heartbeat
stopped, and `Study.tell` takes a trial number; neither is wrapped here.

This module imports Optuna alone, so that `autotune.pruners` stays usable in plain Optuna code.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.pruners import PercentilePruner
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes: `Study._storage`.

    A Study takes its storage (a URL or a BaseStorage) in `create_study`/`load_study` and keeps
    it privately: it has no public attribute or method that hands it back."""
    return study._storage


def heartbeats(study: optuna.Study) -> bool:
    """Whether the study's storage keeps trial heartbeats (an RDB storage made with a
    `heartbeat_interval`; never a journal storage).

    `optuna.storages._heartbeat.is_heartbeat_enabled` is private, as is the `BaseHeartbeat` it
    checks for: `get_heartbeat_interval` is a method of RDBStorage and of the private
    `_CachedStorage` that wraps it, not of BaseStorage, so no public call tells."""
    return is_heartbeat_enabled(storage_of(study))


def reload_study(study: optuna.Study) -> optuna.Study:
    """The same study loaded again from the same storage object (not a new connection), so that
    what another process wrote since is read afresh: `optuna.load_study` on `Study._storage`."""
    return optuna.load_study(study_name=study.study_name, storage=storage_of(study))


def frozen_trial(trial: optuna.Trial) -> FrozenTrial:
    """A running trial as its storage holds it now, attrs and reports included: the storage's
    `get_trial` on `Trial._trial_id`, as `Trial.should_prune` itself reads it.

    A Trial has public `number`, `params` and `user_attrs`, but no public call hands back the
    FrozenTrial that a pruner is given."""
    return storage_of(trial.study).get_trial(trial._trial_id)


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason_key: str, reason: str) -> None:
    """Set a user attr on a RUNNING trial that another process owns, then mark it FAIL, as
    `fail_stale_trials` does for a trial whose heartbeat stopped.

    Raises optuna.exceptions.UpdateFinishedTrialError when the trial finished meanwhile.

    Relies on `FrozenTrial._trial_id` and the storage's `set_trial_user_attr` and
    `set_trial_state_values`. A user attr can be set publicly only through the `Trial` that
    `ask` returned in the owning process; `Study.tell(number, state=FAIL)` would change the
    state but also runs the sampler's `after_trial` for a trial it never sampled here."""
    storage = storage_of(study)
    storage.set_trial_user_attr(trial._trial_id, reason_key, reason)
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


def percentile_settings(pruner: PercentilePruner) -> dict[str, Any]:
    """The settings a PercentilePruner (or a MedianPruner, its subclass at 50) was made with, by
    the names of its constructor's arguments.

    PercentilePruner keeps them as private attributes (`_percentile`, `_n_startup_trials`,
    `_n_warmup_steps`, `_interval_steps`, `_n_min_trials`) and has no public getter."""
    return {
        "percentile": pruner._percentile,
        "n_startup_trials": pruner._n_startup_trials,
        "n_warmup_steps": pruner._n_warmup_steps,
        "interval_steps": pruner._interval_steps,
        "n_min_trials": pruner._n_min_trials,
    }

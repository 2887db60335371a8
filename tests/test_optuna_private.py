"""autotune.search.optuna_private against the installed Optuna: each private attribute or function
it relies on is still there and still does what the adapter says. A failure here after an Optuna
upgrade names the function to rewrite."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
from optuna.pruners import MedianPruner, PercentilePruner
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from autotune.search.optuna_private import (
    fail_trial,
    heartbeats,
    percentile_settings,
    reload_study,
    storage_of,
)
from autotune.search.storage import make_storage


def _rdb(tmp_path: Path) -> optuna.Study:
    storage = make_storage(
        f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, heartbeat_grace=2
    )
    return optuna.create_study(study_name="s", storage=storage)


def _journal(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))
    return optuna.create_study(study_name="s", storage=storage)


@pytest.mark.parametrize(("open_", "beats"), [(_rdb, True), (_journal, False)])
def test_the_adapter_reads_and_writes_the_installed_optuna(
    tmp_path: Path, open_, beats: bool
) -> None:
    study = open_(tmp_path)
    assert isinstance(storage_of(study), optuna.storages.BaseStorage)
    assert heartbeats(study) is beats

    # another handle on the same storage sees what this one writes later
    again = reload_study(study)
    assert again.study_name == "s" and storage_of(again) is storage_of(study)
    study.set_user_attr("k", 1)
    assert reload_study(study).user_attrs["k"] == 1

    with warnings.catch_warnings():  # heartbeats are meant for Study.optimize, not ask
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    frozen = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    fail_trial(study, frozen, "why", "its worker stopped")
    failed = study.trials[trial.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["why"] == "its worker stopped"
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        fail_trial(study, failed, "why", "twice")


def test_a_percentile_pruner_is_rebuilt_from_its_settings() -> None:
    pruner = PercentilePruner(
        30.0, n_startup_trials=3, n_warmup_steps=2, interval_steps=4, n_min_trials=5
    )
    settings = percentile_settings(pruner)
    assert settings == {
        "percentile": 30.0,
        "n_startup_trials": 3,
        "n_warmup_steps": 2,
        "interval_steps": 4,
        "n_min_trials": 5,
    }
    assert percentile_settings(PercentilePruner(**settings)) == settings
    median = percentile_settings(MedianPruner(n_startup_trials=7, n_warmup_steps=1))
    assert median["percentile"] == 50.0 and median["n_startup_trials"] == 7

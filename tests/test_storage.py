"""Storage URLs: sqlite, PostgreSQL, a journal file and Redis, from the spec, --storage or the
environment. PostgreSQL and Redis are the real servers on this machine's loopback."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import optuna
import pytest
import redis
from click.testing import CliRunner
from conftest import tiny_spec
from optuna.trial import TrialState

from autotune.cli import main
from autotune.core.errors import SpecError
from autotune.core.names import STORAGE_ENV
from autotune.core.spec import parse_spec
from autotune.run.loop import run_study
from autotune.search.storage import failed_to_connect, make_storage

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
# database 15 (14 for the second of `make test`'s pytest-xdist processes, ...): the tests' own,
# emptied after each
REDIS = f"redis://127.0.0.1:6379/{15 - int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0')[2:])}"


@pytest.fixture
def study_name():
    """A study name no other test run uses; the study is deleted from the servers afterwards."""
    name = f"storage-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(KeyError):  # this test did not use that server
        optuna.delete_study(study_name=name, storage=make_storage(POSTGRES))
    # a Redis journal only grows, and every reader replays it: empty the tests' own database
    redis.Redis.from_url(REDIS).flushdb()


def run_tiny(tmp_path: Path, name: str, storage: str, n_trials: int = 2):
    spec = parse_spec(
        tiny_spec(
            study={"name": name, "n_trials": n_trials, "storage": storage},
            mlflow={"enabled": False},
            output=str(tmp_path / "out"),
        )
    )
    return run_study(spec)


@pytest.mark.parametrize("kind", ["journal", "postgresql", "redis"])
def test_a_study_runs_and_resumes_on_each_storage(tmp_path: Path, study_name: str, kind: str):
    url = {
        "journal": f"journal:///{tmp_path / 'shared' / 'study.journal'}",
        "postgresql": POSTGRES,
        "redis": REDIS,
    }[kind]
    first = run_tiny(tmp_path, study_name, url, n_trials=2)
    # the budget is spent and the outputs written
    assert first.finished == 2 and (tmp_path / "out" / "recommended.yaml").is_file()
    # the same spec with a larger budget resumes the stored study: two trials more, none redone
    again = run_tiny(tmp_path, study_name, url, n_trials=4)
    study = optuna.load_study(study_name=study_name, storage=make_storage(url))
    assert again.finished == 4
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4


def test_a_journal_file_is_created_with_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "nfs" / "deep" / "x.journal"
    storage = make_storage(f"journal:///{path}")
    # a JournalStorage on a file, its folder made
    assert isinstance(storage, optuna.storages.JournalStorage)
    assert path.parent.is_dir()


def test_rdb_storages_keep_heartbeats(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'x.db'}")
    # heartbeats, so a dead worker's trial is failed and retried
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.heartbeat_interval is not None
    assert storage.failed_trial_callback is not None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # an unreachable Redis: said at once, in one line
        ("redis://127.0.0.1:1/0", r"^study\.storage: cannot open 'redis://127\.0\.0\.1:1/0': "),
        # an unreachable PostgreSQL, its password hidden
        (
            "postgresql://postgres:secret@127.0.0.1:1/test",
            r"^study\.storage: cannot open 'postgresql://postgres:\*\*\*@127\.0\.0\.1:1/test': ",
        ),
    ],
)
def test_an_unreachable_storage_is_one_line(url: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        make_storage(url)
    # one line, no password
    assert "\n" not in str(caught.value) and "secret" not in str(caught.value)


def test_the_command_line_and_the_environment_choose_the_storage(
    tmp_path: Path, write_spec, monkeypatch
) -> None:
    spec = write_spec(tiny_spec(study={"n_trials": 1}, mlflow={"enabled": False}))
    from_env = f"journal:///{tmp_path / 'env.journal'}"
    from_flag = f"journal:///{tmp_path / 'flag.journal'}"
    runner = CliRunner()

    # the environment variable stands in for study.storage
    monkeypatch.setenv(STORAGE_ENV, from_env)
    result = runner.invoke(main, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env.journal").is_file()
    # --storage beats the environment
    result = runner.invoke(main, ["run", str(spec), "--storage", from_flag])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flag.journal").is_file()
    # export reads the study where --storage says
    result = runner.invoke(main, ["export", str(spec), "--storage", from_flag])
    assert result.exit_code == 0, result.output
    # and a journal with no such file is bad input, exit 2
    missing = f"journal:///{tmp_path / 'none.journal'}"
    result = runner.invoke(main, ["export", str(spec), "--storage", missing])
    assert result.exit_code == 2


def test_a_storage_that_cannot_be_reached_is_told_from_a_race_by_type(
    tmp_path: Path, monkeypatch
) -> None:
    import sqlalchemy.exc

    from autotune.search import storage

    # SQLAlchemy's error while connecting has no statement; the race to create tables has one
    refused = sqlalchemy.exc.OperationalError(None, None, Exception("refused"))
    race = sqlalchemy.exc.IntegrityError("CREATE TABLE studies ()", {}, Exception("exists"))
    assert failed_to_connect(refused) and not failed_to_connect(race)
    assert not failed_to_connect(RuntimeError("could not connect"))  # not SQLAlchemy's
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
        optuna.storages.RDBStorage("postgresql://postgres@127.0.0.1:1/test")
    assert failed_to_connect(caught.value)  # the real driver's refusal

    calls = []

    def opens(error: Exception):
        def open_(*args, **kwargs):
            calls.append(error)
            if len(calls) == 1:
                raise error
            return "opened"

        return open_

    url = f"sqlite:///{tmp_path / 'o.db'}"
    monkeypatch.setattr(storage.optuna.storages, "RDBStorage", opens(race))
    assert storage._rdb_storage(url, 1, 2) == "opened" and len(calls) == 2  # tried again
    calls.clear()
    monkeypatch.setattr(storage.optuna.storages, "RDBStorage", opens(refused))
    with pytest.raises(sqlalchemy.exc.OperationalError):
        storage._rdb_storage(url, 1, 2)  # not tried again
    assert len(calls) == 1

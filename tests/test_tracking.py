"""autotune.search.tracking: what reaches MLflow, against a local sqlite store."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from autotune.search.run_fields import run_id_or_none, trial_run_id
from autotune.search.tracking import Tracker

SECRET = "s3cr3t-Pw"


def test_params_and_tags_reach_mlflow_redacted(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", "study")
    params = {
        "study.storage": f"postgresql://postgres:{SECRET}@127.0.0.1:5432/db",
        "mlflow.tracking_uri": f"http://user:{SECRET}@mlflow:5000",
        "data.kwargs.password": SECRET,
        "train.lr": 0.001,
    }
    parent = tracker.start_study(params)
    run = tracker.start_trial(0, {"block0.rate": 0.25})
    tracker.end_trial(run, "FAIL", {"autotune.fail_reason": f"cannot reach redis://:{SECRET}@h"})

    client = MlflowClient(uri)
    logged = client.get_run(parent).data.params
    # the parent's params hold no secret; the hosts and every other value stay
    assert logged["study.storage"] == "postgresql://postgres:***@127.0.0.1:5432/db"
    assert logged["mlflow.tracking_uri"] == "http://user:***@mlflow:5000"
    assert logged["data.kwargs.password"] == "***" and logged["train.lr"] == "0.001"
    # nor does a trial's tag
    assert client.get_run(run).data.tags["autotune.fail_reason"] == "cannot reach redis://:***@h"


class Trial:
    def __init__(self, number: int, **attrs) -> None:
        self.number, self.user_attrs = number, attrs


def test_a_stored_run_id_counts_only_in_mlflow_s_form() -> None:
    run_id = "0123456789abcdef0123456789abcdef"
    # a run id is 32 hex digits; anything else read from the storage is not one
    assert run_id_or_none(run_id) == run_id
    assert run_id_or_none('""";__import__("os")') is None
    assert run_id_or_none(run_id + "\n") is None and run_id_or_none(None) is None
    # the one sync logged wins; one that is no run id gives way to the trial's own
    assert trial_run_id({"mlflow_run_id.trial_3": "x" * 32}, Trial(3, mlflow_run_id=run_id)) == (
        run_id
    )
    assert trial_run_id({}, Trial(3, mlflow_run_id="")) is None


def test_what_the_tracker_says_is_redacted() -> None:
    # a note may quote an exception's repr, and the exception a URL with its password
    said: list[str] = []
    tracker = Tracker("sqlite:///unused.db", "exp", "study", notify=said.append)
    tracker.notify("no robust recommendation (OperationalError('postgresql://u:s3cret@db/x'))")
    assert said == ["no robust recommendation (OperationalError('postgresql://u:***@db/x'))"]

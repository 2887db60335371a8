"""autotune.tracking: what reaches MLflow, against a local sqlite store."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from autotune.tracking import Tracker

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

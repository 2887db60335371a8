"""A study written by an earlier version of autotune still exports, syncs, resumes and reports.

tests/data/stored-0.1.0 holds what `autotune run` of version 0.1.0 left in its output folder
(the Optuna sqlite storage, the saved weights, the input statistics; not its MLflow store, as
when a study's storage is copied to another machine). tests/data/README.md says how it was made.
Each test works on a copy."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autotune.cli import main


def invoke(*args: str | Path):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_a_stored_study_exports_its_recommendation_with_its_weights(stored: Path):
    invoke("export", stored, "--format", "yaml", "--format", "py")
    recommendation = yaml.safe_load(Path("out/recommended.yaml").read_text())
    # the best of its three trials, verified against the weights it saved
    assert recommendation["best"]["trial"] == 2
    assert "loads trial_2.pt" in recommendation["verified"]["best_model.py"]
    # the file written is the network of the stored trial, rebuilt
    assert recommendation["model"]["widths"] == [32, 16]


@pytest.mark.slow
def test_a_stored_study_syncs_to_a_new_tracking_store_then_resumes_and_reports(stored: Path):
    # sync: a tracking store that never saw the study gets every trial and a parent run
    result = invoke("sync", stored)
    assert "logged 3 trials" in result.output
    client = MlflowClient("sqlite:///out/mlflow.db")
    experiment = client.get_experiment_by_name("stored")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags["autotune.role"] == "trial"]
    assert sorted(int(r.data.tags["autotune.trial"]) for r in trials) == [0, 1, 2]

    # run with a larger budget: the stored study resumes, one trial more
    result = invoke("run", stored, "--n-trials", "4")
    assert "resuming study 'stored': 3 of 4 trials done" in result.output
    study = optuna.load_study(study_name="stored", storage="sqlite:///out/autotune.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert Path("out/recommended.yaml").is_file() and Path("out/best_model.py").is_file()

    # and the report draws all four
    invoke("report", stored)
    assert Path("out/report.html").is_file()

"""What a user sees of a study in MLflow, against a real `mlflow server`: the experiment opens on
its runs, the trials stand flat with names that say how each ended, one-off values are no
single-point charts, and the recommendation is a logged model that loads in one call. The page
autotune prints is opened in Debian's chromium where it is installed (make test installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_spec
from mlflow.tracking import MlflowClient

import autotune
from autotune.cli import main

CHROMIUM = shutil.which("chromium")


@pytest.fixture
def logged_study(write_spec, mlflow_server, tmp_path: Path):
    """A four-trial study logged to the server; the spec, what `run` printed, and a client."""
    spec = write_spec(
        tiny_spec(study={"name": "ui", "n_trials": 4}, mlflow={"tracking_uri": mlflow_server.uri})
    )
    result = CliRunner().invoke(main, ["run", str(spec)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return spec, result.output, MlflowClient(mlflow_server.uri)


@pytest.mark.slow
def test_mlflow_holds_the_trials_named_and_the_recommendation_as_a_model(logged_study, tmp_path):
    spec, printed, client = logged_study
    experiment = client.get_experiment_by_name("ui")
    # MLflow 3 opens an experiment of this kind on its runs, not its GenAI overview
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    trials = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`autotune.role` = 'trial'"
    )
    # each trial's name says how it ended; its metrics are curves, one point per epoch
    assert sorted(run.info.run_name for run in trials) == [f"trial-{n} complete" for n in range(4)]
    for run in trials:
        assert set(run.data.metrics) <= {"val_acc", "val_loss", "train_loss", "train_acc"}
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2]
        # numbers rounded for display: at most four significant digits
        rate = run.data.params["block0.rate"]
        assert rate == f"{float(rate):.4g}", rate
    # the link autotune printed: the experiment's runs, the trials alone, best first
    [link] = re.findall(r"compare trials: (\S+)", printed)
    assert f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" in link
    assert "orderByKey=metrics.%60val_acc%60&orderByAsc=false" in link
    # the recommendation, where MLflow 3 shows models: its files in the output folder's layout
    [model] = client.search_logged_models([experiment.experiment_id])
    assert model.tags["autotune.recommendation"].startswith("trial ")
    folder = tmp_path / "model"
    files = mlflow_model_files(client, model.model_id, folder)
    assert {"best_model.py", "recommended.yaml", "input_stats.pt"} <= files
    assert any(name.startswith("weights/trial_") for name in files)
    # downloaded, it loads in one call and gives the study's own network
    out = spec.parent / "out"
    raw = torch.randn(5, 1, 8, 8) * 4 + 6
    with torch.no_grad():
        assert torch.equal(autotune.load(folder)(raw), autotune.load(out)(raw))


def mlflow_model_files(client: MlflowClient, model_id: str, folder: Path) -> set[str]:
    """The logged model's files, downloaded into `folder`; their paths in it."""
    from mlflow.artifacts import download_artifacts

    # the tracking URI given, not set: mlflow.set_tracking_uri would leave it in the environment
    where = client.get_logged_model(model_id).artifact_location
    got = Path(download_artifacts(where, dst_path=str(folder), tracking_uri=client.tracking_uri))
    for path in got.iterdir():  # the folder MLflow names after the location's last part
        path.rename(folder / path.name)
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_the_printed_link_opens_on_the_trials_in_a_browser(logged_study):
    _, printed, _ = logged_study
    [link] = re.findall(r"compare trials: (\S+)", printed)
    page = rendered(link, until="matching runs")
    # the trials, flat, each named by how it ended; none hidden under a collapsed parent
    assert {f"trial-{n} complete" for n in range(4)} <= set(re.findall(r"trial-\d+ \w+", page))
    assert "<strong>4</strong> matching runs" in page
    # the runs table, not MLflow 3's GenAI overview of traces
    assert "Detect Issues" not in page and "No data available" not in page


def rendered(url: str, until: str, tries: int = 3) -> str:
    """The page's DOM once MLflow's scripts ran, in headless chromium: tried again (up to
    `tries` times) while `until` is not in it yet, since the page fetches its runs after it
    loads and a busy machine answers late."""
    page = ""
    for _ in range(tries):
        with tempfile.TemporaryDirectory() as profile:
            page = subprocess.run(
                [
                    CHROMIUM,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    f"--user-data-dir={profile}",
                    "--window-size=1500,950",
                    "--virtual-time-budget=20000",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        if until in page:
            break
    return page


def test_names_and_links_are_what_mlflow_and_a_browser_take():
    from autotune.search.mlflow_store import model_name, run_name, trials_link

    # a study's name may hold a dot, which MLflow refuses in a logged model's name
    assert model_name("mnist.v2", "trial 3") == "mnist-v2-trial-3"
    assert model_name("digits", "bn_only") == "digits-bn_only"
    # a pruned trial's name says the epoch, or that it was gated before training
    assert run_name(9, "PRUNED", {"autotune.pruned_epoch": 3}) == "trial-9 pruned@3"
    assert run_name(4, "PRUNED", {"autotune.pruned_epoch": 0}) == "trial-4 gated"
    assert run_name(5, "FAIL", {}) == "trial-5 failed"
    # a server's link without its user and password (redacted or not): the browser asks
    link = trials_link("http://bob:***@gpu-head:5000", "7", "s", "val_loss", maximize=False)
    assert link.startswith("http://gpu-head:5000/#/experiments/7/runs?")
    assert link.endswith("orderByKey=metrics.%60val_loss%60&orderByAsc=true")

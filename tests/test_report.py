"""Pictures of a study and its HTML report: drawn from the storage, logged to MLflow, and opened
in a real headless Chromium to see every picture load."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from mlflow.tracking import MlflowClient

from autotune.cli import main
from autotune.core.spec import load_spec
from autotune.outputs.report import (
    FIGURES,
    CannotDraw,
    _shift,
    _shift_lag,
    write_figures,
    write_report,
)
from autotune.run.loop import run_study


def _chromium() -> str | None:
    """A Chromium that starts (Ubuntu's `chromium` may be a stub that only points to a snap)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path and subprocess.run([path, "--version"], capture_output=True).returncode == 0:
            return path
    return None


CHROMIUM = _chromium()
PNG = b"\x89PNG\r\n\x1a\n"


def loaded_in_chromium(page: Path) -> str:
    """'loaded/total' images, as the page's own script counts them after the load event."""
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    found = re.search(r'<body data-images="(\d+/\d+)"', dom)
    assert found, "the page's check did not run"
    return found.group(1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study of six trials, some pruned, with MLflow on."""
    folder = tmp_path_factory.mktemp("report")
    spec_file = folder / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            tiny_spec(
                study={"name": "pictures", "n_trials": 6, "pruner": "median"},
                output=str(folder / "out"),
            )
        )
    )
    spec = load_spec(spec_file)
    run_study(spec)
    return spec_file, spec


def test_a_run_draws_every_picture_and_logs_it_on_the_parent_run(finished):
    _, spec = finished
    folder = spec.output_dir / "figures"
    # one PNG per picture
    for name in FIGURES:
        assert (folder / f"{name}.png").read_bytes().startswith(PNG)
    # and each on the parent run, under figures/
    client = MlflowClient(spec.tracking_uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("pictures").experiment_id],
        filter_string="tags.`autotune.role` = 'parent'",
    )
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert logged == {f"figures/{name}.png" for name in FIGURES}


def test_a_study_with_nothing_to_draw_still_gets_every_picture(tmp_path: Path):
    study = optuna.create_study(direction="maximize")
    paths = write_figures(study, tmp_path, "val_acc")
    # a panel that says why, not a missing file
    assert [p.name for p in paths] == [f"{name}.png" for name in FIGURES]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_the_report_is_one_file_whose_pictures_all_load_in_chromium(finished):
    spec_file, spec = finished
    result = CliRunner().invoke(main, ["report", str(spec_file)])
    assert result.exit_code == 0, result.output
    page = spec.output_dir / "report.html"
    text = page.read_text()
    # self-contained: every picture embedded, nothing fetched from elsewhere
    sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(sources) == len(FIGURES)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    # the recommendation and the top trials are in it
    best = optuna.load_study(study_name="pictures", storage=spec.storage_url).best_trial
    assert f"Recommended: trial {best.number}" in text
    # every picture loads in a real browser
    assert loaded_in_chromium(page) == f"{len(FIGURES)}/{len(FIGURES)}"

    # and the check can fail: a page with one broken picture says so
    broken = page.with_name("broken.html")
    broken.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert loaded_in_chromium(broken) == f"{len(FIGURES) - 1}/{len(FIGURES)}"


def test_the_shift_pictures_draw_dropout_and_lag_apart_and_a_stored_study_falls_back(
    finished, tmp_path: Path
):
    from matplotlib.figure import Figure

    _, spec = finished
    study = optuna.load_study(study_name="pictures", storage=spec.storage_url)
    ax = Figure().subplots()
    _shift(ax, study, "val_acc")
    assert ax.get_ylabel() == "dropout's factor of Δ measured after training"
    layers = sum(len(t.user_attrs["measured_shift"]["layers"]) for t in _complete(study))
    assert len(ax.collections[0].get_offsets()) == layers  # a point per BN layer and trial
    ax = Figure().subplots()
    _shift_lag(ax, study, "val_acc")
    assert len(ax.collections[0].get_offsets()) == layers
    # the report's top trials name both factors beside Δ, with the best trial's values
    page = write_report(study, spec).read_text()
    for column in ("worst dropout factor measured", "worst BN lag measured", "worst Δ measured"):
        assert column in page
    measured = study.best_trial.user_attrs["measured_shift"]
    assert f"{measured['lag']['summary']['worst_delta']:.3f}" in page

    # a study stored by 0.1.0 measured Δ alone: Δ is drawn, named as such, and no lag
    stored = tmp_path / "autotune.db"  # a copy: the stored file stays as 0.1.0 wrote it
    shutil.copy(Path(__file__).parent / "data" / "stored-0.1.0" / "out" / "autotune.db", stored)
    old = optuna.load_study(study_name=None, storage=f"sqlite:///{stored}")
    ax = Figure().subplots()
    _shift(ax, old, "val_acc")
    assert "not factored" in ax.get_ylabel()
    with pytest.raises(CannotDraw, match="lag"):
        _shift_lag(Figure().subplots(), old, "val_acc")


def _complete(study: optuna.Study) -> list:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))

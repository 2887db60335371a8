"""The shipped examples stay valid, and each one runs a trial."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from autotune.cli import main
from autotune.core.spec import load_spec
from autotune.run.loop import run_study
from autotune.search.queries import count_finished

EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("examples/**/*.yaml"))


def test_there_are_examples():
    # quickstart, the cnn and the user DataModule
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "cnn_digits", "spec"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_example_validates(path):
    result = CliRunner().invoke(main, ["validate", str(path)])

    # the spec, its search space, its data and its model fit together
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_example_predicts_its_variance_shift(path):
    result = CliRunner().invoke(main, ["predict", str(path), "--json"])

    # the search space's defaults, one finite positive Δ per BN layer, without training
    assert result.exit_code == 0, result.output
    prediction = json.loads(result.stdout)
    assert prediction["layers"]
    for name, layer in prediction["layers"].items():
        assert layer["exact"] > 0 and math.isfinite(layer["exact"]), (name, layer)
    assert prediction["summary"]["worst_layer"] in prediction["layers"]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_example_runs_a_short_study(path, tmp_path):
    spec = load_spec(
        path, overrides={"output": str(tmp_path), "train.max_epochs": 1, "study.n_trials": 1}
    )

    # one trial of one epoch finishes and is recommended
    outcome = run_study(spec)
    assert count_finished(outcome.study) == 1
    assert (tmp_path / "best_model.py").is_file()

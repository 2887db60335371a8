"""The test split, scored once at the end: the recommended trial's weights with Wilson's interval
over the rows, the configurations trained again over seeds, and where each is said."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from mlflow.tracking import MlflowClient

from autotune.cli import main
from autotune.core.names import PARENT_ATTR, TEST_ATTR
from autotune.core.spec import load_spec
from autotune.outputs.report import write_report
from autotune.run.held_out import seed_interval, wilson
from autotune.search.storage import spec_storage


def test_wilson_matches_its_closed_form_and_stays_inside_0_and_1():
    # 0 of 10: the interval still has width (the normal one would be the point 0)
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)
    # 45 of 50: the textbook value
    assert wilson(45, 50) == pytest.approx((0.7864, 0.9565), abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0)


def test_seed_interval_is_students_t_cut_to_bounds():
    values = [0.90, 0.92, 0.94]
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    result = seed_interval(values)
    assert result["mean"] == pytest.approx(0.92)
    assert result["interval"] == pytest.approx([0.92 - half, 0.92 + half])
    # an accuracy's interval does not pass 1
    assert seed_interval([0.99, 1.0, 0.95], (0.0, 1.0))["interval"][1] == 1.0


def test_seed_interval_over_test_rows_keeps_their_sampling():
    # five fits that agree exactly still share 100 test rows: the interval is theirs, not zero
    same = seed_interval([0.9] * 5, (0.0, 1.0), rows=100)
    rows_half = 1.959964 * math.sqrt(0.9 * 0.1 / 100)
    assert same["interval"] == pytest.approx([0.9 - rows_half, 0.9 + rows_half])
    # fits that differ: the two halves add in quadrature, wider than either alone
    values = [0.90, 0.92, 0.94]
    seeds_half = 4.302653 * 0.02 / math.sqrt(3)
    low, high = seed_interval(values, rows=200)["interval"]
    both = math.hypot(seeds_half, 1.959964 * math.sqrt(0.92 * 0.08 / 200))
    assert (high - low) / 2 == pytest.approx(both)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held_out")
    spec = tiny_spec(
        study={"n_trials": 2}, data={"test_fraction": None}, recommend={"top_k": 1, "seeds": 2}
    )
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "output": str(folder / "out")}))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    loaded = load_spec(path)
    study = optuna.load_study(study_name="tiny", storage=spec_storage(loaded))
    return loaded, study, result.output


def test_the_recommended_trial_is_scored_once_on_rows_no_trial_saw(scored):
    spec, study, output = scored
    stored = study.user_attrs[TEST_ATTR]

    # digits: 360 of 1797 rows held out; the recommended trial's own weights scored on them
    assert stored["rows"] == 360 and stored["scored"]
    recommended = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())
    assert stored["recommended"] == recommended["recommended"]
    # recommended.yaml carries the score, and the verdict against the baselines
    assert recommended["test"]["acc"] == pytest.approx(stored["acc"])
    assert recommended["robust"]["verdict"]["against"] in {
        "bn_only",
        "dropout_after_act",
        "dropout_only",
    }
    low, high = stored["acc_interval"]
    assert low < stored["acc"] < high
    # the configurations trained again: every seed's fit scored on test too
    names = [row["name"] for row in stored["robust"]]
    assert names[0].startswith("trial ") and "bn_only" in names
    assert all(len(row["values"]) == 2 for row in stored["robust"])
    # the end of the run says it, and what one validation row is worth
    assert "test split (360 rows no trial saw)" in output
    assert "one validation row is worth 0.0035 of val_acc" in output


def test_the_report_says_it_too(scored):
    spec, study, _ = scored
    page = write_report(study, spec).read_text()
    assert "test split (360 rows no trial saw)" in page and "paired t over 2 seeds" in page


def test_the_parent_run_carries_the_test_score(scored):
    spec, study, _ = scored
    run = MlflowClient(spec.tracking_uri).get_run(study.user_attrs[PARENT_ATTR])
    stored = study.user_attrs[TEST_ATTR]
    assert run.data.metrics["test_acc"] == pytest.approx(stored["acc"])
    assert run.data.metrics["test_acc.low"] == pytest.approx(stored["acc_interval"][0])


def test_no_test_split_no_score(write_spec):
    path = write_spec(tiny_spec(study={"n_trials": 1}, data={"test_fraction": 0}))
    assert CliRunner().invoke(main, ["run", str(path)]).exit_code == 0
    study = optuna.load_study(study_name="tiny", storage=spec_storage(load_spec(path)))
    assert TEST_ATTR not in study.user_attrs

"""The robust recommendation: the top configurations and the baselines trained again over
seeds, ranked by the mean or a confidence bound, and reported everywhere the recommendation is."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from mlflow.tracking import MlflowClient
from scipy import stats

from autotune.cli import main
from autotune.core.names import ROBUST_ATTR
from autotune.core.spec import load_spec
from autotune.nn import fitting
from autotune.outputs.report import write_report
from autotune.run.loop import run_study
from autotune.run.robust import against_baselines, seed_statistics
from autotune.search.queries import recommended_trial


@pytest.mark.parametrize("maximize", [True, False])
def test_the_bound_is_student_s_one_sided_95_percent_bound_on_the_side_that_counts(maximize):
    values = [0.91, 0.93, 0.96]
    row = seed_statistics(values, maximize)
    margin = stats.t.ppf(0.95, 2) * statistics.stdev(values) / math.sqrt(3)
    assert row["mean"] == pytest.approx(statistics.mean(values))
    assert row["sd"] == pytest.approx(statistics.stdev(values))
    # below the mean for an accuracy, above it for a loss
    assert row["bound"] == pytest.approx(row["mean"] - margin if maximize else row["mean"] + margin)


@pytest.fixture
def robust_study(tmp_path: Path, write_spec):
    # the user's own configuration, as a file with blocks
    current = tmp_path / "current.yaml"
    current.write_text(
        yaml.safe_dump(
            {"blocks": [{"placement": "before_bn", "rate": 0.3, "regularizer": "dropout"}] * 2}
        )
    )
    spec = load_spec(
        write_spec(
            tiny_spec(
                study={"name": "robust", "n_trials": 4},
                recommend={"top_k": 2, "seeds": 2, "by": "bound", "current": "current.yaml"},
            )
        )
    )
    return spec, run_study(spec).study


def test_the_top_trials_and_the_baselines_are_trained_again_over_the_seeds(robust_study):
    _, study = robust_study
    robust = study.user_attrs[ROBUST_ATTR]
    rows = {row["name"]: row for row in robust["rows"]}
    top = sorted(
        (t for t in study.trials if t.value is not None), key=lambda t: t.value, reverse=True
    )[:2]
    # the two best trials, then BN only, dropout only (no BN), plain dropout after the
    # activation, the user's own
    assert list(rows) == [f"trial {t.number}" for t in top] + [
        "bn_only",
        "dropout_only",
        "dropout_after_act",
        "current",
    ]
    assert all(len(row["values"]) == 2 for row in rows.values())
    # the spec's own seed trains each top trial's network again: the trial's value, exactly
    for trial in top:
        assert rows[f"trial {trial.number}"]["values"][0] == pytest.approx(trial.value)
    # the baselines are what they say
    assert {b["placement"] for b in rows["bn_only"]["blocks"]} == {"none"}
    assert {(b["placement"], b["rate"]) for b in rows["dropout_after_act"]["blocks"]} == {
        ("after_act", 0.5)
    }
    assert rows["dropout_only"]["batchnorm"] is False
    assert {(b["placement"], b["rate"]) for b in rows["dropout_only"]["blocks"]} == {
        ("after_act", 0.5)
    }
    assert all("batchnorm" not in row for name, row in rows.items() if name != "dropout_only")
    assert rows["current"]["blocks"][0]["rate"] == 0.3
    # the choice: the tuned configuration with the best lower bound, never a baseline
    tuned = [row for row in robust["rows"] if row["trial"] is not None]
    assert robust["choice"] == max(tuned, key=lambda row: row["bound"])["trial"]


def test_the_choice_is_what_the_outputs_and_the_parent_run_recommend(robust_study):
    spec, study = robust_study
    robust = study.user_attrs[ROBUST_ATTR]
    chosen = study.trials[robust["choice"]]
    recommended = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())
    # recommended.yaml: the chosen trial, and the blocks of what the verdict recommends (the
    # trial, or a baseline as good and simpler), the ranking and the baselines beside it
    name = robust["verdict"]["recommend"] or f"trial {chosen.number}"
    rows = {row["name"]: row for row in robust["rows"]}
    assert recommended["best"]["trial"] == chosen.number
    assert recommended["recommended"] == name
    assert recommended["blocks"] == rows[name]["blocks"]
    assert recommended["robust"]["chosen_trial"] == chosen.number
    assert [row["name"] for row in recommended["robust"]["rows"]] == [
        row["name"] for row in robust["rows"]
    ]
    # its weights were kept, and the snippet was checked against them
    assert Path(recommended["best"]["weights"]).is_file()
    assert "outputs" in recommended["verified"]["best_model.py"]
    # the parent run: every row's mean, sd and bound, and the chosen configuration as tags
    client = MlflowClient(spec.tracking_uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("robust").experiment_id],
        filter_string="tags.`autotune.role` = 'parent'",
    )
    for row in robust["rows"]:
        key = row["name"].replace(" ", "_")
        assert parent.data.metrics[f"robust.{key}.mean"] == pytest.approx(row["mean"])
    assert parent.data.tags["autotune.best_trial"] == str(chosen.number)
    assert parent.data.tags["autotune.recommendation"] == name


def test_a_rerun_with_nothing_new_does_not_train_again(robust_study, monkeypatch):
    spec, study = robust_study
    calls = []
    monkeypatch.setattr(fitting, "fit", lambda *a, **k: calls.append(a) or None)
    run_study(spec)
    # the budget was spent and the top trials are the same: the stored ranking stands
    assert calls == []
    stored = optuna.load_study(study_name="robust", storage=spec.storage_url)
    assert stored.user_attrs[ROBUST_ATTR] == study.user_attrs[ROBUST_ATTR]


def test_a_bad_current_configuration_is_refused_before_any_training(tmp_path: Path, write_spec):
    (tmp_path / "current.yaml").write_text(yaml.safe_dump({"blocks": [{"placement": "nowhere"}]}))
    spec = write_spec(tiny_spec(recommend={"top_k": 1, "current": "current.yaml"}))
    result = CliRunner().invoke(main, ["run", str(spec)])
    # bad input: one line naming the file, exit 2, and no study stored
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {tmp_path / 'current.yaml'}: blocks")
    assert not (tmp_path / "out" / "autotune.db").exists()


def test_a_configuration_that_diverges_on_a_seed_is_reported_not_fatal(write_spec, monkeypatch):
    real_fit = fitting.fit

    def fit(spec, config, datamodule, **kwargs):
        if config.blocks[0].placement == "after_act" and config.blocks[0].rate == 0.5:
            raise fitting.NonFiniteLossError("training loss became nan in epoch 1")
        return real_fit(spec, config, datamodule, **kwargs)

    monkeypatch.setattr(fitting, "fit", fit)
    spec = load_spec(
        write_spec(tiny_spec(study={"n_trials": 2}, recommend={"top_k": 1, "seeds": 2}))
    )
    outcome = run_study(spec)
    rows = {row["name"]: row for row in outcome.study.user_attrs[ROBUST_ATTR]["rows"]}
    # the baseline that diverged says so; the rest were ranked and the outputs written
    assert rows["dropout_after_act"]["failed"].startswith("seed 0: NonFiniteLossError")
    assert "mean" in rows["bn_only"]
    recommended = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())
    assert recommended["robust"]["rows"][-1]["failed"].startswith("seed 0")


def test_a_stored_choice_is_dropped_once_the_spec_no_longer_asks_for_it(robust_study):
    spec, study = robust_study
    plain = spec.model_copy(update={"recommend": spec.recommend.model_copy(update={"top_k": 0})})
    # without recommend.top_k the best single trial is recommended again
    assert recommended_trial(study, plain).number == study.best_trial.number
    assert recommended_trial(study, spec).number == study.user_attrs[ROBUST_ATTR]["choice"]


def test_the_report_shows_the_ranking_beside_the_baselines(robust_study):
    spec, study = robust_study
    page = write_report(study, spec).read_text()
    robust = study.user_attrs[ROBUST_ATTR]
    # the heading, and a row per configuration with its mean
    assert "Trained again over seeds [0, 1], ranked by the bound" in page
    for row in robust["rows"]:
        assert f"<td>{row['name']}</td>" in page
        assert f"<td>{row['mean']:.4f}</td>" in page
    # what the verdict recommends: the chosen trial, or a baseline as good and simpler
    assert (
        f"Recommended: {robust['verdict']['recommend'] or 'trial ' + str(robust['choice'])}" in page
    )


def test_a_tuned_pick_beats_a_baseline_only_beyond_the_noise():
    pick = {"values": [0.95, 0.96, 0.97]}
    close = [
        {"name": "dropout_after_act", "values": [0.95, 0.955, 0.975], "mean": 0.96},
        {"name": "bn_only", "values": [0.94, 0.965, 0.96], "mean": 0.955},
    ]
    # seed by seed the pick is +0.5 points on average, but as often behind: not beyond noise,
    # and the simplest baseline it does not beat is as good
    verdict = against_baselines(pick, close, maximize=True)
    assert not verdict["beats"] and verdict["against"] == "dropout_after_act"
    assert verdict["as_good"] == "bn_only"
    # the same margin on every seed: beyond the noise
    far = [{"name": "bn_only", "values": [0.93, 0.94, 0.95], "mean": 0.94}]
    verdict = against_baselines(pick, far, maximize=True)
    assert verdict["beats"] and verdict["as_good"] is None
    assert verdict["difference"] == pytest.approx(0.02) and verdict["margin"] == pytest.approx(0)
    # a loss: lower is better, and the difference is signed so that above 0 is better
    loss = against_baselines({"values": [0.1, 0.11, 0.12]}, far, maximize=False)
    assert loss["beats"] and loss["difference"] == pytest.approx(0.83)


def test_by_default_the_re_ranking_runs_where_the_budget_allows_it(write_spec):
    # 3 trials of about a second, and 5 configurations over 3 seeds to train again: 15 fits,
    # five times what the study took: skipped, with its cost said
    small = write_spec(tiny_spec(study={"name": "small"}))
    result = CliRunner().invoke(main, ["run", str(small)])
    assert result.exit_code == 0, result.output
    assert "no re-ranking over seeds: its 15 fits would take about" in result.output
    study = optuna.load_study(study_name="small", storage=load_spec(small).storage_url)
    assert ROBUST_ATTR not in study.user_attrs
    # 6 trials, 2 configurations over 2 seeds: 4 fits, less than the study took: it runs
    allowed = tiny_spec(study={"name": "allowed", "n_trials": 6})
    allowed["recommend"] = {"seeds": 2, "baselines": False}
    path = write_spec(allowed, "allowed.yaml")
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "training 2 configurations again, 4 fits, about" in result.output
    study = optuna.load_study(study_name="allowed", storage=load_spec(path).storage_url)
    assert len(study.user_attrs[ROBUST_ATTR]["rows"]) == 2

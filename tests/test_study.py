"""The trial loop end to end, in process: budget, resume, failures, pruning, MLflow, outputs."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import tiny_spec
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autotune.core.errors import WriteError
from autotune.core.space import TrialConfig
from autotune.core.spec import Spec, load_spec
from autotune.nn import fitting
from autotune.nn.data import load_data
from autotune.nn.models import build_model
from autotune.outputs.snippet import load_snippet
from autotune.run import objective
from autotune.run.loop import run_study
from autotune.run.preflight import resolve_space
from autotune.run.session import enqueue_low_shift
from autotune.search.queries import count_finished, trial_config
from autotune.search.storage import open_study
from autotune.search.tracking import Tracker

pytestmark = pytest.mark.slow


def _mlflow_runs(spec) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autotune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("autotune.role") == "trial"]
    return parents, children


def _bn_names(spec: Spec, study: optuna.Study, trial: FrozenTrial) -> list[str]:
    """The BN modules of the network the trial trained, in model order."""
    config = TrialConfig.from_dicts(trial.user_attrs["config"])
    shape, n_classes = study.user_attrs["input_shape"], study.user_attrs["n_classes"]
    model = build_model(spec.model, config, shape, n_classes)
    return [
        name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


# every block: dropout at 0.5 directly before BN, the placement the paper warns about
BEFORE_BN = {"placement": "before_bn", "rate": 0.5, "regularizer": "dropout"}


def test_a_study_runs_its_budget_and_writes_its_outputs(write_spec):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 3})))
    outcome = run_study(spec)

    # the budget is the number of finished trials
    assert count_finished(outcome.study) == 3
    # every trial carries its full configuration
    for trial in outcome.study.trials:
        assert len(trial.user_attrs["config"]) == 2
    # the recommendation and the snippet are written
    recommended = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())
    best = outcome.study.best_trial
    assert recommended["best"]["trial"] == best.number
    assert recommended["best"]["value"] == pytest.approx(best.value)
    assert recommended["blocks"] == best.user_attrs["config"]
    assert {"torch", "optuna", "lightning", "mlflow"} <= set(recommended["versions"])
    # and whether BN was recalibrated, with the best trial's predicted and measured shift
    assert recommended["recalibrate_bn"] is best.user_attrs["recalibrate_bn"]
    assert recommended["shift"] == {
        "predicted": best.user_attrs["predicted_shift"],
        "measured": best.user_attrs["measured_shift"],
    }


def test_best_model_snippet_is_standalone_and_loads_the_best_weights(write_spec):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 2})))
    run_study(spec)
    snippet = spec.output_dir / "best_model.py"
    recommended = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())

    # the snippet imports torch (and the standard library's collections) only
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(snippet.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"torch", "collections", "pathlib"}
    # build_model() takes the best trial's saved weights and scores what the trial scored
    model = load_snippet(snippet).eval()
    model.load_state_dict(torch.load(recommended["best"]["weights"]))
    data = load_data(spec.data, seed=spec.train.seed)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data.val_dataloader())
    assert correct / len(data.y_val) == pytest.approx(recommended["best"]["value"])


def test_mlflow_holds_one_parent_and_a_nested_child_per_trial(write_spec):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 3})))
    outcome = run_study(spec)
    parents, children = _mlflow_runs(spec)
    client = MlflowClient(spec.tracking_uri)

    # one parent run for the study
    assert len(parents) == 1
    parent = parents[0]
    # one child per trial, each nested under the parent
    assert len(children) == len(outcome.study.trials) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for child in children:
        trial = outcome.study.trials[int(child.data.tags["autotune.trial"])]
        # flat per-block params
        assert child.data.params["block0.placement"] == trial.user_attrs["config"][0]["placement"]
        assert {"block1.rate", "block1.regularizer", "block1.bn_momentum"} <= set(child.data.params)
        # and whether BN is recalibrated after training, drawn once for the network
        assert child.data.params["recalibrate_bn"] == str(trial.user_attrs["recalibrate_bn"])
        # the trial's final state as a tag
        assert child.data.tags["autotune.state"] == trial.state.name
        # per-epoch metrics, step = epoch; the last epoch's val_acc is the trial's value unless
        # recalibration changed it afterwards
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2]
        final = trial.user_attrs["final"]
        before = final.get("val_acc_before_recalibration", trial.value)
        assert history[-1].value == pytest.approx(before)
        # the values a trial has once are no single-point charts: summaries as params, each
        # layer's as tags, rounded for display (the storage keeps the exact values)
        metrics, params, tags = child.data.metrics, child.data.params, child.data.tags
        assert set(metrics) == set(trial.user_attrs["history"][-1]) - {"epoch"}

        def shown(values: dict, name: str) -> float:
            return float(values[name])

        assert {f"final.{name}" for name in final} <= set(params)
        assert shown(params, "final.val_acc") == pytest.approx(trial.value, rel=1e-3)
        # Δ per BN layer and its summary: predicted before training (and again from the
        # trial's own weights after epoch 1, under after_epoch_1.), measured after it
        bns = _bn_names(spec, outcome.study, trial)
        for kind in ("predicted", "measured"):
            attr = "predicted_shift" if kind == "predicted" else "measured_shift"
            shift = trial.user_attrs[attr]
            for name in bns:
                layer = shift["layers"][name]
                delta = layer["delta"] if kind == "predicted" else layer
                assert shown(tags, f"{kind}_delta.{name}") == pytest.approx(delta, rel=1e-3)
            # the whole Δ's summary: a prediction keeps the dropout factor's as `summary`
            summary = shift["delta_summary"] if kind == "predicted" else shift["summary"]
            worst = shown(params, f"{kind}_delta.worst")
            assert worst == pytest.approx(summary["worst_delta"], rel=1e-3)
            product = shown(tags, f"{kind}_delta.product")
            assert product == pytest.approx(summary["product"], rel=1e-3)
        again = trial.user_attrs["predicted_shift_after_epoch_1"]["delta_summary"]["worst_delta"]
        assert shown(tags, "after_epoch_1.predicted_delta.worst") == pytest.approx(again, rel=1e-3)
        # the predicted factors, named as the measured ones
        predicted_shift = trial.user_attrs["predicted_shift"]
        for name in bns:
            layer = predicted_shift["layers"][name]
            assert shown(tags, f"predicted_delta_dropout.{name}") == pytest.approx(
                layer["exact"], rel=1e-3
            )
            assert shown(tags, f"predicted_delta_lag.{name}") == pytest.approx(
                layer["lag"], rel=1e-3
            )
        # Δ's two factors, named apart, multiplying to Δ layer by layer
        measured_shift = trial.user_attrs["measured_shift"]
        for name in bns:
            dropout = shown(tags, f"measured_delta_dropout.{name}")
            lag = shown(tags, f"measured_delta_lag.{name}")
            assert dropout == pytest.approx(measured_shift["dropout"]["layers"][name], rel=1e-3)
            assert lag == pytest.approx(measured_shift["lag"]["layers"][name], rel=1e-3)
            assert dropout * lag == pytest.approx(shown(tags, f"measured_delta.{name}"), rel=1e-3)
        # the run's name says how its trial ended
        assert child.info.run_name == f"trial-{trial.number} complete"
    # the spec as the parent's params, the best value as its metric
    assert parent.data.params["model.template"] == "mlp"
    best = outcome.study.best_value
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best)
    # the recommendation, under the names the children use for their params
    best_child = next(
        c for c in children if c.data.tags["autotune.trial"] == str(outcome.study.best_trial.number)
    )
    recommended = {
        key.removeprefix("autotune.recommended."): value
        for key, value in parent.data.tags.items()
        if key.startswith("autotune.recommended.")
    }
    configured = set(trial_config(outcome.study.best_trial).to_params())
    assert set(recommended) == configured
    assert recommended == {k: v for k, v in best_child.data.params.items() if k in configured}


def test_every_trial_records_its_predicted_and_measured_shift(write_spec):
    spec = load_spec(
        write_spec(
            tiny_spec(
                study={"n_trials": 2},
                search_space={"params": {**BEFORE_BN, "recalibrate_bn": False}},
            )
        )
    )
    study = run_study(spec).study

    for trial in study.trials:
        attrs = trial.user_attrs
        bns = _bn_names(spec, study, trial)
        predicted, measured = attrs["predicted_shift"], attrs["measured_shift"]
        # the configuration says it was not recalibrated
        assert attrs["recalibrate_bn"] is False
        # one Δ per BN module of the network, predicted and measured, named as in the model
        assert list(predicted["layers"]) == list(measured["layers"]) == bns
        # dropout straight before BN: Δ = v / (c² + 2v) at keep ratio 1/2, so 0 < Δ <= 1/2
        for name in bns:
            assert 0 < predicted["layers"][name]["exact"] <= 0.5 + 1e-9, (name, predicted)
            # fed by its own block's dropout only: the previous BN normalised the earlier noise
            assert predicted["layers"][name]["sources"] == [name.replace(".bn", ".drop")]
        # the summary names the layer furthest from Δ = 1 and the product along the path
        summary = predicted["summary"]
        deltas = {name: layer["exact"] for name, layer in predicted["layers"].items()}
        assert summary["worst_layer"] == min(deltas, key=deltas.get)
        assert summary["worst_delta"] == pytest.approx(min(deltas.values()))
        assert summary["product"] == pytest.approx(math.prod(deltas.values()))
        # measured Δ: positive and finite; without recalibration, below 1 as predicted
        for name, delta in measured["layers"].items():
            assert 0 < delta < 1, (name, measured)
        assert measured["summary"]["worst_delta"] == pytest.approx(min(measured["layers"].values()))
        # the final metrics: the last epoch's, and accuracy in train and eval mode
        final = attrs["final"]
        assert set(final) == {
            "train_loss",
            "val_loss",
            "val_acc",
            "train_mode_acc",
            "eval_mode_acc",
            "mode_acc_gap",
        }
        assert 0 <= final["train_mode_acc"] <= 1 and 0 <= final["eval_mode_acc"] <= 1
        assert final["mode_acc_gap"] == pytest.approx(
            final["eval_mode_acc"] - final["train_mode_acc"]
        )
        assert all(math.isfinite(value) for value in final.values())


def test_recalibration_changes_only_what_follows_the_same_training(write_spec):
    trials = {}
    for flag in (False, True):
        spec = write_spec(
            tiny_spec(
                study={"name": f"recalibrate-{str(flag).lower()}", "n_trials": 1},
                search_space={"params": {**BEFORE_BN, "recalibrate_bn": flag}},
            ),
            f"{flag}.yaml",
        )
        trials[flag] = run_study(load_spec(spec)).study.trials[0]
    off, on = trials[False], trials[True]

    # the same seed draws the same configuration; only recalibrate_bn differs
    assert off.user_attrs["config"] == on.user_attrs["config"]
    assert (off.user_attrs["recalibrate_bn"], on.user_attrs["recalibrate_bn"]) == (False, True)
    # without recalibration the value is the last epoch's val_acc
    assert off.value == pytest.approx(off.intermediate_values[2])
    assert off.value == pytest.approx(off.user_attrs["final"]["val_acc"])
    assert "val_acc_before_recalibration" not in off.user_attrs["final"]
    # with it, the value is val_acc taken again afterwards; the epoch's is kept beside it
    final = on.user_attrs["final"]
    assert on.value == pytest.approx(final["val_acc"])
    assert final["val_acc_before_recalibration"] == pytest.approx(on.intermediate_values[2])
    # the training itself was the same: before recalibration both trials scored alike
    assert on.intermediate_values == pytest.approx(off.intermediate_values)
    # dropout at 0.5 before every BN shifts the variance badly; recalibration repairs it
    assert on.value > off.value
    # recalibrated on training data, BN's statistics move towards the eval-mode variance
    for name, delta in on.user_attrs["measured_shift"]["layers"].items():
        assert abs(math.log(delta)) < abs(
            math.log(off.user_attrs["measured_shift"]["layers"][name])
        )


def test_a_resnet_study_with_stochastic_depth_exports_its_recalibrated_weights(write_spec):
    spec = load_spec(
        write_spec(
            tiny_spec(
                study={"n_trials": 2},
                model={"template": "resnet", "widths": [4, 8]},
                search_space={"params": {"placement": "residual", "recalibrate_bn": True}},
            )
        )
    )
    outcome = run_study(spec)
    recommended = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())

    # both trials trained residual blocks whose branch stochastic depth drops
    assert count_finished(outcome.study) == 2
    for block in recommended["blocks"]:
        assert (block["placement"], block["regularizer"]) == ("residual", "stochastic_depth")
    assert recommended["recalibrate_bn"] is True
    # the snippet carries the classes torch lacks and still imports nothing but torch
    snippet = (spec.output_dir / "best_model.py").read_text()
    assert "class StochasticDepth(nn.Module)" in snippet
    assert "class ResidualBlock(nn.Module)" in snippet
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(snippet))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"torch", "collections", "pathlib"}
    # the rebuilt network loads the saved weights strictly and computes what autotune's does
    weights = torch.load(recommended["best"]["weights"])
    rebuilt = load_snippet(spec.output_dir / "best_model.py").eval()
    rebuilt.load_state_dict(weights, strict=True)
    best = outcome.study.best_trial
    config = TrialConfig.from_dicts(best.user_attrs["config"], recalibrate_bn=True)
    model = build_model(spec.model, config, (1, 8, 8), 10).eval()
    model.load_state_dict(weights, strict=True)
    data = load_data(spec.data, seed=spec.train.seed)
    x = torch.cat([x for x, _ in data.val_dataloader()])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
        correct = (rebuilt(x).argmax(1) == torch.as_tensor(data.y_val)).sum().item()
    # and scores the trial's value: the weights hold the recalibrated BN statistics
    assert correct / len(data.y_val) == pytest.approx(best.value)
    assert best.value == pytest.approx(best.user_attrs["final"]["val_acc"])


def test_a_rerun_resumes_the_same_study_without_repeating_trials(write_spec):
    path = write_spec(tiny_spec(study={"n_trials": 2}))
    first = run_study(load_spec(path))
    done = [(t.number, t.value) for t in first.study.trials]

    # a rerun with the same budget has nothing left to do
    again = run_study(load_spec(path))
    assert [(t.number, t.value) for t in again.study.trials] == done
    # a larger budget adds only the missing trials; the earlier ones are kept as they were
    more = run_study(load_spec(path), n_trials=4)
    assert count_finished(more.study) == 4
    assert [(t.number, t.value) for t in more.study.trials[:2]] == done
    # the resumed run drew new configurations, not the first run's again
    configs = [t.params for t in more.study.trials]
    assert configs[2] not in configs[:2] and configs[3] not in configs[:2]
    # MLflow still has one parent run and one child per trial
    parents, children = _mlflow_runs(load_spec(path))
    assert len(parents) == 1 and len(children) == 4


def test_a_rerun_refuses_a_spec_whose_model_changed(write_spec):
    path = write_spec(tiny_spec(study={"n_trials": 1}))
    run_study(load_spec(path))
    changed = write_spec(tiny_spec(study={"n_trials": 1}, model={"widths": [32, 32, 16]}))

    # the stored study was run with other widths: a clear error, not a mixed study
    with pytest.raises(ValueError, match=r"model\.widths: stored study 'tiny'"):
        run_study(load_spec(changed))


def test_a_rerun_refuses_other_data(write_spec):
    run_study(load_spec(write_spec(tiny_spec(study={"n_trials": 1}))))
    wine = load_spec(write_spec(tiny_spec(study={"n_trials": 1}, data={"name": "wine"}), "w.yaml"))

    # the stored study was fit to (1, 8, 8) digits: wine's 13 features would mix two datasets
    with pytest.raises(ValueError, match=r"data\.input_shape: stored study 'tiny'"):
        run_study(wine)


def test_a_diverging_trial_fails_and_the_study_goes_on(write_spec, monkeypatch):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 3})))
    real_fit, calls = fitting.fit, []

    def fit_diverging_once(spec, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second trial trains with an absurd learning rate
            spec = spec.model_copy(
                update={"train": spec.train.model_copy(update={"optimizer": "sgd", "lr": 1e12})}
            )
        return real_fit(spec, *args, **kwargs)

    monkeypatch.setattr(fitting, "fit", fit_diverging_once)
    outcome = run_study(spec)
    states = [t.state for t in outcome.study.trials]

    # the diverging trial failed with its reason, the others completed the budget
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert "NonFiniteLossError" in outcome.study.trials[1].user_attrs["fail_reason"]
    # its MLflow run says FAIL too
    _, children = _mlflow_runs(spec)
    failed = [c for c in children if c.data.tags["autotune.trial"] == "1"]
    assert failed[0].data.tags["autotune.state"] == "FAIL"
    assert failed[0].info.status == "FAILED"


def test_failures_in_a_row_stop_the_run_without_an_exception(write_spec):
    # the step diverges, not the decay (an lr x weight_decay past 2 (1 + momentum) is refused)
    train = {"optimizer": "sgd", "lr": 1e30, "weight_decay": 0}
    spec = load_spec(write_spec(tiny_spec(train=train)))
    outcome = run_study(spec)

    # five diverging trials in a row stop the run; nothing finished, nothing raised
    assert outcome.stopped_by_failures
    assert [t.state for t in outcome.study.trials] == [TrialState.FAIL] * 5
    # no recommendation without a completed trial
    assert not (spec.output_dir / "recommended.yaml").exists()


class _AlwaysPrune(optuna.pruners.BasePruner):
    """Prunes at every report; like Optuna's own pruners, never before the first."""

    def prune(self, study, trial) -> bool:
        return trial.last_step is not None


def test_pruning_is_honoured_after_the_first_epoch_and_recorded(write_spec):
    spec = load_spec(write_spec(tiny_spec(train={"max_epochs": 5})))
    space = resolve_space(spec)
    data = load_data(spec.data, seed=0)
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    tracker = Tracker(spec.tracking_uri, spec.experiment_name, "pruning")
    tracker.start_study({})
    study.optimize(objective.Objective(spec, space, data, tracker), n_trials=1)
    trial = study.trials[0]

    # the trial stopped after its first epoch, with the epoch and the reason recorded
    assert trial.state == TrialState.PRUNED
    assert trial.last_step == 1
    assert trial.user_attrs["pruned_epoch"] == 1
    assert "pruned after epoch 1" in trial.user_attrs["pruned_reason"]
    # the MLflow run says PRUNED and holds one epoch of metrics
    run = MlflowClient(spec.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["autotune.state"] == "PRUNED"
    assert run.data.tags["autotune.pruned_epoch"] == "1"


def test_a_fit_is_reproducible_with_the_same_seed(write_spec):
    spec = load_spec(write_spec(tiny_spec()))
    config = resolve_space(spec).defaults()
    data = load_data(spec.data, seed=0)

    # same seed, same configuration: the same learning curve
    first = fitting.fit(spec, config, data).history
    second = fitting.fit(spec, config, data).history
    assert first == second


def test_stored_study_direction_mismatch_is_a_spec_error(write_spec):
    spec = load_spec(write_spec(tiny_spec()))
    open_study(spec, resolve_space(spec))
    flipped = load_spec(write_spec(tiny_spec(study={"direction": "minimize"}), "flipped.yaml"))

    # the stored study maximizes: the spec may not silently flip it
    with pytest.raises(ValueError, match=r"study\.direction"):
        open_study(flipped, resolve_space(flipped))


@pytest.mark.parametrize("sampler", ["random", "gp", "cmaes"])
def test_every_sampler_runs_a_study(write_spec, sampler):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 2, "sampler": sampler})))

    # each sampler drives a short study to its budget
    assert count_finished(run_study(spec).study) == 2


@pytest.mark.parametrize(
    "pruner",
    [
        "median",
        "percentile",
        "hyperband",
        "successive_halving",
        {"name": "variance_shift", "base": "hyperband"},
    ],
)
def test_every_pruner_runs_a_study(write_spec, pruner):
    spec = load_spec(
        write_spec(tiny_spec(study={"n_trials": 3, "pruner": pruner}, train={"max_epochs": 3}))
    )

    # each pruner lets a short study reach its budget of finished trials
    assert count_finished(run_study(spec).study) == 3


# dropout at 0.7 straight before every BN: the predicted worst Δ is about 0.2, far past 0.5
HOPELESS = {"placement": "before_bn", "rate": 0.7, "regularizer": "dropout"}


def _gated_spec(write_spec, threshold: float | None, n_trials: int) -> Spec:
    pruner = {"name": "variance_shift", "threshold": threshold, "exploration": 0.0}
    raw = tiny_spec(
        study={"n_trials": n_trials, "pruner": pruner}, search_space={"params": HOPELESS}
    )
    return load_spec(write_spec(raw))


def test_the_gate_prunes_a_hopeless_configuration_before_training(write_spec, monkeypatch):
    spec = _gated_spec(write_spec, threshold=0.5, n_trials=2)
    fits = []
    monkeypatch.setattr(fitting, "fit", lambda *args, **kwargs: fits.append(1))
    study = run_study(spec).study
    _, children = _mlflow_runs(spec)

    # both trials spent the budget as PRUNED, and none of them trained
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert fits == []
    for trial in study.trials:
        summary = trial.user_attrs["predicted_shift"]["summary"]
        worst, layer = summary["worst_delta"], summary["worst_layer"]
        # the pruner saw the predicted worst Δ, and it is past the gate
        assert trial.user_attrs["predicted_delta"] == worst < 0.5
        # stopped at epoch 0 with no value and no epoch reported
        assert trial.user_attrs["pruned_epoch"] == 0
        assert trial.values is None and trial.intermediate_values == {}
        # the reason names the predicted Δ, its layer and the gate's Δ
        reason = trial.user_attrs["pruned_reason"]
        assert reason == (
            f"pruned before training: predicted Δ {worst:.3f} at {layer}, "
            "outside the gate's [0.500, 2.000]"
        )
        # its MLflow run is PRUNED with the same reason and holds the prediction, not a curve
        (child,) = [c for c in children if c.data.tags["autotune.trial"] == str(trial.number)]
        assert child.data.tags["autotune.state"] == "PRUNED"
        assert child.data.tags["autotune.pruned_epoch"] == "0"
        assert child.data.tags["autotune.pruned_reason"] == reason
        params, tags = child.data.params, child.data.tags
        bns = _bn_names(spec, study, trial)
        assert {f"predicted_delta.{name}" for name in [*bns, "product"]} <= set(tags)
        # the gate reads the dropout factor; predicted_delta.* is Δ, the factor times the lag
        assert float(params["predicted_delta_dropout.worst"]) == pytest.approx(worst, rel=1e-3)
        delta_summary = trial.user_attrs["predicted_shift"]["delta_summary"]
        worst_delta = float(params["predicted_delta.worst"])
        assert worst_delta == pytest.approx(delta_summary["worst_delta"], rel=1e-3)
        # no curve: it never trained; its name says it was gated
        assert child.data.metrics == {}
        assert child.info.run_name == f"trial-{trial.number} gated"
    # nothing completed: no recommendation
    assert not (spec.output_dir / "recommended.yaml").exists()


def test_without_the_gate_the_same_configuration_trains(write_spec):
    spec = _gated_spec(write_spec, threshold=None, n_trials=1)
    trial = run_study(spec).study.trials[0]

    # threshold null: the trial with Δ about 0.2 trains both epochs and completes
    assert trial.user_attrs["predicted_delta"] < 0.5
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [1, 2]


def test_a_trial_past_the_gate_that_explores_trains_and_is_marked(write_spec):
    pruner = {"name": "variance_shift", "threshold": 0.5, "exploration": 1.0}
    raw = tiny_spec(study={"n_trials": 1, "pruner": pruner}, search_space={"params": HOPELESS})
    spec = load_spec(write_spec(raw))
    trial = run_study(spec).study.trials[0]
    _, (child,) = _mlflow_runs(spec)

    # past the line (Δ about 0.2), trained anyway: the attr and the MLflow tag say so
    assert trial.user_attrs["predicted_delta"] < 0.5
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["explored"] is True
    assert child.data.tags["autotune.explored"] == "True"


def test_seed_trials_start_the_study_with_the_least_shifted_candidates(write_spec):
    pruner = {"name": "variance_shift", "threshold": None, "seed_trials": 2}
    before_bn = {"placement": "before_bn", "regularizer": "dropout", "recalibrate_bn": False}
    raw = tiny_spec(
        study={"n_trials": 2, "pruner": pruner},
        search_space={"params": before_bn},  # rate free in [0.05, 0.5]: Δ varies with it
        train={"max_epochs": 1},
    )
    spec = load_spec(write_spec(raw))
    space = resolve_space(spec)
    data = load_data(spec.data, seed=spec.train.seed)
    # the reference: the 10 · 2 random candidates, predicted one by one
    candidates = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.train.seed))
    distances = []
    for _ in range(20):
        config = space.sample(candidates.ask())
        distances.append(abs(math.log(fitting.predict(spec, config, data).summary.worst_delta)))
    queue = optuna.create_study()
    chosen = enqueue_low_shift(queue, spec, space, data, 2)

    # two configurations are enqueued, as waiting trials carrying their parameters
    assert len(chosen) == 2
    assert [t.state for t in queue.trials] == [TrialState.WAITING] * 2
    assert [t.system_attrs["fixed_params"] for t in queue.trials] == chosen
    study = run_study(spec).study
    # the study's first trials ran exactly those configurations
    assert [t.params for t in study.trials[:2]] == chosen
    # and their predicted Δ are the two least shifted of the twenty candidates
    seeded = [abs(math.log(t.user_attrs["predicted_delta"])) for t in study.trials[:2]]
    assert seeded == pytest.approx(sorted(distances)[:2])


def test_data_path_output_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    spec_path = tmp_path / "specs" / "spec.yaml"
    spec_path.parent.mkdir()
    spec_path.write_text(yaml.safe_dump({**tiny_spec(study={"n_trials": 1}), "output": "out"}))
    monkeypatch.chdir(tmp_path)
    run_study(load_spec(spec_path))

    # outputs land under the working directory, not the spec's folder
    assert (Path("out") / "recommended.yaml").is_file()
    assert not (spec_path.parent / "out").exists()


def test_a_failure_after_training_fails_the_trial_and_ends_its_run(write_spec, monkeypatch):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 1})))

    def fails(self, trial, result):
        raise RuntimeError("after training")

    monkeypatch.setattr(objective.Objective, "_save_if_best", fails)
    outcome = run_study(spec)
    trial = outcome.study.trials[0]
    # the trial fails with the reason, and the run stops after five such failures in a row
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "RuntimeError: after training"
    assert outcome.stopped_by_failures
    # its MLflow run is FAILED, not left RUNNING
    run = MlflowClient(spec.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["autotune.state"]) == ("FAILED", "FAIL")


def test_a_queued_retry_of_an_interrupted_trial_runs_as_a_trial_of_its_own(write_spec):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 1})))
    study = run_study(spec).study
    first = study.trials[0]
    # a trial a stop cut short (FAIL, interrupted), queued again as a launcher's death queues it
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL,
            params=first.params,
            distributions=first.distributions,
            user_attrs={**first.user_attrs, "interrupted": True},
        )
    )
    RetryHeartbeatStaleTrialCallback(max_retry=2)(study, study.trials[1])
    study = run_study(spec, n_trials=2).study

    # the retry ran its predecessor's configuration, and is not taken for an interrupted trial
    retry = study.trials[2]
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.user_attrs["interrupted"] is False


def test_a_write_the_disk_refuses_fails_its_trial_and_stops_the_run(write_spec, monkeypatch):
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 3})))
    full = f"{spec.output_dir}/weights/trial_0.pt: No space left on device"

    def full_disk(state, path):
        raise WriteError(full)

    monkeypatch.setattr(objective, "save_tensors", full_disk)
    with pytest.raises(WriteError, match="No space left on device"):
        run_study(spec)
    study = optuna.load_study(study_name="tiny", storage=spec.storage_url)
    # the trial fails with the reason, and no trial starts after it: each would fail the same way
    [trial] = study.trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == f"WriteError: {full}"
    # MLflow: the trial's run FAILED, and the parent run FAILED, not left RUNNING
    parents, children = _mlflow_runs(spec)
    assert [run.info.status for run in children] == ["FAILED"]
    assert [run.info.status for run in parents] == ["FAILED"]


@pytest.mark.parametrize(
    "how, status, finished",
    [
        ("budget", "FINISHED", "3/3"),  # the study reached its budget
        ("timeout", "KILLED", "1/3"),  # cut short: a rerun goes on
        ("failures", "FAILED", "0/3"),  # five failures in a row
    ],
)
def test_the_parent_run_is_finished_only_when_the_study_reached_its_budget(
    write_spec, how, status, finished
):
    train = {"optimizer": "sgd", "lr": 1e30, "weight_decay": 0} if how == "failures" else {}
    spec = load_spec(write_spec(tiny_spec(study={"n_trials": 3}, train=train)))
    outcome = run_study(spec, timeout=0.01 if how == "timeout" else None)
    [parent], _ = _mlflow_runs(spec)
    # its status says how the study ended; a tag says how far it got
    assert parent.info.status == status
    assert parent.data.tags["autotune.finished"] == finished
    assert f"{outcome.finished}/{outcome.budget}" == finished

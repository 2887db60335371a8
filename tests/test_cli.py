"""The command line: verbs, exit codes, one-line errors, interrupt and resume."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autotune.cli import main
from autotune.core.spec import load_spec
from autotune.run.loop import run_study
from autotune.run.session import PARENT_WAIT_SECONDS

AUTOTUNE = [sys.executable, "-m", "autotune.cli"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    # exit code 2, one line on stderr, no traceback
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


BAD_SPECS = {
    "unknown key": (
        {"data": {"name": "digits", "batch_sise": 8}},
        ["data.batch_sise", "unknown key"],
    ),
    "wrong type": ({"train": {"max_epochs": "many"}}, ["train.max_epochs", "valid integer"]),
    "out of range": ({"data": {"val_fraction": 1.5}}, ["data.val_fraction", "less than 1"]),
    "missing file": ({"data": {"path": "missing.csv"}}, ["data.path", "missing.csv"]),
    "unknown dataset": ({"data": {"name": "mnist"}}, ["data.name", "'mnist'", "digits"]),
    "bad import path": ({"data": {"datamodule": "no_such_pkg.mod:DM"}}, ["data.datamodule"]),
    "import path syntax": ({"data": {"datamodule": "not a path"}}, ["data.datamodule"]),
    "unknown regularizer": (
        {"search_space": {"params": {"regularizer": ["drpout"]}}},
        ["search_space.params.regularizer", "'drpout'", "dropout"],
    ),
    "unknown search space": ({"search_space": "nope"}, ["search_space.base", "'nope'"]),
    "study name": ({"study": {"name": "o'neil"}}, ["study.name", "pattern"]),
    "default not a number": (
        {"search_space": {"params": {"rate": {"default": "abc"}}}},
        ["search_space.params.rate.default", "'abc'"],
    ),
    "nested choice": (
        {"search_space": {"params": {"regularizer": [["dropout"]]}}},
        ["search_space.params.regularizer.choices", "expected a name"],
    ),
    "absent accelerator": ({"train": {"accelerator": "mps"}}, ["train.accelerator", "'mps'"]),
    "cnn on tabular data": (
        {"data": {"name": "wine"}, "model": {"template": "cnn"}},
        ["model.template", "(13,)"],
    ),
    "resnet on tabular data": (
        {"data": {"name": "wine"}, "model": {"template": "resnet"}},
        ["model.template", "resnet", "(13,)"],
    ),
    "residual placement on an mlp": (
        {"search_space": {"params": {"placement": "residual"}}},
        ["search_space.params.placement", "residual does not apply to mlp blocks"],
    ),
    "stochastic depth as a regularizer": (
        {"search_space": {"params": {"regularizer": "stochastic_depth"}}},
        ["search_space.params.regularizer", "placement: residual"],
    ),
    "recalibrate_bn not a bool": (
        {"search_space": {"params": {"recalibrate_bn": "maybe"}}},
        ["search_space.params.recalibrate_bn", "true or false", "'maybe'"],
    ),
    "recalibrate_bn per block": (
        {"search_space": {"blocks": {0: {"recalibrate_bn": True}}}},
        ["search_space.blocks.0.recalibrate_bn", "whole network"],
    ),
}


@pytest.mark.parametrize("verb", ["run", "validate"])
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_input_is_one_line_naming_the_field_and_exit_2(write_spec, verb, case):
    spec, fragments = BAD_SPECS[case]
    result = invoke(verb, write_spec(spec))

    # the error names the field, the rule and the value, in one line
    assert_one_line_error(result, *fragments)


def test_a_datamodule_without_validation_data_is_bad_input(tmp_path):
    (tmp_path / "trainonly.py").write_text(
        "import torch\n"
        "import lightning.pytorch as pl\n"
        "class TrainOnly(pl.LightningDataModule):\n"
        "    n_classes = 2\n"
        "    def train_dataloader(self):\n"
        "        x = torch.randn(32, 4)\n"
        "        return [(x, (x[:, 0] > 0).long())]\n"
    )
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data": {"datamodule": "trainonly:TrainOnly"}, "output": str(tmp_path / "out")}
        )
    )

    # no val_dataloader: said before any trial runs, not five failed trials later
    assert_one_line_error(invoke("run", path), "data: no validation batch")


@pytest.mark.parametrize(
    ("module", "loader", "said"),
    [
        ("badtrain", "raise OSError('shard 3 is gone')", "OSError: shard 3 is gone"),
        ("badlength", "return BadLength()", "TypeError: a stream has no length"),
    ],
)
def test_a_datamodule_whose_training_loader_fails_is_named(tmp_path, module, loader, said):
    (tmp_path / f"{module}.py").write_text(
        "import torch\n"
        "import lightning.pytorch as pl\n"
        "class BadLength:\n"
        "    def __iter__(self):\n"
        "        yield torch.randn(8, 4), torch.zeros(8, dtype=torch.long)\n"
        "    def __len__(self):\n"
        "        raise TypeError('a stream has no length')\n"
        "class BadTrain(pl.LightningDataModule):\n"
        "    n_classes = 2\n"
        "    input_shape = (4,)\n"
        "    def train_dataloader(self):\n"
        f"        {loader}\n"
    )
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data": {"datamodule": f"{module}:BadTrain"}, "output": str(tmp_path / "o")}
        )
    )
    # the user's code is named, in one line: a len() that raised was a traceback
    assert_one_line_error(invoke("run", path), f"data.datamodule: '{module}:BadTrain'", said)


def test_a_missing_spec_file_is_named(tmp_path):
    result = invoke("run", tmp_path / "nowhere.yaml")

    # the missing file is named
    assert_one_line_error(result, "nowhere.yaml", "not found")


def test_invalid_yaml_is_named_with_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study:\n  name: [unclosed\n")

    # the file and the line are named
    assert_one_line_error(invoke("validate", path), "broken.yaml", "not valid YAML", "line")


def test_the_installed_entry_point_reports_bad_input_without_a_traceback(write_spec):
    path = write_spec({"study": {"n_trials": 0}})
    proc = subprocess.run([*AUTOTUNE, "run", str(path)], capture_output=True, text=True)

    # a real process: exit 2, one line, the field named
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: study.n_trials: Input should be greater than or equal to 1 (got 0)"
    ]


def test_validate_checks_a_good_spec_without_training(write_spec):
    path = write_spec(tiny_spec())
    result = invoke("validate", path)

    # ok, with what it found; no study was created
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout and "(1, 8, 8)" in result.stdout and "10 classes" in result.stdout
    assert not (Path(path).parent / "out" / "autotune.db").exists()


def test_spaces_lists_the_shipped_search_spaces():
    result = invoke("spaces")

    # every shipped space and its parameters are listed
    assert result.exit_code == 0
    assert "dropout_bn" in result.stdout
    for param in ("placement", "rate", "regularizer", "bn_momentum"):
        assert param in result.stdout


@pytest.mark.slow
def test_run_then_export_rewrites_the_outputs(write_spec):
    path = write_spec(tiny_spec(study={"n_trials": 2}))
    result = invoke("run", path)
    out = Path(path).parent / "out"

    # the run prints its summary and writes the two files
    assert result.exit_code == 0, result.output
    assert "2 complete" in result.stderr
    assert f"wrote {out / 'recommended.yaml'}" in result.stderr
    # the table shows the best trial's worst predicted Δ, and its worst measured Δ with that
    # layer's two factors, named apart
    recommended = yaml.safe_load((out / "recommended.yaml").read_text())
    shift = recommended["shift"]
    for column in ("dropout", "predicted", "Δ measured", "lag"):
        assert column in result.stderr, result.stderr
    worst = shift["measured"]["summary"]["worst_layer"]
    cells = [
        shift["predicted"]["summary"]["worst_delta"],
        shift["measured"]["summary"]["worst_delta"],
        shift["measured"]["dropout"]["layers"][worst],
        shift["measured"]["lag"]["layers"][worst],
    ]
    for value in cells:
        assert f"{value:.3f}" in result.stderr, result.stderr
    for name in ("recommended.yaml", "best_model.py"):
        (out / name).unlink()
    # export writes them again from the stored study alone
    result = invoke("export", path)
    assert result.exit_code == 0, result.output
    assert (out / "recommended.yaml").is_file() and (out / "best_model.py").is_file()


@pytest.mark.slow
def test_export_writes_each_format_asked_for_verified_with_its_provenance(write_spec):
    path = write_spec(
        tiny_spec(
            study={"n_trials": 2},
            model={"template": "resnet", "widths": [4, 8]},
            # Uout is no torch module: its code must travel inside the snippet
            search_space={"params": {"placement": "in_branch", "regularizer": "uout"}},
        )
    )
    assert invoke("run", path).exit_code == 0
    out = Path(path).parent / "out"
    for name in ("recommended.yaml", "best_model.py"):
        (out / name).unlink()

    result = invoke("export", path, "--format", "json", "--format", "py")
    # the formats asked for, and no other
    assert result.exit_code == 0, result.output
    assert not (out / "recommended.yaml").exists()
    document = json.loads((out / "recommended.json").read_text())
    trial = document["best"]["trial"]
    # the snippet was rebuilt, loaded the trained weights and gave the tuned network's outputs
    assert document["verified"]["best_model.py"].startswith(
        f"same layers and parameter count; loads trial_{trial}.pt and then gives"
    )
    # provenance: study, trial, MLflow run, seed and versions, in the snippet and the document
    header = (out / "best_model.py").read_text().split('"""')[1]
    run_id = document["best"]["mlflow_run_id"]
    assert f"study tiny, trial {trial}, mlflow_run_id {run_id}, seed 0;" in " ".join(header.split())
    assert "torch 2" in header and document["versions"]["torch"].startswith("2")
    assert run_id and document["best"]["mlflow_parent_run_id"]
    # the snippet imports torch only, and builds the network that loads the weights
    namespace: dict = {"__name__": "snippet"}
    exec((out / "best_model.py").read_text(), namespace)
    model = namespace["build_model"]()
    model.load_state_dict(torch.load(document["best"]["weights"]))
    assert "class Uout" in (out / "best_model.py").read_text()

    # weights of another trial (or study) under the best trial's name are found out, not used
    state = torch.load(document["best"]["weights"])
    state = {
        name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in state.items()
    }
    torch.save(state, document["best"]["weights"])
    result = invoke("export", path, "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "recommended.json").read_text())
    assert document["best"]["weights"] is None


# --- predict ---------------------------------------------------------------------------------

# the tiny spec's two mlp blocks, dropout at 0.5 straight before each BN
BEFORE_BN = {"placement": "before_bn", "rate": 0.5, "regularizer": "dropout", "bn_momentum": 0.1}


def predict_json(*args: str) -> dict:
    result = invoke("predict", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_predict_prints_each_bn_layer_and_the_worst(write_spec):
    path = write_spec(tiny_spec())
    result = invoke("predict", path)
    prediction = predict_json(path)

    # the search space's defaults: dropout after each activation at 0.1, no recalibration
    assert result.exit_code == 0, result.output
    assert "block0: dropout@after_act 0.10, m=0.1" in result.output
    assert "recalibrate_bn: false" in result.output
    # one row per BN layer with its Δ: block0's BN sees the raw input, block1's block0's dropout
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert list(rows) == list(prediction["layers"]) == ["block0.bn", "block1.bn"]
    for name, layer in prediction["layers"].items():
        for factor in ("exact", "lag", "delta"):  # the dropout factor, the lag and Δ
            assert f"{layer[factor]:.3f}" in rows[name]
    assert "block0.drop" in rows["block1.bn"]
    # and the worst layer by each, as the JSON summaries name them
    summary = prediction["summary"]
    assert summary["worst_layer"] == "block1.bn"
    assert f"by dropout: block1.bn (dropout = {summary['worst_delta']:.3f})" in result.output
    whole = prediction["delta_summary"]
    assert f"by Δ: {whole['worst_layer']} (Δ = {whole['worst_delta']:.3f})" in result.output


def test_predict_json_has_the_config_layers_and_summary(write_spec):
    prediction = predict_json(write_spec(tiny_spec()))

    # the configuration as flat parameters, the layers and the summary
    assert set(prediction) == {"config", "layers", "summary", "delta_summary"}
    assert prediction["config"]["block1.placement"] == "after_act"
    assert prediction["config"]["recalibrate_bn"] is False
    # block0's BN has no regulariser before it: no shift
    assert prediction["layers"]["block0.bn"]["exact"] == 1.0
    assert prediction["layers"]["block0.bn"]["sources"] == []
    # block1's BN gets block0's dropout through a Linear layer: shifted, but less than at the BN
    block1 = prediction["layers"]["block1.bn"]
    assert block1["sources"] == ["block0.drop"]
    assert 0.5 < block1["exact"] < 1
    # the summary: the furthest from 1, the product along the path
    assert prediction["summary"]["worst_delta"] == block1["exact"]
    assert prediction["summary"]["product"] == pytest.approx(block1["exact"])
    # each layer's lag, from its momentum and the trial's 2 short epochs, and Δ = dropout × lag:
    # BN starts from running_var 1, above the variance it will see, and has not forgotten it
    for layer in prediction["layers"].values():
        assert 0.5 < layer["lag"] < 1
        assert layer["delta"] == pytest.approx(layer["exact"] * layer["lag"])


def test_predict_takes_a_config_file(write_spec, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"blocks": [BEFORE_BN, BEFORE_BN], "recalibrate_bn": True}))
    prediction = predict_json(write_spec(tiny_spec()), "--config", config)

    # the file's configuration is the one predicted
    assert prediction["config"]["block0.placement"] == "before_bn"
    assert prediction["config"]["recalibrate_bn"] is True
    # dropout at 0.5 straight before BN: Δ = v / (c² + 2v) <= 1/2 at every BN
    for name, layer in prediction["layers"].items():
        assert 0 < layer["exact"] <= 0.5 + 1e-9, (name, layer)
        assert layer["sources"] == [name.replace(".bn", ".drop")]
        # recalibrated: running_var becomes the variance with dropout off, so Δ is 1
        assert layer["lag"] == pytest.approx(1 / layer["exact"])
        assert layer["delta"] == pytest.approx(1.0)


@pytest.mark.slow
def test_predict_a_recommendation_repeats_the_trials_prediction(write_spec):
    path = write_spec(tiny_spec(study={"n_trials": 1}))
    run_study(load_spec(path))
    recommended_file = Path(path).parent / "out" / "recommended.yaml"
    recommended = yaml.safe_load(recommended_file.read_text())
    prediction = predict_json(path, "--config", recommended_file)

    # recommended.yaml is a configuration: its blocks and its recalibrate_bn are read
    blocks = [
        {key: prediction["config"][f"block{i}.{key}"] for key in block}
        for i, block in enumerate(recommended["blocks"])
    ]
    assert blocks == recommended["blocks"]
    assert prediction["config"]["recalibrate_bn"] == recommended["recalibrate_bn"]
    # the same network from the same seed: what the trial predicted before training
    stored = recommended["shift"]["predicted"]
    assert list(prediction["layers"]) == list(stored["layers"])
    for name, layer in prediction["layers"].items():
        assert layer["exact"] == pytest.approx(stored["layers"][name]["exact"]), name
    assert prediction["summary"]["worst_layer"] == stored["summary"]["worst_layer"]


def _blocks(second: dict) -> dict:
    return {"blocks": [BEFORE_BN, {**BEFORE_BN, **second}]}


BAD_CONFIGS = {
    "wrong block count": (
        {"blocks": [BEFORE_BN]},
        "blocks: the model has 2 blocks, got 1",
    ),
    "not a list": ({"blocks": 2}, "blocks: expected a list"),
    "bad rate": (_blocks({"rate": 1.5}), "blocks[1].rate: a drop rate must lie in [0, 1), got 1.5"),
    "rate not a number": (_blocks({"rate": "half"}), "blocks[1].rate: expected a number"),
    "unknown placement": (
        _blocks({"placement": "sideways"}),
        "blocks[1].placement: unknown placement 'sideways'; expected one of: none, before_bn",
    ),
    "placement of another template": (
        _blocks({"placement": "in_branch"}),
        "blocks[1].placement: in_branch does not apply to mlp blocks",
    ),
    "stochastic depth as a regularizer": (
        _blocks({"regularizer": "stochastic_depth"}),
        "blocks[1].regularizer: stochastic_depth drops a whole residual branch; "
        "choose it with placement: residual",
    ),
    "unknown key": (_blocks({"colour": "red"}), "blocks[1].colour: unknown parameter"),
    "recalibrate_bn not a bool": (
        {**_blocks({}), "recalibrate_bn": "yes"},
        "recalibrate_bn: expected true or false, got 'yes'",
    ),
    "recalibrate_bn a number": (
        {**_blocks({}), "recalibrate_bn": 1},
        "recalibrate_bn: expected true or false, got 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_one_line_naming_the_file_and_field(write_spec, tmp_path, case):
    raw, message = BAD_CONFIGS[case]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("predict", write_spec(tiny_spec()), "--config", config)

    # exit 2, one line: the file, the field, what is wrong
    assert_one_line_error(result, f"error: {config}: {message}")


def test_a_missing_config_file_is_named(write_spec, tmp_path):
    result = invoke("predict", write_spec(tiny_spec()), "--config", tmp_path / "nowhere.yaml")

    # the missing file is named, in one line
    assert_one_line_error(result, f"{tmp_path / 'nowhere.yaml'}: ", "not found")


def test_export_without_a_study_is_a_one_line_error(write_spec):
    # no study has run yet: say so, in one line
    assert_one_line_error(invoke("export", write_spec(tiny_spec())), "study.name", "'tiny'")


# --- every error line: one line, capped, no secret in it ------------------------------------------

SECRET = "s3cr3t-Pw"


def closed_port() -> int:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:{{port}}/0",
        f"postgresql://postgres@127.0.0.1:{{port}}/test?password={SECRET}",
    ],
)
def test_a_storage_that_cannot_be_opened_names_it_without_its_password(write_spec, url):
    result = invoke("export", write_spec(tiny_spec()), "--storage", url.format(port=closed_port()))

    # one line naming the storage, its password masked
    assert_one_line_error(result, "study.storage: cannot open", "127.0.0.1", "***")
    assert SECRET not in result.output


def test_an_unreachable_tracking_server_is_named_without_its_token(write_spec, tmp_path):
    spec = write_spec(tiny_spec())
    (tmp_path / "out").mkdir()
    optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'out/autotune.db'}")
    uri = f"http://user:{SECRET}@127.0.0.1:{closed_port()}"
    result = invoke("sync", spec, "--tracking-uri", uri)

    # the server is named, with its user and without the token
    assert_one_line_error(result, "mlflow.tracking_uri: http://user:***@127.0.0.1:")
    assert SECRET not in result.output


def test_a_long_bad_value_is_abbreviated(write_spec):
    result = invoke("validate", write_spec({"study": {"name": "x" * 100_000}}))

    # the field and the start of the value, not a hundred thousand characters
    assert_one_line_error(result, "study.name", "x" * 50 + "…")
    assert len(result.stderr) < 400


def test_an_error_with_a_line_break_is_one_line(tmp_path):
    result = invoke("validate", tmp_path / "two\nlines.yaml")

    # a file name with a newline in it still makes one line: the newline is shown escaped
    assert_one_line_error(result, "two\\nlines.yaml", "not found")


@pytest.mark.slow
def test_command_line_overrides_budget_and_timeout(write_spec):
    path = write_spec(tiny_spec(study={"n_trials": 50}))

    # --timeout stops starting trials after the first one; --n-trials caps the budget
    assert invoke("run", path, "--timeout", "0.01").exit_code == 0
    out = Path(path).parent / "out"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'autotune.db'}")
    assert len(study.trials) == 1
    assert invoke("run", path, "--n-trials", "3").exit_code == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'autotune.db'}")
    assert len(study.trials) == 3


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_study_resumes_with_more_trials_and_no_duplicates(write_spec, signum):
    budget = 3
    # 150 epochs: a few seconds a trial, longer than a look at the storage takes on a busy machine
    path = write_spec(tiny_spec(study={"n_trials": budget}, train={"max_epochs": 150}))
    storage = f"sqlite:///{Path(path).parent / 'out' / 'autotune.db'}"

    def trials() -> list:
        try:
            return optuna.load_study(study_name="tiny", storage=storage).trials
        except Exception:  # not created yet
            return []

    def states() -> list[TrialState]:
        return [t.state for t in trials()]

    def second_mid_training() -> bool:
        # a trial done, and the next one early in its 150 epochs: a signal now finds it training
        found = trials()
        states = [t.state for t in found]
        return states == [TrialState.COMPLETE, TrialState.RUNNING] and (
            1 <= len(found[1].intermediate_values) <= 30
        )

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*AUTOTUNE, "run", str(path)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # interrupt while the second trial trains, after the first completed
    _wait_for(second_mid_training, 120, "a completed trial and one mid-training")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)

    # the run stops cleanly: exit 130, the running trial failed (not left RUNNING)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "again to resume" in stderr
    assert states() == [TrialState.COMPLETE, TrialState.FAIL]
    first = optuna.load_study(study_name="tiny", storage=storage).trials[0]
    # the same command resumes: the budget is reached, earlier trials are kept, none repeated
    subprocess.run([*AUTOTUNE, "run", str(path)], env=env, check=True, capture_output=True)
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == budget
    assert len(study.trials) == budget + 1
    assert (study.trials[0].number, study.trials[0].value) == (first.number, first.value)
    assert study.trials[1].user_attrs["interrupted"] is True
    # the recommendation counts every trial
    recommended = yaml.safe_load((Path(path).parent / "out" / "recommended.yaml").read_text())
    assert recommended["study"]["trials"] == {"COMPLETE": budget, "FAIL": 1}
    # MLflow: one parent run across both runs; the interrupted trial's run is KILLED
    client = MlflowClient(f"sqlite:///{Path(path).parent / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    roles = sorted(r.data.tags["autotune.role"] for r in runs)
    assert roles == ["parent"] + ["trial"] * (budget + 1)
    killed = next(r for r in runs if r.data.tags.get("autotune.trial") == "1")
    assert (killed.info.status, killed.data.tags["autotune.state"]) == ("KILLED", "INTERRUPTED")


# --- the output folder or the disk refuses a write: one line, exit 3, the study resumable -----

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def study_section(request):
    """The spec's study section for each storage: sqlite in the output folder (the default), or
    this machine's PostgreSQL under a name no other test uses, deleted afterwards."""
    if request.param == "sqlite":
        yield {}
        return
    name = f"faults-{uuid.uuid4().hex[:12]}"
    yield {"name": name, "storage": POSTGRES}
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=POSTGRES)


def stored_study(spec_file: Path) -> optuna.Study:
    spec = load_spec(spec_file)
    return optuna.load_study(study_name=spec.study.name, storage=spec.storage_url)


def assert_write_error(result, *fragments: str) -> None:
    # exit code 3, no traceback, and one error line: the last line on stderr
    assert result.exit_code == 3, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_a_read_only_output_folder_is_one_line_and_exit_3(
    write_spec, tmp_path, read_only, study_section
):
    path = write_spec(tiny_spec(study={**study_section, "n_trials": 2}))
    out = tmp_path / "out"
    read_only.on(out)
    result = invoke("run", path)
    # the line names the folder and the file system's reason; nothing was written there
    assert_write_error(result, f"{out}: Operation not permitted")
    assert list(out.iterdir()) == []
    # once the folder takes files, the same command runs the study
    read_only.off()
    assert invoke("run", path).exit_code == 0
    assert (out / "recommended.yaml").is_file()


def test_input_stats_that_cannot_be_written_are_one_line_and_exit_3(
    write_spec, tmp_path, study_section
):
    path = write_spec(tiny_spec(study={**study_section, "n_trials": 2}))
    stats = tmp_path / "out" / "input_stats.pt"
    stats.mkdir(parents=True)  # a folder where the file must go: a real failed write
    result = invoke("run", path)
    assert_write_error(result, f"{stats}: Is a directory")
    stats.rmdir()
    started = time.monotonic()
    assert invoke("run", path).exit_code == 0
    assert stats.is_file()
    # the failed run said it made no parent run: the rerun did not wait for one
    assert time.monotonic() - started < PARENT_WAIT_SECONDS


@pytest.mark.slow
def test_a_disk_that_fills_mid_study_is_one_line_and_a_rerun_finishes(
    write_spec, tmp_path, monkeypatch, study_section
):
    budget = 4
    path = write_spec(tiny_spec(study={**study_section, "n_trials": budget}))
    weights = tmp_path / "out" / "weights"
    real_replace, saved = os.replace, []

    def second_weights_fill_the_disk(source, target, **kwargs):
        if Path(target).parent == weights:
            saved.append(Path(target))
            if len(saved) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", second_weights_fill_the_disk)
    result = invoke("run", path)
    monkeypatch.undo()
    full = saved[1]
    assert_write_error(result, f"{full}: No space left on device")
    # the trial whose weights met the full disk failed, with the reason; the run stopped there
    study = stored_study(path)
    last = study.trials[-1]
    assert [t.state for t in study.trials[:-1]] == [TrialState.COMPLETE] * (len(study.trials) - 1)
    assert last.state == TrialState.FAIL and str(full) in last.user_attrs["fail_reason"]
    assert full.name == f"trial_{last.number}.pt"
    # no file cut short, and no temporary file, is left behind
    assert sorted(p.name for p in weights.iterdir()) == [saved[0].name]
    # the same command, with room on the disk again, finishes the budget
    assert invoke("run", path).exit_code == 0
    study = stored_study(path)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == budget
    assert (tmp_path / "out" / "recommended.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["optuna", "mlflow"])
def test_a_database_whose_folder_turns_read_only_mid_study_is_one_line(
    write_spec, tmp_path, monkeypatch, read_only, store
):
    from autotune.run.progress import RichProgress

    budget = 4
    folder = tmp_path / "db"  # the sqlite database this test makes read-only, alone there
    study = {"n_trials": budget, "heartbeat_interval": 1, "heartbeat_grace": 2}
    if store == "optuna":
        spec = tiny_spec(
            study={**study, "storage": f"sqlite:///{folder}/autotune.db"},
            mlflow={"enabled": False},
        )
    else:
        spec = tiny_spec(study=study, mlflow={"tracking_uri": f"sqlite:///{folder}/mlflow.db"})
    path = write_spec(spec)
    real_trial_done = RichProgress.trial_done

    def then_read_only(self, study, trial) -> None:  # sqlite can make no journal file there
        real_trial_done(self, study, trial)
        if trial.number == 1:
            read_only.on(folder)

    monkeypatch.setattr(RichProgress, "trial_done", then_read_only)
    result = invoke("run", path)
    monkeypatch.undo()
    assert_write_error(result, f"{folder}/{store if store == 'mlflow' else 'autotune'}.db: ")
    read_only.off()
    # the same command resumes the study and finishes its budget
    assert invoke("run", path).exit_code == 0
    finished = [t for t in stored_study(path).trials if t.state == TrialState.COMPLETE]
    assert len(finished) == budget


# --- the user's own code fails: one line naming it, never its exit code; the outputs kept ---

FACTORY = """
from torch import nn

CALLS = 0  # constructions in this process: 1 and 2 check the spec, then 2 a trial


def build(input_shape, n_classes):
    global CALLS
    CALLS += 1
    if {fails}:
        {raises}
    return Net(n_classes)


class Net(nn.Module):
    def __init__(self, n_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_classes)
        )

    def forward(self, x):
        if self.training and {forward_fails}:
            raise SystemExit(4)
        return self.body(x)
"""


def factory_spec(
    write_spec, tmp_path: Path, fails: str = "False", raises: str = "pass", forward: str = "False"
) -> tuple[Path, str]:
    """A spec whose model.import is a factory written beside it, and the factory's name. Each
    gets a module name of its own: a module stays imported in this process, with its count."""
    module = f"factory_{uuid.uuid4().hex[:8]}"
    code = FACTORY.format(fails=fails, raises=raises, forward_fails=forward)
    (tmp_path / f"{module}.py").write_text(code)
    spec = tiny_spec(study={"n_trials": 3})
    spec["model"] = {"import": f"{module}:build"}
    return write_spec(spec), f"'{module}:build'"


@pytest.mark.parametrize(
    "verb, fails, raises",
    [
        ("validate", "CALLS == 1", "raise SystemExit(3)"),  # the first construction
        ("run", "CALLS == 2", "raise SystemExit(3)"),  # the check before any trial
        ("validate", "True", "raise SystemExit"),  # sys.exit() without a code
    ],
)
def test_a_factory_that_exits_is_one_line_and_exit_2(write_spec, tmp_path, verb, fails, raises):
    path, factory = factory_spec(write_spec, tmp_path, fails, raises)
    result = invoke(verb, path)
    # bad input, said in one line naming the factory: not an exit with the code it chose
    code = "3" if "3" in raises else "None"
    assert_one_line_error(result, f"model.import: {factory} failed to build: SystemExit({code})")


def test_a_module_that_exits_as_it_is_imported_is_one_line_and_exit_2(write_spec, tmp_path):
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit(3)\n")
    spec = tiny_spec()
    spec["model"] = {"import": "exits_on_import:build"}
    result = invoke("validate", write_spec(spec))
    assert_one_line_error(
        result, "model.import: cannot import 'exits_on_import:build': SystemExit(3)"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "fails, forward, reason",
    [
        # the factory exits in the first trial's construction
        ("CALLS == 3", "False", "model.import: {factory} failed to build: SystemExit(3)"),
        # the model it built exits in the first trial's first pass in training mode
        ("False", "CALLS == 3", "model.import {factory} raised SystemExit(4)"),
    ],
)
def test_user_code_that_exits_in_a_trial_fails_that_trial_and_the_study_goes_on(
    write_spec, tmp_path, fails, forward, reason
):
    path, factory = factory_spec(write_spec, tmp_path, fails, "raise SystemExit(3)", forward)
    result = invoke("run", path)
    # the study finished its budget: exit 0, nothing interrupted
    assert result.exit_code == 0, (result.output, result.exception)
    study = stored_study(path)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    # the failed trial says which code exited, and how
    assert study.trials[0].user_attrs["fail_reason"] == (
        "UserCodeError: " + reason.format(factory=factory)
    )
    assert "interrupted" not in study.trials[0].user_attrs


@pytest.mark.slow
def test_a_factory_that_fails_after_a_trial_completed_still_leaves_a_recommendation(
    write_spec, tmp_path
):
    # the first trial completes (constructions 3 and 4); every construction after fails
    path, factory = factory_spec(
        write_spec, tmp_path, "CALLS >= 5", "raise ValueError('out of memory')"
    )
    result = invoke("run", path)
    # five failures in a row stop the run (exit 1), as ever, with no traceback
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    failed = f"model.import: {factory} failed to build: ValueError: out of memory"
    # one line says what the export could not do, naming the factory
    said = [line for line in result.stderr.splitlines() if "written unverified" in line]
    assert said == [f"{failed}; recommended.yaml written unverified, best_model.py not written"]
    # recommended.yaml is written from the trial that completed, and says it is unverified
    out = tmp_path / "out"
    recommended = yaml.safe_load((out / "recommended.yaml").read_text())
    assert recommended["best"]["trial"] == 0
    assert recommended["model"]["blocks_at"] == ["body.2"]
    assert recommended["verified"] == {
        "best_model.py": f"not written: {failed}",
        "recommended.yaml": f"not verified: {failed}",
    }
    assert not (out / "best_model.py").exists()


def test_devices_that_are_not_there_are_one_line(write_spec, monkeypatch):
    spec = write_spec(tiny_spec())
    # no GPU on this machine: the run would train on the CPU, not where it was told
    monkeypatch.setattr("autotune.run.workers.visible_gpus", lambda: 0)
    result = CliRunner().invoke(main, ["run", str(spec), "--devices", "0"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --devices 0: this machine shows no CUDA device")
    # two GPUs, and the third asked for
    monkeypatch.setattr("autotune.run.workers.visible_gpus", lambda: 2)
    result = CliRunner().invoke(main, ["run", str(spec), "--devices", "1,2"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "no CUDA device 2 here: this process sees 2 (0, 1)" in result.output
    # on the CPU there is nothing to choose
    cpu = write_spec(tiny_spec(train={"accelerator": "cpu"}), name="cpu.yaml")
    result = CliRunner().invoke(main, ["run", str(cpu), "--devices", "0"])
    assert result.exit_code == 2 and "train.accelerator is cpu" in result.output

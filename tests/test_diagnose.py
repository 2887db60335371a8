"""`autotune diagnose` and `autotune fix` on a model no autotune study made: a small cnn trained
in plain PyTorch, its state_dict saved, its data an npz file. The dropout factor it reports is
checked against the closed form of dropout straight before BN, from the moments of what reaches
the dropout; the fix against the validation accuracy it claims."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from sklearn.datasets import load_digits

from autotune.cli import main
from autotune.core.spec import load_spec
from autotune.nn.data import load_data
from autotune.nn.weights import file_digest
from autotune.run.repair import record_path

MODEL = '''
from torch import nn


def build(n_classes=10, rate=0.5, batchnorm=True):
    """conv, BN, ReLU, then conv, dropout straight before BN, ReLU, and the classifier."""
    bn = nn.BatchNorm2d if batchnorm else lambda c: nn.Identity()
    drop = [nn.Dropout(rate)] if rate > 0 else []
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), bn(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), *drop, bn(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes),
    )
'''
RATE = 0.5


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_spec(folder, **kwargs):
    spec = {
        "study": {"name": "plain"},
        "data": {"path": "digits.npz", "batch_size": 64, "standardize": False},
        "model": {"import": "plaincnn:build", "kwargs": kwargs},
        "mlflow": {"enabled": False},
        "output": str(folder / "out"),
    }
    path = folder / f"spec-{'-'.join(f'{k}{v}' for k, v in sorted(kwargs.items()))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def train_plain(folder, rate, *, settled):
    """The model trained by plain PyTorch, as its owner would, on the rows autotune's split
    leaves for training: validation and test rows stay unseen. Adam at 1e-2 for 8 epochs;
    settled: the rate falls to nothing (one cycle), so the weights settle and BN's running
    statistics catch up. Its state_dict's file and the model."""
    import importlib
    import sys

    sys.path.insert(0, str(folder))
    try:
        build = importlib.import_module("plaincnn").build
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    model = build(rate=rate)
    spec = load_spec(write_spec(folder, rate=rate))
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    x, y = data.x_train, data.y_train
    epochs, steps = 8, -(-len(x) // 64)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    total = epochs * steps
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=total)
        if settled
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=total)
    )
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    path = folder / f"weights-{rate}-{'settled' if settled else 'constant'}.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]
    np.savez(folder / "digits.npz", x=x, label=digits.target)
    (folder / "plaincnn.py").write_text(MODEL)
    trained = {
        RATE: train_plain(folder, RATE, settled=False),
        "adapted": train_plain(folder, RATE, settled=True),
        0.0: train_plain(folder, 0.0, settled=True),
    }
    return folder, trained


def closed_form_dropout_factor(spec_path, model) -> float:
    """Dropout straight before BN: Δ = v / ((c² + v)/p − c²) per channel, c and v the mean and
    variance of the dropout's input over the training split (eval mode), averaged over the
    channels (the conventions of autotune.core.theory)."""
    spec = load_spec(spec_path)
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    seen = []
    hook = model[4].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        for x, _ in data.train_dataloader():
            model(x)
    hook.remove()
    inputs = torch.cat(seen).double().transpose(0, 1).reshape(16, -1)
    c, v, p = inputs.mean(dim=1), inputs.var(dim=1), 1 - RATE
    return float((v / ((c**2 + v) / p - c**2)).mean())


def test_diagnose_measures_the_dropout_factor_the_closed_form_gives(plain):
    folder, trained = plain
    weights, model = trained[RATE]
    spec = write_spec(folder, rate=RATE)
    result = invoke("diagnose", spec, "--weights", weights, "--json")
    assert result.exit_code == 0, result.output
    diagnosis = json.loads(result.stdout)
    layers = diagnosis["layers"]
    assert list(layers) == ["1", "5"]
    expected = closed_form_dropout_factor(spec, model)
    assert expected < 0.8  # a real shift to find
    assert layers["5"]["dropout"] == pytest.approx(expected, rel=0.05)
    assert layers["5"]["predicted"] == pytest.approx(expected, rel=0.05)
    # BN's first layer: no regulariser reaches it, its dropout factor is exactly 1
    assert layers["1"]["dropout"] == 1.0
    assert diagnosis["shifted"] == ["5"]
    assert layers["5"]["recalibrated"] == pytest.approx(1.0, abs=0.05)
    assert diagnosis["gain"] > 0


def test_the_table_names_the_shifted_layer_within_80_columns(plain, tmp_path):
    folder, trained = plain
    page = tmp_path / "diagnosis.html"
    result = invoke(
        "diagnose", write_spec(folder, rate=RATE), "--weights", trained[RATE][0], "--html", page
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if not line.startswith("wrote ")]
    assert max(len(line) for line in lines) <= 80
    assert any(line.startswith("5 ") and line.endswith("shifted") for line in lines)
    assert "`autotune fix` writes the recalibrated weights" in result.stdout
    assert "<table>" in page.read_text() and "shifted" in page.read_text()


def test_fix_writes_recalibrated_weights_that_score_better(plain, tmp_path):
    folder, trained = plain
    weights, _ = trained[RATE]
    out = tmp_path / "fixed.pt"
    result = invoke("fix", write_spec(folder, rate=RATE), "--weights", weights, "--out", out)
    assert result.exit_code == 0, result.output
    record = yaml.safe_load(record_path(out).read_text())
    assert record["fixed"]["sha256"] == file_digest(out)
    assert record["from"]["sha256"] == file_digest(weights)
    assert record["val"]["after"]["acc"] > record["val"]["before"]["acc"]
    assert record["test"]["after"]["acc"] >= record["test"]["before"]["acc"]
    before = torch.load(weights, weights_only=True)
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)  # the same keys, in the same order
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".running_" in k or "num_batches" in k for k in changed)


def test_fix_refuses_weights_that_adapted_to_the_shift(plain, tmp_path):
    # trained until its weights settled, this cnn's layers after the dropout learned the
    # shifted scale: recalibration removes the shift and loses accuracy, so nothing is written
    folder, trained = plain
    out = tmp_path / "fixed.pt"
    spec = write_spec(folder, rate=RATE)
    result = invoke("fix", spec, "--weights", trained["adapted"][0], "--out", out)
    assert result.exit_code == 1, result.output
    assert "not written: recalibrated, the weights score worse (validation acc" in result.stderr
    assert not out.exists() and not record_path(out).exists()
    result = invoke("diagnose", spec, "--weights", trained["adapted"][0])
    assert "recalibration wins nothing here: the weights may have adapted" in result.stdout


def test_a_lightning_checkpoint_is_read_and_its_prefix_kept(plain, tmp_path):
    folder, trained = plain
    state = torch.load(trained[RATE][0], weights_only=True)
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"epoch": 4, "state_dict": {f"model.{k}": v for k, v in state.items()}}, checkpoint)
    out = tmp_path / "fixed.pt"
    result = invoke("fix", write_spec(folder, rate=RATE), "--weights", checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    assert set(torch.load(out, weights_only=True)) == {f"model.{k}" for k in state}


def test_a_model_without_dropout_is_unshifted_and_left_as_it_is(plain, tmp_path):
    folder, trained = plain
    spec = write_spec(folder, rate=0.0)
    result = invoke("diagnose", spec, "--weights", trained[0.0][0], "--json")
    assert result.exit_code == 0, result.output
    diagnosis = json.loads(result.stdout)
    assert diagnosis["shifted"] == []
    assert all(layer["dropout"] == 1.0 for layer in diagnosis["layers"].values())
    out = tmp_path / "fixed.pt"
    result = invoke("fix", spec, "--weights", trained[0.0][0], "--out", out)
    assert result.exit_code == 0, result.output
    assert "not written: no BN layer is shifted" in result.stdout
    assert not out.exists() and not record_path(out).exists()


def bad_inputs(folder, trained):
    weights = trained[RATE][0]
    (folder / "notes.txt").write_text("not weights")
    torch.save({"0.weight": torch.zeros(3)}, folder / "other.pt")
    state = torch.load(weights, weights_only=True)
    state["9.weight"] = torch.zeros(7, 16)
    torch.save(state, folder / "wide.pt")
    return [
        (write_spec(folder), folder / "absent.pt", "--weights: ", "no such file"),
        (write_spec(folder), folder / "notes.txt", "--weights: ", "cannot read it"),
        (write_spec(folder), folder / "other.pt", "does not fit the model: missing 0.bias"),
        (write_spec(folder), folder / "wide.pt", "9.weight is (7, 16) in the file, (10, 16)"),
        (
            write_spec(folder, batchnorm=False),
            weights,
            "model: 'plaincnn:build' has no BatchNorm layer",
        ),
    ]


@pytest.mark.parametrize("command", ["diagnose", "fix"])
def test_bad_input_is_one_line_and_exit_2(plain, tmp_path, command):
    folder, trained = plain
    out = ("--out", tmp_path / "fixed.pt") if command == "fix" else ()
    for spec, weights, *fragments in bad_inputs(folder, trained):
        result = invoke(command, spec, "--weights", weights, *out)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert all(f in result.stderr for f in fragments), result.stderr
    assert not (tmp_path / "fixed.pt").exists()


def test_a_template_needs_the_configuration_its_weights_trained_with(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"data": {"name": "wine"}, "mlflow": {"enabled": False}}))
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "w.pt")
    result = invoke("diagnose", spec, "--weights", tmp_path / "w.pt")
    assert result.exit_code == 2
    assert "--config: the template 'mlp' is built from the configuration" in result.stderr


DATAMODULE = '''
import numpy as np
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset


class Digits(pl.LightningDataModule):
    """The owner's own loaders: the first 1,400 rows train, the rest validate."""

    n_classes = 10

    def setup(self, stage=None):
        data = np.load(__file__.rsplit("/", 1)[0] + "/digits.npz")
        x, y = torch.tensor(data["x"]), torch.tensor(data["label"])
        self.train, self.val = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)
'''


def test_a_user_datamodule_feeds_the_diagnosis_and_the_fix(plain, tmp_path):
    folder, trained = plain
    (folder / "digitsdm.py").write_text(DATAMODULE)
    spec = yaml.safe_load(write_spec(folder, rate=RATE).read_text())
    spec["data"] = {"datamodule": "digitsdm:Digits"}
    path = folder / "spec-datamodule.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = invoke("diagnose", path, "--weights", trained[RATE][0], "--json")
    assert result.exit_code == 0, result.output
    diagnosis = json.loads(result.stdout)
    assert (diagnosis["train_rows"], diagnosis["val_rows"]) == (1400, 397)
    assert diagnosis["shifted"] == ["5"]
    out = tmp_path / "fixed.pt"
    result = invoke("fix", path, "--weights", trained[RATE][0], "--out", out)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(record_path(out).read_text())["test"] is None  # it has no test split


def test_the_diagnosis_is_logged_to_mlflow_as_a_run_of_its_own(plain, tmp_path):
    from mlflow.tracking import MlflowClient

    folder, trained = plain
    spec = yaml.safe_load(write_spec(folder, rate=RATE).read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec["mlflow"] = {"tracking_uri": uri, "experiment": "plain"}
    path = folder / "spec-mlflow.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = invoke("diagnose", path, "--weights", trained[RATE][0], "--mlflow")
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("plain").experiment_id])
    assert run.data.tags["autotune.role"] == "diagnosis"
    assert run.data.metrics["measured_delta_dropout.5"] < 0.8
    assert run.data.metrics["measured_delta.1"] == pytest.approx(1.0, abs=0.05)
    assert run.data.params["weights"] == trained[RATE][0].name
    assert f"logged run {run.info.run_id}" in result.stdout


def test_a_template_is_built_from_its_configuration_file(tmp_path):
    from autotune.core.space_files import config_from_mapping
    from autotune.nn.models import build_model

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "wine", "test_fraction": 0},
                "model": {"template": "mlp", "widths": [32, 16]},
                "mlflow": {"enabled": False},
            }
        )
    )
    block = {"placement": "before_bn", "rate": 0.5, "regularizer": "dropout", "bn_momentum": 0.1}
    config = {"blocks": [block, {**block, "placement": "none", "rate": 0.0}]}
    (tmp_path / "recommended.yaml").write_text(yaml.safe_dump(config))
    spec = load_spec(spec_path)
    data = load_data(spec.data, seed=0)
    configured = config_from_mapping(config, n_blocks=2, template="mlp")
    model = build_model(spec.model, configured, data.input_shape, data.n_classes)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    result = invoke(
        "diagnose", spec_path, "--weights", tmp_path / "w.pt",
        "--config", tmp_path / "recommended.yaml", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    first, second = layers.values()
    assert first["dropout"] < 0.9 and first["method"] == "covariance"
    assert first["predicted"] == pytest.approx(first["dropout"], rel=0.1)
    # at inference BN is affine: the first dropout's noise reaches the second BN too
    assert second["dropout"] < 1 and second["method"] == "monte_carlo"

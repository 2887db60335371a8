"""autotune.outputs.export: the standalone best_model.py snippet and its verification."""

from __future__ import annotations

import ast
import re
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_spec
from torch import nn

from autotune.core.names import PARENT_ATTR, RELOGGED_RUN
from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import ModelSpec, parse_spec
from autotune.nn.models import build_model
from autotune.nn.weights import WeightsDoNotLoad, verify_weights
from autotune.outputs import export, snippet
from autotune.outputs.export import write_outputs
from autotune.outputs.snippet import (
    NotRendered,
    load_snippet,
    render_module,
    render_snippet,
    verify_snippet,
)
from autotune.run.loop import run_study
from autotune.search.storage import load_existing_study

DIGITS = (1, 8, 8)


def case(template: str, placement: str, kind: str, **model) -> tuple:
    """A (model spec, config, input shape) triple with two differently tuned blocks."""
    rate = 0.0 if placement == "none" else 0.25
    kind = "none" if placement == "none" else kind
    blocks = (BlockConfig(placement, rate, kind, 0.05), BlockConfig(placement, rate, kind, 0.3))
    spec = ModelSpec(template=template, widths=[6, 4], **model)
    return spec, TrialConfig(blocks), DIGITS


CASES = {
    **{
        f"mlp-{p}": case("mlp", p, "dropout")
        for p in ("none", "before_bn", "after_bn", "after_act")
    },
    **{
        f"cnn-{p}-{k}": case("cnn", p, k)
        for p in ("before_bn", "after_bn", "after_act")
        for k in ("dropout", "spatial_dropout")
    },
    "cnn-none": case("cnn", "none", "none"),
    # the regularizers torch lacks: their source travels inside the snippet
    **{f"mlp-before_bn-{k}": case("mlp", "before_bn", k) for k in ("gaussian", "uout")},
    "mlp-after_act-alpha_dropout": case("mlp", "after_act", "alpha_dropout"),
    "cnn-before_bn-dropblock": case("cnn", "before_bn", "dropblock"),
    # residual blocks: a projection shortcut, stochastic depth, dropout inside the branch
    "resnet-none": case("resnet", "none", "none"),
    "resnet-residual": case("resnet", "residual", "stochastic_depth"),
    **{f"resnet-in_branch-{k}": case("resnet", "in_branch", k) for k in ("dropout", "dropblock")},
    "resnet-after_act-gaussian": case("resnet", "after_act", "gaussian"),
    "resnet-before_bn-uout": case("resnet", "before_bn", "uout"),
    "resnet-after_bn-spatial_dropout": case("resnet", "after_bn", "spatial_dropout"),
    "cnn-silu-no-pool": case("cnn", "after_act", "spatial_dropout", activation="silu", pool=False),
    "mlp-gelu-mixed": (
        ModelSpec(template="mlp", widths=[5, 7, 3], activation="gelu"),
        TrialConfig(
            (
                BlockConfig("none", 0.0, "none", 0.1),
                BlockConfig("before_bn", 0.123456789, "dropout", 0.0123456789),
                BlockConfig("after_act", 0.4, "dropout", 0.5),
            )
        ),
        (13,),
    ),
}


def trained(spec: ModelSpec, config: TrialConfig, shape: tuple[int, ...]) -> nn.Module:
    """The model, with BN running statistics moved off their initial values."""
    torch.manual_seed(0)
    model = build_model(spec, config, shape, 10)
    with torch.no_grad():
        model.train()(torch.randn(16, *shape) * 3 + 1)
    return model.eval()


def write_snippet(tmp_path: Path, model: nn.Module, shape: tuple[int, ...]) -> Path:
    path = tmp_path / "best_model.py"
    path.write_text(render_snippet(model, "A test network.", shape))
    return path


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the snippet rebuilds the network ------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_snippet_rebuilds_the_same_network(tmp_path: Path, name: str) -> None:
    spec, config, shape = CASES[name]
    model = trained(spec, config, shape)
    path = write_snippet(tmp_path, model, shape)
    rebuilt = load_snippet(path)
    # the same layers, names and hyperparameters
    assert repr(rebuilt) == repr(model)
    # the same number of parameters
    assert n_params(rebuilt) == n_params(model)
    # verify_snippet agrees
    verify_snippet(path, model)

    batch = torch.randn(4, *shape)
    rebuilt.eval()
    # before the weights are loaded, the fresh snippet computes something else
    assert not torch.allclose(rebuilt(batch), model(batch))
    # the tuned weights and BN statistics load with strict=True
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    # and then the two networks agree exactly in eval mode
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), model(batch))


def test_snippet_keeps_rates_and_momenta_exactly(tmp_path: Path) -> None:
    spec, config, shape = CASES["mlp-gelu-mixed"]
    rebuilt = load_snippet(write_snippet(tmp_path, trained(spec, config, shape), shape))
    # floats survive the round trip through source code bit for bit
    assert rebuilt.block1.drop.p == 0.123456789
    assert rebuilt.block1.bn.momentum == 0.0123456789
    assert rebuilt.block2.drop.p == 0.4


@pytest.mark.parametrize(
    "name", ["cnn-after_act-spatial_dropout", "resnet-residual", "resnet-before_bn-uout"]
)
def test_snippet_imports_only_torch(tmp_path: Path, name: str) -> None:
    spec, config, shape = CASES[name]
    source = write_snippet(tmp_path, trained(spec, config, shape), shape).read_text()
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    # torch, and OrderedDict from the standard library; nothing from autotune
    assert modules == {"torch", "collections"}


def test_snippet_records_the_input_shape_and_runs_as_a_script(tmp_path: Path, capsys) -> None:
    spec, config, shape = CASES["mlp-gelu-mixed"]
    model = trained(spec, config, shape)
    path = write_snippet(tmp_path, model, shape)
    namespace = runpy.run_path(str(path), run_name="__main__")
    # one example's shape, without the batch dimension
    assert namespace["INPUT_SHAPE"] == (13,)
    # run as a script it prints the parameter count and the output shape of a batch of 2
    out = capsys.readouterr().out
    assert f"{n_params(model)} parameters" in out
    assert "output of a batch of 2: (2, 10)" in out


@pytest.mark.parametrize(
    ("name", "classes"),
    [
        ("mlp-none", []),
        ("resnet-none", ["ResidualBlock"]),
        ("resnet-residual", ["StochasticDepth", "ResidualBlock"]),
        ("cnn-before_bn-dropblock", ["DropBlock2d"]),
        ("mlp-before_bn-gaussian", ["GaussianDropout"]),
    ],
)
def test_snippet_carries_the_classes_torch_lacks(tmp_path: Path, name: str, classes: list) -> None:
    spec, config, shape = CASES[name]
    source = write_snippet(tmp_path, trained(spec, config, shape), shape).read_text()
    defined = [node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef)]
    # each class the network uses, defined once, and no other
    assert defined == classes


@pytest.mark.parametrize(
    "name",
    [
        "mlp-before_bn-gaussian",
        "mlp-before_bn-uout",
        "cnn-before_bn-dropblock",
        "resnet-residual",
        "resnet-in_branch-dropblock",
    ],
)
def test_snippet_regularizers_draw_the_same_noise_in_training(tmp_path: Path, name: str) -> None:
    spec, config, shape = CASES[name]
    model = trained(spec, config, shape)
    rebuilt = load_snippet(write_snippet(tmp_path, model, shape))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    batch = torch.randn(8, *shape)
    outputs = []
    for network in (model, rebuilt):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(network.train()(batch))
    # the copied classes are the same code: the same seed, the same masks, the same output
    assert torch.equal(outputs[0], outputs[1])
    # and the noise is real: another seed, another output
    torch.manual_seed(2)
    with torch.no_grad():
        assert not torch.allclose(rebuilt.train()(batch), outputs[1])


def test_snippet_header_is_its_docstring(tmp_path: Path) -> None:
    spec, config, shape = CASES["mlp-none"]
    source = write_snippet(tmp_path, trained(spec, config, shape), shape).read_text()
    # the header opens the module docstring
    assert ast.get_docstring(ast.parse(source)).startswith("A test network.")


# --- verify_snippet catches a snippet that drifted -----------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a width
        ("nn.Linear(13, 5, bias=False)", "nn.Linear(13, 6, bias=False)"),
        # a drop probability
        ("nn.Dropout(p=0.4)", "nn.Dropout(p=0.5)"),
        # a BN momentum
        ("momentum=0.5)", "momentum=0.1)"),
        # a head without bias
        ("nn.Linear(3, 10, bias=True)", "nn.Linear(3, 10, bias=False)"),
    ],
)
def test_verify_snippet_raises_when_the_file_differs(tmp_path: Path, old: str, new: str) -> None:
    spec, config, shape = CASES["mlp-gelu-mixed"]
    model = trained(spec, config, shape)
    path = write_snippet(tmp_path, model, shape)
    text = path.read_text()
    # the edit hits the rendered source exactly once
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    # the edited network no longer matches the model
    with pytest.raises(
        RuntimeError,
        match=f"^{re.escape(str(path))}: the rendered network differs from the tuned one$",
    ):
        verify_snippet(path, model)


def test_verify_snippet_raises_for_another_model(tmp_path: Path) -> None:
    spec, config, shape = CASES["cnn-before_bn-dropout"]
    path = write_snippet(tmp_path, trained(spec, config, shape), shape)
    other_spec, other_config, _ = CASES["cnn-after_bn-dropout"]
    # the same widths with the slot elsewhere is a different network
    with pytest.raises(
        RuntimeError, match=f"^{re.escape(str(path))}: the rendered network differs"
    ):
        verify_snippet(path, trained(other_spec, other_config, shape))


# --- render_module -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        nn.LSTM(4, 4),
        nn.BatchNorm3d(4),
        nn.Dropout1d(0.1),
        nn.Sequential(nn.Linear(2, 2), nn.Softmax(dim=1)),
    ],
)
def test_render_module_refuses_what_it_cannot_write(module: nn.Module) -> None:
    # a module without a renderer is an error, never silently dropped
    with pytest.raises(ValueError, match=r"^cannot render \w+ as standalone PyTorch code$"):
        render_module(module)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (nn.Linear(3, 5), "nn.Linear(3, 5, bias=True)"),
        (nn.BatchNorm1d(7, momentum=0.05), "nn.BatchNorm1d(7, eps=1e-05, momentum=0.05)"),
        (nn.Dropout2d(0.2), "nn.Dropout2d(p=0.2)"),
        (nn.MaxPool2d(2), "nn.MaxPool2d(2)"),
        (nn.AdaptiveAvgPool2d(1), "nn.AdaptiveAvgPool2d(1)"),
        (nn.Identity(), "nn.Identity()"),
    ],
)
def test_render_module_leaves(module: nn.Module, source: str) -> None:
    # each supported leaf is written as the constructor call that rebuilds it
    assert render_module(module) == source
    assert repr(eval(source, {"nn": nn})) == repr(module)


# --- verify_weights: the rebuilt network, with the trained weights, computes the same -------------


def saved(tmp_path: Path, name: str) -> tuple[Path, Path, nn.Module, tuple]:
    """A CASES network's weights file and snippet, and a fresh copy of the network and its
    input shape to check them against."""
    spec, config, shape = CASES[name]
    model = trained(spec, config, shape)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    return (
        weights,
        write_snippet(tmp_path, model, shape),
        build_model(spec, config, shape, 10),
        shape,
    )


def test_verify_weights_passes_the_same_network_and_says_how_close(tmp_path: Path) -> None:
    weights, path, reference, shape = saved(tmp_path, "resnet-in_branch-dropout")
    # the snippet's network with the saved weights gives the tuned network's outputs
    assert verify_weights(load_snippet(path), reference, weights, shape, path) <= 1e-5


def test_verify_weights_catches_a_network_that_computes_something_else(tmp_path: Path) -> None:
    weights, path, reference, shape = saved(tmp_path, "resnet-in_branch-dropout")
    # the same layers (equal repr), but a residual block that forgets its shortcut
    rebuilt = load_snippet(path)
    block = next(m for m in rebuilt.modules() if type(m).__name__ == "ResidualBlock")
    block.forward = lambda x: block.drop(block.act(block.branch(x)))
    with pytest.raises(RuntimeError, match=r"outputs differ from the tuned network's by up to"):
        verify_weights(rebuilt, reference, weights, shape, path)


def test_verify_weights_names_weights_that_do_not_load(tmp_path: Path) -> None:
    spec, config, shape = CASES["mlp-gelu-mixed"]
    model = trained(spec, config, shape)
    weights = tmp_path / "w.pt"
    state = model.state_dict()
    state.pop(next(iter(state)))  # a parameter the file lacks
    torch.save(state, weights)
    path = write_snippet(tmp_path, model, shape)
    with pytest.raises(
        RuntimeError, match=rf"^{re.escape(str(path))}: the trained weights do not load"
    ):
        verify_weights(
            load_snippet(path), build_model(spec, config, shape, 10), weights, shape, path
        )


# --- nothing read from the storage runs: values are data, the verification runs autotune's code ---

# F3: a run id that ends the docstring, runs a command, and opens a string again
HOSTILE = '""";__import__("os").system("touch pwned");"""'


@pytest.fixture(scope="module")
def trained_study(tmp_path_factory) -> Path:
    """The output folder of a study of one completed trial (MLflow off)."""
    out = tmp_path_factory.mktemp("one-trial") / "out"
    run_study(parse_spec(study_of_one(out)))
    return out


def study_of_one(out: Path) -> dict:
    return tiny_spec(study={"n_trials": 1}, mlflow={"enabled": False}, output=str(out))


@pytest.fixture
def one_trial(trained_study: Path, tmp_path: Path, monkeypatch):
    """A copy of that study of its own, in tmp_path, which is the working directory: where
    `touch pwned` would land."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_study, tmp_path / "out")
    spec = parse_spec(study_of_one(tmp_path / "out"))
    return spec, load_existing_study(spec)


def test_a_hostile_run_id_in_the_study_is_not_rendered_and_nothing_runs(one_trial, tmp_path):
    spec, study = one_trial
    [trial] = study.trials
    # what `sync` copies from the tracking server into the study, as an attacker would set it
    study.set_user_attr(RELOGGED_RUN.format(trial.number), HOSTILE)
    study.set_user_attr(PARENT_ATTR, HOSTILE)
    write_outputs(study, spec)

    # nothing ran, and the value is in no output: it is no run id
    assert not (tmp_path / "pwned").exists()
    source = (spec.output_dir / "best_model.py").read_text()
    assert "pwned" not in source
    best = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())["best"]
    assert best["mlflow_run_id"] is None and best["mlflow_parent_run_id"] is None


def test_hostile_text_in_the_header_stays_in_the_docstring(one_trial, tmp_path):
    spec, study = one_trial
    # the metric's name is in the header; a stored one that tries to end the docstring
    study.set_user_attr("metric", HOSTILE + "\\")
    write_outputs(study, spec, ("py",))

    # nothing ran: the text is the docstring's, whole, and the module has nothing else at its top
    assert not (tmp_path / "pwned").exists()
    tree = ast.parse((spec.output_dir / "best_model.py").read_text())
    assert HOSTILE + "\\ =" in ast.get_docstring(tree, clean=False)
    assert sum(isinstance(node, ast.Expr) for node in tree.body) == 1


def test_the_verification_refuses_code_autotune_did_not_render(one_trial, tmp_path, monkeypatch):
    spec, study = one_trial
    rendered = export.render_snippet

    def tampered(*args, **kwargs) -> str:  # one statement more than a snippet has
        return rendered(*args, **kwargs) + '\n__import__("os").system("touch pwned")\n'

    monkeypatch.setattr(export, "render_snippet", tampered)
    # refused before it runs, naming the file and the line
    with pytest.raises(NotRendered, match=r"best_model\.py: line \d+ is not what autotune renders"):
        write_outputs(study, spec, ("py",))
    assert not (tmp_path / "pwned").exists()


RUNS = '__import__("os").system("touch pwned")'


@pytest.mark.parametrize(
    "statement",
    [
        f"@{RUNS}\ndef f():\n    pass",  # a decorator runs where the function is defined
        f"def f(x={RUNS}):\n    pass",  # so does a default
        f"def f(x: {RUNS}):\n    pass",  # and an annotation
        f"def f() -> {RUNS}:\n    pass",
        f"class C({RUNS}):\n    pass",  # a base
        f"class C:\n    x = {RUNS}",  # a class body runs where it is defined
        f"class C:\n    {RUNS}",
        f"class C:\n    def f(self, x={RUNS}):\n        pass",
        "from os import *",
        "__builtins__ = {}",
        f"def __getattr__(name):\n    return {RUNS}",
        f"X = [{RUNS}]",
    ],
)
def test_check_rendered_refuses_whatever_runs_at_definition(statement: str, tmp_path) -> None:
    # statements of the kinds a snippet has, which would run code when the module is executed
    code = f'"""doc"""\n\nimport torch\n\n{statement}\n'
    with pytest.raises(NotRendered, match="is not what autotune renders"):
        snippet.check_rendered(code, tmp_path / "best_model.py")
    # what a snippet does have passes: defaults, annotations and bases that call nothing
    plain = (
        'class C(torch.nn.Module):\n    """c"""\n\n'
        "    def f(self, x: float = 0.5) -> None:\n        print(x)"
    )
    snippet.check_rendered(f'"""doc"""\n\nimport torch\n\n{plain}\n', tmp_path / "best_model.py")


@pytest.mark.parametrize(
    "text", [HOSTILE, 'ends in a quote"', "ends in a backslash\\", "a\x00nul", "tab\tand\u2028"]
)
def test_docstring_reads_back_as_the_text(text: str) -> None:
    # a string literal whatever the text holds: it evaluates to the text and nothing else
    literal = snippet.docstring(text)
    assert ast.literal_eval(literal) == text
    [node] = ast.parse(literal).body
    assert isinstance(node, ast.Expr)


def test_verify_weights_names_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    weights, path, reference, shape = saved(tmp_path, "mlp-gelu-mixed")
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    # a check that failed, naming the file: `export` prints it in one line, not a traceback
    with pytest.raises(WeightsDoNotLoad, match=rf"^{re.escape(str(weights))}: cannot be read"):
        verify_weights(load_snippet(path), reference, weights, shape, path)


# --- a result that loads in one call ----------------------------------------------------------


def raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """digits as they come, unstandardised: pixel values 0 to 16, shaped like the data, and
    the labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, *DIGITS), torch.tensor(y)


def test_autotune_load_gives_the_trained_network_for_raw_features(one_trial):
    import autotune
    from autotune.search.queries import trial_config

    def load_tensors(path: Path):
        return torch.load(path, weights_only=True)

    spec, study = one_trial
    model = autotune.load(spec.output_dir)
    # eval mode, the standardisation in front, the labels of its outputs
    assert not model.training
    stats = load_tensors(spec.output_dir / "input_stats.pt")
    assert model.classes == stats["classes"] == list(range(10))
    # raw pixels in: the outputs of the tuned network fed what the trials were fed
    tuned = build_model(spec.model, trial_config(study.trials[0]), DIGITS, 10)
    tuned.load_state_dict(load_tensors(spec.output_dir / "weights" / "trial_0.pt"))
    raw, labels = raw_digits()
    with torch.no_grad():
        expected = tuned.eval()((raw - stats["mean"].float()) / stats["std"].float())
        got = model(raw)
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    # on every digit, raw, it scores what the trial scored on its validation rows
    accuracy = float((got.argmax(1) == labels).float().mean())
    assert abs(accuracy - study.trials[0].value) < 0.1, (accuracy, study.trials[0].value)
    # the verification said so in recommended.yaml
    verified = yaml.safe_load((spec.output_dir / "recommended.yaml").read_text())["verified"]
    assert "its load() gives them from raw inputs" in verified["best_model.py"]


def test_the_loaded_network_scripts_and_exports(one_trial):
    import autotune

    spec, _ = one_trial
    model = autotune.load(spec.output_dir)
    raw, _ = raw_digits()
    with torch.no_grad():
        expected = model(raw[:8])
        # TorchScript: no hooks, no Python the compiler cannot read
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(raw[:8]), expected)
        # torch.export: one graph
        exported = torch.export.export(model, (raw[:8],))
        assert torch.allclose(exported.module()(raw[:8]), expected)


def test_the_loaded_network_exports_to_onnx_where_onnx_is_installed(one_trial, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch's ONNX exporter needs both
    import autotune

    spec, _ = one_trial
    model = autotune.load(spec.output_dir)
    raw, _ = raw_digits()
    import onnx

    torch.onnx.export(model, (raw[:8],), tmp_path / "model.onnx")
    # a model ONNX's own checker passes, taking the raw features
    saved = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(saved, full_check=True)
    [given] = saved.graph.input
    assert [d.dim_value for d in given.type.tensor_type.shape.dim] == [8, *DIGITS]


@pytest.mark.parametrize("name", ["cnn-before_bn-dropblock", "mlp-before_bn-uout"])
def test_every_regularizer_of_a_snippet_scripts(tmp_path: Path, name: str) -> None:
    spec, config, shape = CASES[name]
    model = build_model(spec, config, shape, 3)
    path = tmp_path / "best_model.py"
    path.write_text(render_snippet(model, "header", shape))
    rebuilt = load_snippet(path).eval()
    x = torch.randn(2, *shape)
    # the regularisers torch lacks, carried in the snippet, compile as well
    assert torch.allclose(torch.jit.script(rebuilt)(x), rebuilt(x))


def test_autotune_load_of_a_folder_without_a_recommendation_says_so(tmp_path):
    import autotune

    with pytest.raises(FileNotFoundError, match="autotune export SPEC"):
        autotune.load(tmp_path)

"""Your own model: its blocks found by a forward pass, a configuration applied by module surgery
with the state_dict keys unchanged, the variance shift predicted as for a template, the study
tuned and exported through `model.import`."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from autotune.cli import main
from autotune.core.errors import SpecError
from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import ModelSpec, load_spec, parse_spec
from autotune.nn.models import build_model
from autotune.nn.prediction import predict_shift
from autotune.nn.surgery import apply_config, find_blocks, without_batchnorm
from autotune.nn.weights import verify_weights
from autotune.outputs.snippet import load_snippet
from autotune.run.loop import run_study

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
SHAPE = (1, 8, 8)


def example_model(**kwargs) -> nn.Module:
    spec = ModelSpec(**{"import": "small_resnet:build", "kwargs": {"widths": [4, 8], **kwargs}})
    torch.manual_seed(0)
    return build_model(spec, None, SHAPE, 3, base_dir=EXAMPLE)  # type: ignore[arg-type]


def config(*blocks: tuple[str, float, str]) -> TrialConfig:
    return TrialConfig(tuple(BlockConfig(p, r, k, 0.05) for p, r, k in blocks))


def test_the_blocks_are_the_bn_layers_in_forward_order_with_their_weights_and_activations():
    blocks = find_blocks(example_model(), SHAPE)

    # every BN the pass uses, in the order it reaches them; the shortcut's BN runs last
    assert [b.bn for b in blocks] == [
        "stem.1",
        "layers.0.bn1",
        "layers.0.bn2",
        "layers.1.bn1",
        "layers.1.bn2",
        "layers.1.shortcut.1",
    ]
    # each fed by the convolution before it
    assert [b.weight for b in blocks] == [
        "stem.0",
        "layers.0.conv1",
        "layers.0.conv2",
        "layers.1.conv1",
        "layers.1.conv2",
        "layers.1.shortcut.0",
    ]
    # an activation only where BN's output goes straight into one: bn2 meets the shortcut first
    assert [b.act for b in blocks] == [
        "stem.2",
        "layers.0.relu1",
        None,
        "layers.1.relu1",
        None,
        None,
    ]
    assert {b.kind for b in blocks} == {"spatial"}
    assert "after_act" not in blocks[2].slot().placements


class SharedActivation(nn.Module):
    """torchvision's habit: one ReLU module used after several layers, and a BN1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)
        self.fc2, self.bn2 = nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.fc1(x)))
        return self.head(self.relu(self.bn2(self.fc2(x))))


def test_a_shared_activation_gets_no_slot_of_its_own():
    blocks = find_blocks(SharedActivation(), (6,))

    # a regulariser after a shared ReLU would act at every place it is used
    assert [(b.bn, b.weight, b.act, b.kind) for b in blocks] == [
        ("bn1", "fc1", None, "dense"),
        ("bn2", "fc2", None, "dense"),
    ]


def test_surgery_keeps_the_state_dict_keys_and_shows_each_regulariser_under_its_layer():
    plain, tuned = example_model(), example_model()
    blocks = find_blocks(tuned, SHAPE)
    apply_config(
        tuned,
        blocks,
        config(
            ("before_bn", 0.2, "dropout"),
            ("after_act", 0.3, "spatial_dropout"),
            ("after_bn", 0.1, "gaussian"),
            ("none", 0.0, "none"),
            ("before_bn", 0.2, "uout"),
            ("none", 0.0, "none"),
        ),
    )

    # the same keys and tensors: weights trained here load into the user's unmodified model
    assert list(tuned.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(tuned.state_dict())
    # each regulariser is a child of the module it acts on, named for the side it acts on
    assert isinstance(tuned.stem[1].drop_input, nn.Dropout)
    assert isinstance(tuned.layers[0].relu1.drop_output, nn.Dropout2d)
    assert type(tuned.layers[0].bn2.drop_output).__name__ == "GaussianDropout"
    assert "drop_input" in repr(tuned.layers[1].bn2)
    # every block's momentum is the configuration's
    assert {tuned.get_submodule(b.bn).momentum for b in blocks} == {0.05}
    # in eval mode the regularisers are off: the tuned network computes the user's network
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(tuned.eval()(x), plain.eval()(x), atol=1e-6)


def test_a_regulariser_before_bn_drops_what_bn_receives():
    model = example_model()
    only_last = [("none", 0.0, "none")] * 5 + [("before_bn", 0.5, "dropout")]
    apply_config(model, find_blocks(model, SHAPE), config(*only_last))
    seen = {}
    shortcut = model.layers[1].shortcut
    shortcut[0].register_forward_hook(lambda module, args, out: seen.update(conv=out))
    shortcut[1].register_forward_pre_hook(lambda module, args: seen.update(bn=args[0]))
    torch.manual_seed(0)
    model.train()(torch.randn(64, *SHAPE))

    # in training BN receives the convolution's output with half of it dropped and the rest
    # doubled (inverted dropout), within sampling error
    conv, bn = seen["conv"], seen["bn"]
    dropped = float((bn[conv != 0] == 0).float().mean())
    assert abs(dropped - 0.5) < 0.03, f"dropped share {dropped:.3f}, expected 0.5"
    assert torch.allclose(bn[bn != 0], 2 * conv[bn != 0])
    # in eval mode exactly what the convolution gave
    model.eval()(torch.randn(64, *SHAPE))
    assert torch.equal(seen["bn"], seen["conv"])


def test_without_batchnorm_removes_every_bn_and_gives_the_weight_before_it_a_bias():
    model = example_model()
    without_batchnorm(model, find_blocks(model, SHAPE))

    # no BN left; each convolution that fed one now has a bias
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.stem[0].bias is not None and model.layers[1].shortcut[0].bias is not None
    assert model(torch.randn(2, *SHAPE)).shape == (2, 3)


class TemplateTwin(nn.Module):
    """The mlp template's wiring with names of its own and a functional flatten: what a user
    who wrote the template by hand would have."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(
            OrderedDict(fc=nn.Linear(64, 16, bias=False), norm=nn.BatchNorm1d(16), act=nn.ReLU())
        )
        self.b = nn.Sequential(
            OrderedDict(fc=nn.Linear(16, 12, bias=False), norm=nn.BatchNorm1d(12), act=nn.ReLU())
        )
        self.out = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b(self.a(torch.flatten(x, 1))))


@pytest.mark.parametrize(
    "blocks",
    [
        (("after_act", 0.3, "dropout"), ("before_bn", 0.2, "dropout")),
        (("after_act", 0.4, "gaussian"), ("after_act", 0.2, "dropout")),
        (("before_bn", 0.3, "uout"), ("after_bn", 0.2, "alpha_dropout")),
    ],
)
def test_the_prediction_for_an_imported_model_is_the_template_s_for_the_same_network(blocks):
    cfg = config(*blocks)
    template = build_model(ModelSpec(template="mlp", widths=[16, 12]), cfg, (1, 8, 8), 10)
    twin = TemplateTwin()
    twin.load_state_dict(dict(zip(twin.state_dict(), template.state_dict().values(), strict=True)))
    apply_config(twin, find_blocks(twin, (1, 8, 8)), cfg)
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    ours = predict_shift(twin, x, traced=True)
    torch.manual_seed(0)
    reference = predict_shift(template, x)

    # traced feeds find what the template's blocks say: the same method and Δ, layer by layer
    for mine, theirs in zip(ours.layers, reference.layers, strict=True):
        assert mine.method == theirs.method, (mine, theirs)
        assert mine.exact == pytest.approx(theirs.exact, rel=1e-6), (mine, theirs)


def write_import_spec(tmp_path: Path, **model) -> Path:
    spec = {
        "study": {"name": "own", "n_trials": 2, "pruner": "none"},
        "data": {
            "name": "synthetic_images",
            "batch_size": 64,
            "synthetic": {"n_samples": 200, "image_size": 8, "n_classes": 3},
        },
        "model": {"import": "small_resnet:build", "kwargs": {"widths": [4, 8]}, **model},
        "train": {"max_epochs": 1},
        "search_space": {"params": {"recalibrate_bn": [False, True]}},
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "small_resnet.py").write_text((EXAMPLE / "small_resnet.py").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_the_example_s_own_model_is_tuned_through_the_import_path_and_exported(tmp_path):
    spec = load_spec(
        write_import_spec(tmp_path), overrides={"recommend": {"top_k": 1, "seeds": 2, "folds": 0}}
    )
    outcome = run_study(spec)
    out = spec.output_dir
    recommended = yaml.safe_load((out / "recommended.yaml").read_text())

    # two trials of the user's network, each block one of its BN layers
    assert len(outcome.study.trials) == 2
    assert recommended["model"]["import"] == "small_resnet:build"
    assert len(recommended["blocks"]) == len(recommended["model"]["blocks_at"]) == 6
    # the baselines trained beside it, dropout only without any BN; the dropout baselines
    # leave out the blocks with no activation of their own
    rows = {row["name"]: row for row in recommended["robust"]["rows"]}
    assert list(rows)[1:] == ["bn_only", "dropout_only", "dropout_after_act"]
    assert all(len(row["values"]) == 2 for row in rows.values())
    assert rows["dropout_only"]["batchnorm"] is False
    placements = [b["placement"] for b in rows["dropout_after_act"]["blocks"]]
    assert placements == ["after_act", "after_act", "none", "after_act", "none", "none"]
    # the parent MLflow run names the model and which BN layer each block is
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.tracking_uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("own").experiment_id],
        filter_string="tags.`autotune.role` = 'parent'",
    )
    assert parent.data.params["model.import"] == "small_resnet:build"
    assert parent.data.params["model.block2"] == "layers.0.bn2"
    assert "robust.dropout_only.mean" in parent.data.metrics
    # the snippet rebuilds it, loads the best trial's weights and gives its outputs
    assert "gives the tuned network's outputs" in recommended["verified"]["best_model.py"]
    snippet = load_snippet(out / "best_model.py")
    tuned = build_model(spec.model, _config(recommended), SHAPE, 3, base_dir=tmp_path)
    weights = Path(recommended["best"]["weights"])
    assert verify_weights(snippet, tuned, weights, SHAPE, out / "best_model.py") < 1e-5
    # its keys are the user's own model's: the weights load into it without the snippet
    plain = build_model(spec.model, None, SHAPE, 3, base_dir=tmp_path)  # type: ignore[arg-type]
    plain.load_state_dict(torch.load(weights))
    # and it runs on its own where the user's module imports
    run = subprocess.run(
        [sys.executable, str(out / "best_model.py")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "output of a batch of 2: (2, 3)" in run.stdout


def _config(recommended: dict) -> TrialConfig:
    return TrialConfig.from_dicts(
        recommended["blocks"], recalibrate_bn=recommended["recalibrate_bn"]
    )


def test_validate_lists_the_blocks_it_found(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(write_import_spec(tmp_path))])

    # one line per block: the BN layer and the placements it has room for
    assert result.exit_code == 0, result.output
    assert "small_resnet:build with 6 blocks" in result.stdout
    assert "block2: layers.0.bn2 (spatial): none, before_bn, after_bn\n" in result.stdout


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        ({"widths": [8]}, None, "model: widths: the imported model 'small_resnet:build' has"),
        ({"import": "small_resnet"}, None, "model.import: expected 'package.module:function'"),
        ({"import": "small_resnet:nothing"}, None, "has no attribute 'nothing'"),
        ({"import": "broken:build"}, "def build(**kw):\n    raise RuntimeError('no GPU')\n",
         "model.import: 'broken:build' failed to build: RuntimeError: no GPU"),
        ({"import": "plain:build"}, "import torch\ndef build(**kw):\n    return torch.nn.ReLU()\n",
         "uses no BatchNorm layer in its forward pass"),
        ({"import": "wrong:build"}, "import torch\ndef build(**kw):\n    return torch.nn.Sequential"
         "(torch.nn.Flatten(), torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))\n",
         "fails on an example of the data's shape (1, 8, 8): RuntimeError"),
        ({"kwargs": {"depth": 3}}, None, "unexpected keyword argument 'depth'"),
    ],
)  # fmt: skip
def test_a_model_that_cannot_be_tuned_is_one_line_and_exit_2(tmp_path, model, code, message):
    path = write_import_spec(tmp_path, **model)
    if code is not None:
        (tmp_path / f"{model['import'].split(':')[0]}.py").write_text(code)

    result = CliRunner().invoke(main, ["validate", str(path)])

    # the field, the rule and the value, without a traceback
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_placement_a_block_has_no_room_for_names_the_block(tmp_path):
    raw = yaml.safe_load(write_import_spec(tmp_path).read_text())
    raw["search_space"] = {"blocks": {2: {"placement": "after_act"}}}

    # layers.0.bn2 feeds the residual sum, not an activation
    with pytest.raises(SpecError, match=r"after_act does not apply to layers\.0\.bn2"):
        from autotune.nn.data import load_data
        from autotune.run.preflight import resolve_space

        spec = parse_spec(raw, base_dir=tmp_path)
        resolve_space(spec, load_data(spec.data, seed=0))


@pytest.mark.parametrize(
    ("stored", "model", "field"),
    [
        ({"template": "mlp"}, {"import": "small_resnet:build"}, "model.template"),
        ({"import": "small_resnet:build"}, {"template": "mlp"}, "model.import"),
    ],
)
def test_a_study_of_one_kind_of_model_refuses_the_other(stored, model, field):
    import optuna

    from autotune.search.storage import check_stored

    study = optuna.create_study()
    for key, value in stored.items():
        study.set_user_attr(key, value)

    # a template's study and an imported model's never mix their trials
    with pytest.raises(SpecError, match=rf"^{field}: stored study"):
        check_stored(study, parse_spec({"model": model}, base_dir=EXAMPLE))


@pytest.mark.parametrize("placement", ["before_bn", "after_act"])
def test_recalibration_keeps_a_regulariser_that_bn_hosts_off(placement):
    from autotune.nn.shift import measure_shift, recalibrate_bn

    model = example_model()
    slots = [("none", 0.0, "none")] * 6
    slots[1] = (placement, 0.5, "dropout")
    apply_config(model, find_blocks(model, SHAPE), config(*slots))
    batches = [
        torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    recalibrate_bn(model, batches)

    # with every regulariser off, BN's statistics are those of the data it saw: Δ = 1 per
    # channel on that data, within what the batch statistics of the BN layers before it move
    # (a dropout left on would have doubled layers.0.bn1's variance: Δ near 0.5)
    shift = measure_shift(model, batches)
    for name in ("layers.0.bn1", "layers.0.bn2"):
        assert shift[name].per_channel == pytest.approx([1.0] * 4, rel=0.01), name
    # and the regulariser is back in the mode it was in
    assert model.training and model.layers[0].bn1.training

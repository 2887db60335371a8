"""The checks before training: what `validate` tells without torch matches what `run` loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autotune.core.checks import check_accelerator, check_batches, split_sizes
from autotune.core.errors import SpecError
from autotune.core.spec import BUILTIN_DATASETS, DataSpec
from autotune.nn.data import load_data
from autotune.nn.sources import split_rows
from autotune.run.preflight import data_shape

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "mlflow", "sklearn")
SMALL = {"n_samples": 300}


def imported_after(*args: str) -> list[str]:
    """The heavy packages in sys.modules after the CLI ran with `args`, in a fresh process."""
    code = (
        "import sys\n"
        "from autotune.cli import main\n"
        "try:\n"
        f"    main({list(args)!r})\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        f"print('imported:', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    last = result.stdout.strip().splitlines()[-1].removeprefix("imported:").strip()
    return [name for name in last.split(",") if name]


def test_help_imports_no_torch_lightning_or_mlflow() -> None:
    # `autotune --help` answers from click alone
    assert imported_after("--help") == []


def test_validate_of_a_builtin_dataset_imports_no_torch_lightning_or_mlflow() -> None:
    # the quickstart's check needs neither the data loaded nor a network built
    assert imported_after("validate", "examples/quickstart.yaml") == []


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_describe_tells_what_load_data_loads(name: str) -> None:
    spec = DataSpec(name=name, synthetic=SMALL)
    data = load_data(spec, seed=0)
    shape = data_shape(spec)

    # the same shape, classes and split sizes, without loading the data
    assert shape.name == data.name
    assert shape.input_shape == data.input_shape
    assert shape.n_classes == data.n_classes
    assert (shape.train_rows, shape.val_rows) == (len(data.y_train), len(data.y_val))


@pytest.mark.parametrize(
    ("rows", "fraction"), [(10, 0.2), (7, 0.3), (20, 0.05), (3, 0.5), (178, 0.33), (4, 0.6)]
)
def test_split_sizes_round_as_the_split_does(rows: int, fraction: float) -> None:
    labels = np.arange(rows) % 2
    train, val = split_rows(labels, val_fraction=fraction, seed=0)

    # the arithmetic matches scikit-learn's split, row for row
    assert split_sizes(rows, fraction) == (len(train), len(val))


def test_an_empty_split_is_the_same_error_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "tiny.csv"
    path.write_text("a,label\n1,0\n2,1\n")
    spec = DataSpec(path=path, val_fraction=0.9)

    # validate's description and run's loading refuse it with one message
    with pytest.raises(SpecError, match="leaves a split empty") as described:
        data_shape(spec)
    with pytest.raises(SpecError, match="leaves a split empty") as loaded:
        load_data(spec, seed=0)
    assert str(described.value) == str(loaded.value)


def test_one_training_row_is_too_few_for_a_batch() -> None:
    # a lone row is dropped when shuffling (BatchNorm cannot train on it): no batch is left
    with pytest.raises(SpecError, match="too small for one batch"):
        check_batches(1, 64)
    check_batches(2, 64)


# --- sizes a trial can allocate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "shape", "widths", "pool"),
    [
        ("mlp", (1, 8, 8), [32, 16], True),
        ("mlp", (30,), [7], True),
        ("cnn", (3, 9, 9), [4, 8, 8], True),
        ("resnet", (1, 16, 16), [16, 16, 32, 64], True),
        ("resnet", (2, 5, 5), [8, 8, 4], False),
        ("resnet", (3, 1, 1), [3, 4], True),
    ],
)
def test_parameters_are_counted_as_torch_counts_them(
    template: str, shape: tuple, widths: list, pool: bool
) -> None:
    from autotune.core.checks import count_parameters
    from autotune.core.space import BlockConfig, TrialConfig
    from autotune.core.spec import ModelSpec
    from autotune.nn.models import build_model

    model = ModelSpec(template=template, widths=widths, pool=pool)
    config = TrialConfig(tuple(BlockConfig() for _ in widths))
    network = build_model(model, config, shape, 5)
    # the count without building equals the built network's, parameter for parameter
    assert count_parameters(model, shape, 5) == sum(p.numel() for p in network.parameters())


def test_a_network_too_big_to_allocate_is_refused_by_validate_and_run(tmp_path: Path) -> None:
    from autotune.core.spec import parse_spec
    from autotune.run.preflight import check_runnable, resolve_space

    # 60,000 × 60,000 weights: an allocation traceback in run before
    spec = parse_spec({"model": {"widths": [60_000, 60_000]}})
    path = tmp_path / "spec.yaml"
    path.write_text("model: {widths: [60000, 60000]}\n")
    result = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    message = (
        "error: model.widths: the mlp would have 3,604,680,010 parameters for data shaped "
        "(1, 8, 8) with 10 classes; at most 1,000,000,000"
    )
    # validate says it, counted without torch
    assert (result.returncode, result.stderr.strip()) == (2, message)
    # run says the same before torch allocates anything
    data = load_data(spec.data, seed=0)
    with pytest.raises(SpecError) as caught:
        check_runnable(spec, resolve_space(spec, data), data)
    assert f"error: {caught.value}" == message


@pytest.mark.parametrize(
    ("synthetic", "message"),
    [
        (
            {"name": "synthetic_images", "synthetic": {"image_size": 100_000}},
            "data.synthetic: synthetic_images of 2,000 rows shaped (1, 100000, 100000) would "
            "hold 20,030,000,000,000 values; at most 268,435,456 (lower n_samples or "
            "image_size, channels)",
        ),
        (
            {"name": "synthetic_tabular", "synthetic": {"n_samples": 10**9}},
            "data.synthetic: synthetic_tabular of 1,000,000,000 rows shaped (20,) would hold "
            "20,000,000,000 values; at most 268,435,456 (lower n_samples or n_features)",
        ),
    ],
)
def test_generated_data_too_big_is_refused_both_ways(synthetic: dict, message: str) -> None:
    spec = DataSpec(**synthetic)
    # validate's description and run's loading refuse it alike, before numpy allocates it
    with pytest.raises(SpecError) as described:
        data_shape(spec)
    with pytest.raises(SpecError) as loaded:
        load_data(spec, seed=0)
    assert str(described.value) == str(loaded.value) == message


@pytest.mark.parametrize(
    ("refuses", "field"),
    [
        # Lightning raises the same exception type for both: the accelerator in float32 decides
        (lambda accelerator, precision: precision != "32-true", "train.precision: 'bf16-mixed'"),
        (lambda accelerator, precision: True, "train.accelerator: 'cuda'"),
    ],
)
def test_a_refused_precision_is_told_from_a_missing_accelerator(
    monkeypatch, refuses, field: str
) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from autotune.core import checks

    def trainer(accelerator: str, precision: str) -> None:
        if refuses(accelerator, precision):
            raise MisconfigurationException("no can do\nmore")

    monkeypatch.setattr(checks, "_trainer", trainer)
    with pytest.raises(SpecError) as caught:
        check_accelerator("cuda", "bf16-mixed")
    assert str(caught.value) == f"{field}: no can do"
    check_accelerator("cpu")  # nothing asked: always there in float32

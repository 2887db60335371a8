"""The checks before training: what `validate` tells without torch matches what `run` loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autotune.checks import check_batches, describe, split_sizes
from autotune.data import load_data
from autotune.errors import SpecError
from autotune.sources import split_rows
from autotune.spec import BUILTIN_DATASETS, DataSpec

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
    shape = describe(spec)

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
        describe(spec)
    with pytest.raises(SpecError, match="leaves a split empty") as loaded:
        load_data(spec, seed=0)
    assert str(described.value) == str(loaded.value)


def test_one_training_row_is_too_few_for_a_batch() -> None:
    # a lone row is dropped when shuffling (BatchNorm cannot train on it): no batch is left
    with pytest.raises(SpecError, match="too small for one batch"):
        check_batches(1, 64)
    check_batches(2, 64)

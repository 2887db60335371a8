"""autotune.nn.data: built-in datasets, csv/npz files, user datamodules and TensorBatches."""

from __future__ import annotations

import itertools
import math
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine

from autotune.core.errors import SpecError
from autotune.core.spec import DataSpec, load_spec
from autotune.nn.data import (
    DEVICE_DATA_SHARE,
    TensorBatches,
    TensorDataModule,
    hold_on_device,
    load_data,
    split_rows,
)
from autotune.nn.sources import split_test

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_samples": 300}


def epoch_rows(batches: TensorBatches) -> list[torch.Tensor]:
    """The rows of one epoch, batch by batch, read back from the first feature column."""
    return [x[:, 0].long() for x, _ in batches]


def numbered(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x whose first column is the row number, so a batch says which rows it holds."""
    x = torch.arange(rows, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return x, torch.arange(rows) % 2


# --- built-in sources ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "synthetic", "shape", "classes", "rows"),
    [
        ("digits", {}, (1, 8, 8), 10, 1797),
        ("breast_cancer", {}, (30,), 2, 569),
        ("wine", {}, (13,), 3, 178),
        ("synthetic_tabular", SMALL, (20,), 3, 300),
        ("synthetic_images", SMALL, (1, 16, 16), 3, 300),
        ("synthetic_images", {**SMALL, "channels": 3, "image_size": 8}, (3, 8, 8), 3, 300),
        ("synthetic_tabular", {**SMALL, "n_features": 6, "n_classes": 5}, (6,), 5, 300),
    ],
)
def test_builtin_shapes_classes_and_split(
    name: str, synthetic: dict, shape: tuple[int, ...], classes: int, rows: int
) -> None:
    dm = load_data(DataSpec(name=name, synthetic=synthetic), seed=0)
    assert isinstance(dm, TensorDataModule)
    # the templates size their layers from these
    assert dm.input_shape == shape
    assert dm.n_classes == classes
    assert dm.name == name
    # one example's shape on both splits, float32 features and int64 labels
    assert tuple(dm.x_train.shape[1:]) == shape and tuple(dm.x_val.shape[1:]) == shape
    assert dm.x_train.dtype == torch.float32 and dm.y_train.dtype == torch.int64
    # the test split first, then validation of the rest; scikit-learn rounds each held-out
    # share up; no row is lost or duplicated
    test = math.ceil(0.2 * rows)
    assert len(dm.x_test) == test and len(dm.x_val) == math.ceil(0.2 * (rows - test))
    assert len(dm.x_train) + len(dm.x_val) + len(dm.x_test) == rows
    assert len(dm.y_train) == len(dm.x_train) and len(dm.y_val) == len(dm.x_val)
    # labels are 0..K-1, and the stratified split puts every class in both splits
    assert set(dm.y_train.tolist()) == set(range(classes))
    assert set(dm.y_val.tolist()) == set(range(classes))
    # standardising never divides by a zero std
    assert torch.isfinite(dm.x_train).all() and torch.isfinite(dm.x_val).all()


def test_default_spec_is_digits() -> None:
    # `data: {}` means digits
    dm = load_data(DataSpec(), seed=0)
    assert dm.name == "digits" and dm.input_shape == (1, 8, 8)


def test_val_fraction_and_batch_size_come_from_the_spec() -> None:
    dm = load_data(DataSpec(name="wine", val_fraction=0.5, test_fraction=0, batch_size=16), seed=0)
    # half of 178 rows held out, batches of 16
    assert len(dm.x_val) == 89
    assert dm.batch_size == 16
    assert len(dm.val_dataloader()) == math.ceil(89 / 16)


def test_split_is_seeded() -> None:
    first = load_data(DataSpec(name="wine"), seed=0)
    again = load_data(DataSpec(name="wine"), seed=0)
    other = load_data(DataSpec(name="wine"), seed=1)
    # the same seed gives the same split, row for row
    assert torch.equal(first.x_val, again.x_val) and torch.equal(first.y_val, again.y_val)
    # another seed holds out other rows (the same count)
    assert first.x_val.shape == other.x_val.shape
    assert not torch.equal(first.x_val, other.x_val)


def test_the_test_split_is_held_out_first_and_scaled_by_train_statistics() -> None:
    x, y = load_wine(return_X_y=True)
    dm = load_data(DataSpec(name="wine", test_fraction=0.25), seed=0)
    train, val, test = split_test(y, val_fraction=0.2, test_fraction=0.25, seed=0)

    # three disjoint splits of every row, each stratified: every class in each
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(y)))
    assert all(len(np.unique(y[rows])) == 3 for rows in (train, val, test))
    # the test rows, scaled by the train rows' statistics alone
    expected = (x[test] - x[train].mean(axis=0)) / x[train].std(axis=0)
    assert np.allclose(dm.x_test.numpy(), expected, atol=1e-4)
    assert dm.has_test and len(dm.test_dataloader()) == math.ceil(len(test) / dm.batch_size)
    # without a test split, train and validation are the split of a study stored before
    legacy = load_data(DataSpec(name="wine", test_fraction=0), seed=0)
    old_train, old_val = split_rows(y, val_fraction=0.2, seed=0)
    assert not legacy.has_test and len(legacy.x_val) == len(old_val)
    assert np.allclose(
        legacy.x_val.numpy(), (x[old_val] - x[old_train].mean(0)) / x[old_train].std(0), atol=1e-4
    )


def test_split_is_stratified() -> None:
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    train, val = split_rows(labels, val_fraction=0.2, seed=0)
    # every class keeps its share in the validation split: 12, 6 and 2 of 20 rows
    assert np.bincount(labels[val]).tolist() == [12, 6, 2]
    # the two splits partition the rows
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))


def test_split_without_enough_rows_to_stratify() -> None:
    # a class with a single row cannot be stratified: the split still happens, plainly
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    train, val = split_rows(labels, val_fraction=0.25, seed=0)
    assert len(train) + len(val) == 9 and len(val) == 3


def test_standardisation_uses_train_statistics_only() -> None:
    dm = load_data(DataSpec(name="wine", test_fraction=0), seed=0)
    # train is centred and scaled exactly
    assert dm.x_train.mean(dim=0).abs().max() < 1e-5
    assert torch.allclose(dm.x_train.std(dim=0, unbiased=False), torch.ones(13), atol=1e-4)
    # validation is not: its own mean was not used
    assert dm.x_val.mean(dim=0).abs().max() > 0.05
    # and it is the raw validation rows scaled by the raw train rows' mean and std
    x, y = load_wine(return_X_y=True)
    train, val = split_rows(y, val_fraction=0.2, seed=0)
    expected = (x[val] - x[train].mean(axis=0)) / x[train].std(axis=0)
    assert np.allclose(dm.x_val.numpy(), expected, atol=1e-4)


def test_constant_pixels_are_centred_not_blown_up() -> None:
    dm = load_data(DataSpec(name="digits", test_fraction=0), seed=0)
    # digits' top-left pixel is 0 everywhere: it stays 0 rather than 0 / 0
    assert dm.x_train[:, 0, 0, 0].abs().max() == 0
    # no pixel of the validation split is scaled by a near-zero std
    assert dm.x_val.abs().max() < 100


def test_synthetic_data_depends_on_the_seed() -> None:
    spec = DataSpec(name="synthetic_images", synthetic=SMALL)
    # the same seed regenerates the same images; another seed other images
    assert torch.equal(load_data(spec, seed=3).x_train, load_data(spec, seed=3).x_train)
    assert not torch.equal(load_data(spec, seed=3).x_train, load_data(spec, seed=4).x_train)


def test_synthetic_tabular_clamps_n_informative_to_n_features() -> None:
    # 10 informative of 4 features is clamped to 4, which make_classification accepts
    dm = load_data(DataSpec(name="synthetic_tabular", synthetic={**SMALL, "n_features": 4}), seed=0)
    assert dm.input_shape == (4,)


def test_synthetic_tabular_too_few_informative_features() -> None:
    # 10 classes need 2 * 10 <= 2 ** n_informative, so at least 5 informative features
    spec = DataSpec(
        name="synthetic_tabular", synthetic={**SMALL, "n_classes": 10, "n_informative": 3}
    )
    with pytest.raises(SpecError, match=r"^data\.synthetic\.n_informative: .*at least 5"):
        load_data(spec, seed=0)


# --- TensorBatches -------------------------------------------------------------------------------


def test_batches_cover_every_row_once_per_epoch() -> None:
    batches = TensorBatches(*numbered(10), 4, shuffle=True, seed=0)
    for _ in range(3):
        epoch = epoch_rows(batches)
        # 10 rows, each exactly once, in batches of 4, 4 and 2 (a last batch of 2 is kept)
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
        assert [len(batch) for batch in epoch] == [4, 4, 2]


def test_batches_reshuffle_between_epochs() -> None:
    batches = TensorBatches(*numbered(50), 8, shuffle=True, seed=0)
    first, second = torch.cat(epoch_rows(batches)), torch.cat(epoch_rows(batches))
    # each epoch draws a new order
    assert not torch.equal(first, second)
    # and not the identity order either
    assert not torch.equal(first, torch.arange(50))


def test_batches_are_reproducible() -> None:
    def two_epochs(seed: int) -> list[list[int]]:
        batches = TensorBatches(*numbered(50), 8, shuffle=True, seed=seed)
        return [torch.cat(epoch_rows(batches)).tolist() for _ in range(2)]

    # fresh objects with one seed serve the same epochs; another seed serves others
    assert two_epochs(7) == two_epochs(7)
    assert two_epochs(7) != two_epochs(8)


def test_batches_keep_x_and_y_together() -> None:
    x, y = numbered(30)
    for xb, yb in TensorBatches(x, y, 7, shuffle=True):
        # the label that comes with each row is that row's label
        assert torch.equal(yb, xb[:, 0].long() % 2)


def test_lone_last_row_is_dropped_only_when_shuffling() -> None:
    shuffled = TensorBatches(*numbered(9), 4, shuffle=True)
    ordered = TensorBatches(*numbered(9), 4, shuffle=False)
    # shuffling: 9 = 4 + 4 + 1, and the batch of one is dropped (BatchNorm cannot train on it)
    assert [len(batch) for batch in epoch_rows(shuffled)] == [4, 4]
    assert len(shuffled) == 2
    # in order (validation): every row is served, the batch of one included, in row order
    assert torch.cat(epoch_rows(ordered)).tolist() == list(range(9))
    assert [len(batch) for batch in epoch_rows(ordered)] == [4, 4, 1]
    assert len(ordered) == 3


@pytest.mark.parametrize(
    ("rows", "batch_size", "shuffle"),
    list(itertools.product([1, 7, 8, 9, 64, 65], [1, 4, 8, 64], [True, False])),
)
def test_len_matches_the_batches_served(rows: int, batch_size: int, shuffle: bool) -> None:
    batches = TensorBatches(*numbered(rows), batch_size, shuffle=shuffle)
    # Lightning counts steps with len(); it must agree with what iteration yields
    assert len(batches) == len(list(batches))


def test_batches_move_to_a_device_with_their_state() -> None:
    batches = TensorBatches(*numbered(20), 6, shuffle=True, seed=1)
    epoch_rows(batches)
    moved = batches.to("cpu")
    # the moved copy carries on from the same epoch with the same batches
    assert torch.equal(torch.cat(epoch_rows(moved)), torch.cat(epoch_rows(batches)))
    assert moved.x.device.type == "cpu" and len(moved) == len(batches)


def test_mismatched_rows_are_refused() -> None:
    # a programming error, not a user one: ValueError
    with pytest.raises(ValueError, match="rows"):
        TensorBatches(torch.zeros(5, 2), torch.zeros(4), 2, shuffle=False)


def test_every_train_dataloader_call_starts_the_same_shuffle() -> None:
    dm = load_data(DataSpec(name="wine"), seed=0)
    # two fits (trials) from one datamodule see the same first batch
    first = next(iter(dm.train_dataloader()))[1]
    assert torch.equal(first, next(iter(dm.train_dataloader()))[1])
    # validation is served in order, unshuffled
    assert torch.equal(torch.cat([y for _, y in dm.val_dataloader()]), dm.y_val)


def test_lightning_trains_on_tensor_batches() -> None:
    dm = load_data(DataSpec(name="wine", batch_size=32), seed=0)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(13, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
            )

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=dm)
    # Lightning took TensorBatches as loaders: it counted the batches and validated
    assert trainer.num_training_batches == len(dm.train_dataloader())
    assert "val_acc" in trainer.callback_metrics


# --- the data held on the device -----------------------------------------------------------------


def test_an_in_memory_dataset_is_held_on_the_training_device() -> None:
    dm = load_data(DataSpec(name="wine", batch_size=32), seed=0)
    x_train = dm.x_train
    # already there: nothing moves, the very same tensors stay
    assert hold_on_device(dm, torch.device("cpu"))
    assert dm.x_train is x_train
    # elsewhere (the meta device stands in for a GPU): all four move, and every batch, shuffled
    # or not, is born there, so Lightning's per-batch copy has nothing to do
    assert hold_on_device(dm, torch.device("meta"))
    assert {t.device.type for t in (dm.x_train, dm.y_train, dm.x_val, dm.y_val)} == {"meta"}
    batches = [*dm.train_dataloader(), *dm.val_dataloader()]
    assert batches and all(x.device.type == y.device.type == "meta" for x, y in batches)


def test_a_dataset_too_big_for_the_gpu_stays_in_host_memory(monkeypatch) -> None:
    from autotune.core.names import DEVICE_WORKERS_ENV

    dm = load_data(DataSpec(name="wine"), seed=0)
    free = dm.nbytes / DEVICE_DATA_SHARE
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free - 1, 2 * free))
    assert not hold_on_device(dm, torch.device("cuda", 0))
    assert dm.device.type == "cpu"
    # room for it alone, but not for three workers moving theirs to the same GPU at once
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * free, 4 * free))
    moved = []
    monkeypatch.setattr(TensorDataModule, "to", lambda self, device: moved.append(device))
    monkeypatch.setenv(DEVICE_WORKERS_ENV, "3")
    assert not hold_on_device(dm, torch.device("cuda", 0)) and moved == []
    monkeypatch.setenv(DEVICE_WORKERS_ENV, "1")
    assert hold_on_device(dm, torch.device("cuda", 0)) and moved == [torch.device("cuda", 0)]


def test_a_user_datamodule_is_left_alone() -> None:
    class Own(pl.LightningDataModule):
        pass

    assert not hold_on_device(Own(), torch.device("meta"))


# --- csv and npz files ---------------------------------------------------------------------------


def write_csv(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def csv_rows(rows: int = 20) -> str:
    lines = ["a,b,c,label"] + [
        f"{i},{i % 3},{i * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(rows)
    ]
    return "\n".join(lines) + "\n"


def test_csv_loads(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", csv_rows())
    dm = load_data(DataSpec(path=path, batch_size=4, test_fraction=0), seed=0)
    # three feature columns, two string classes mapped to 0 and 1, named after the file
    assert dm.input_shape == (3,)
    assert dm.n_classes == 2
    assert dm.name == "data.csv"
    assert len(dm.x_train) == 16 and len(dm.x_val) == 4
    assert sorted(set(dm.y_train.tolist())) == [0, 1]


def test_csv_label_column_is_configurable(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", csv_rows().replace("label", "target"))
    # the features are every column but the label, wherever it sits
    assert load_data(DataSpec(path=path, label="target"), seed=0).input_shape == (3,)


@pytest.mark.parametrize(
    ("text", "label", "pattern"),
    [
        # no such label column: the error lists the columns there are
        (csv_rows(), "target", r"^data\.label: column 'target' not in data\.csv; columns: a, b, c"),
        # a feature that is text
        (
            "a,color,label\n1,red,0\n2,blue,1\n3,red,0\n4,red,1\n",
            "label",
            r"^data\.path: column 'color' of data\.csv is not numeric \(e\.g\. 'red'\)",
        ),
        # an empty feature cell
        ("a,b,label\n1,2,0\n3,,1\n5,6,0\n7,8,1\n", "label", r"^data\.path: column 'b'.*row 2"),
        # an empty label cell
        ("a,label\n1,0\n2,\n3,1\n4,0\n", "label", r"^data\.label: .*empty value"),
        # only one class
        ("a,label\n1,0\n2,0\n3,0\n", "label", r"^data\.label: data\.csv has one class"),
        # no feature columns
        ("label\n0\n1\n", "label", r"^data\.path: data\.csv has no feature columns"),
        # a single row cannot be split into train and validation
        ("a,label\n1,0\n", "label", r"^data\.path: data\.csv has 1 rows"),
        # nothing at all
        ("", "label", r"^data\.path: cannot read data\.csv"),
    ],
)
def test_csv_errors_name_the_field(tmp_path: Path, text: str, label: str, pattern: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(text)
    with pytest.raises(SpecError, match=pattern) as caught:
        load_data(DataSpec(path=path, label=label), seed=0)
    # one line, for the CLI to print
    assert "\n" not in str(caught.value)


def test_npz_loads_with_any_array_names_and_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, feats=rng.normal(size=(40, 2, 3)), target=np.arange(40) % 4 + 10)
    dm = load_data(DataSpec(path=path, features="feats", label="target"), seed=0)
    # examples keep their (2, 3) shape; labels 10..13 become 0..3
    assert dm.input_shape == (2, 3)
    assert dm.n_classes == 4
    assert sorted(set(dm.y_train.tolist())) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        # the features array is missing: the error lists the arrays there are
        (
            {"label": np.arange(10) % 2},
            r"^data\.features: array 'x' not in data\.npz; arrays: label",
        ),
        # the label array is missing
        ({"x": np.zeros((10, 2))}, r"^data\.label: array 'label' not in data\.npz; arrays: x"),
        # rows do not match
        (
            {"x": np.zeros((10, 2)), "label": np.arange(9) % 2},
            r"^data\.label: data\.npz has 9 labels but 10 rows",
        ),
        # text features
        (
            {"x": np.array([["a", "b"]] * 10), "label": np.arange(10) % 2},
            r"^data\.features: array 'x' of data\.npz is not numeric",
        ),
        # NaN features
        (
            {"x": np.full((10, 2), np.nan), "label": np.arange(10) % 2},
            r"^data\.features: .*NaN",
        ),
        # labels that are not one a row
        (
            {"x": np.zeros((10, 2)), "label": np.zeros((10, 2))},
            r"^data\.label: array 'label' of data\.npz must hold one label a row",
        ),
    ],
)
def test_npz_errors_name_the_field(tmp_path: Path, arrays: dict, pattern: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(SpecError, match=pattern):
        load_data(DataSpec(path=path), seed=0)


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_text("not a zip file")
    # a broken file is a user error about data.path, not a traceback
    with pytest.raises(SpecError, match=r"^data\.path: cannot read data\.npz"):
        load_data(DataSpec(path=path), seed=0)


def test_a_repeated_column_name_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", "f0,f0,label,label\n" + "1,2,0,0\n3,4,1,1\n" * 5)
    # pandas renamed the second label to label.1 and used it as a feature: the label leaked
    with pytest.raises(SpecError) as caught:
        load_data(DataSpec(path=path), seed=0)
    assert str(caught.value) == (
        "data.path: data.csv repeats the column name 'f0', 'label': each column needs a name "
        "of its own"
    )


def test_a_header_without_rows_says_so(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", "f0,f1,label\n")
    # "column f0 is not numeric" before
    with pytest.raises(SpecError) as caught:
        load_data(DataSpec(path=path), seed=0)
    assert str(caught.value) == "data.path: data.csv has no rows, only a header"


@pytest.mark.parametrize(
    ("label", "found"),
    [
        # a label that differs only in case, or by a typo, past the 20th column
        ("LABEL", "label"),
        ("lable", "label"),
    ],
)
def test_the_column_listing_shows_the_one_meant(tmp_path: Path, label: str, found: str) -> None:
    names = [f"feature_{i}" for i in range(100)] + ["label"]
    rows = "\n".join(",".join(["1"] * 101) for _ in range(4))
    path = write_csv(tmp_path / "data.csv", ",".join(names) + "\n" + rows + "\n")
    with pytest.raises(SpecError) as caught:
        load_data(DataSpec(path=path, label=label), seed=0)
    message = str(caught.value)
    # the column meant comes first, before the listing is cut
    assert message.startswith(
        f"data.label: column {label!r} not in data.csv; did you mean {found!r}? "
        f"columns: {found}, feature_0, feature_1"
    )
    # the listing is bounded, and says how many there are
    assert message.endswith(", ... (101 in all)") and len(message) < 400


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        # an infinite label became a class of its own
        (
            {"x": np.zeros((6, 2)), "label": np.array([0, 1, np.inf, 0, 1, 0])},
            "data.label: array 'label' of data.npz has a NaN or infinite label (row 3)",
        ),
        (
            {"x": np.zeros((6, 2)), "label": np.array([0, 1, 0, 1, np.nan, 0])},
            "data.label: array 'label' of data.npz has a NaN or infinite label (row 5)",
        ),
        # dates are no class labels
        (
            {"x": np.zeros((4, 2)), "label": np.array(["2020-01-01", "2021-01-01"] * 2, "M8[D]")},
            "data.label: array 'label' of data.npz holds datetime64[D] values; labels are "
            "integers, finite numbers or text",
        ),
        # complex features were cast to their real part with only numpy's ComplexWarning
        (
            {"x": np.zeros((6, 2)) + 1j, "label": np.arange(6) % 2},
            "data.features: array 'x' of data.npz is complex (complex128); features are real "
            "numbers",
        ),
        # a timedelta is an integer to numpy, not a feature
        (
            {"x": np.zeros((6, 2), "m8[s]"), "label": np.arange(6) % 2},
            "data.features: array 'x' of data.npz is not numeric (timedelta64[s])",
        ),
    ],
)
def test_labels_are_finite_and_features_real(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(SpecError) as caught:
        load_data(DataSpec(path=path), seed=0)
    assert str(caught.value) == message


def test_an_infinite_csv_label_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", "a,label\n1,0\n2,inf\n3,1\n4,0\n")
    with pytest.raises(SpecError) as caught:
        load_data(DataSpec(path=path), seed=0)
    # the row, counted from the first data row
    assert str(caught.value) == (
        "data.label: column 'label' of data.csv has a NaN or infinite label (row 2)"
    )


# --- user datamodules ----------------------------------------------------------------------------

USER_MODULE = """
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyDataModule(pl.LightningDataModule):
    n_classes = 3

    def __init__(self, rows=12, width=5):
        super().__init__()
        self.rows, self.width = rows, width
        self.calls = []

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage=None):
        self.calls.append(f"setup:{stage}")
        self.data = TensorDataset(torch.zeros(self.rows, self.width), torch.arange(self.rows) % 3)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)


class CountsItsClasses(TinyDataModule):
    n_classes = None
    num_classes = 4


class DoesNotSay(TinyDataModule):
    n_classes = None


class Fails(TinyDataModule):
    def __init__(self):
        raise RuntimeError("no data here")


class NotADataModule:
    pass


def not_a_class():
    pass
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A module written into tmp_path under a name unique to the test; sys.path is restored."""
    name = f"user_dm_{request.node.name.split('[')[0]}_{abs(hash(request.node.name))}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def user_spec(target: str, **fields: object) -> DataSpec:
    return DataSpec(datamodule=target, **fields)


def test_user_datamodule_loads_with_kwargs(tmp_path: Path, user_module: str) -> None:
    target = f"{user_module}:TinyDataModule"
    dm = load_data(user_spec(target, kwargs={"rows": 12, "width": 7}), seed=0, base_dir=tmp_path)
    # the class was built with the spec's kwargs
    assert dm.rows == 12 and dm.width == 7
    # input shape from the first batch, classes from the attribute, name from the import path
    assert dm.input_shape == (7,)
    assert dm.n_classes == 3
    assert dm.name == target
    # it was prepared and set up for fitting
    assert dm.calls == ["prepare_data", "setup:fit"]


def test_user_datamodule_num_classes(tmp_path: Path, user_module: str) -> None:
    # num_classes stands in for n_classes
    dm = load_data(user_spec(f"{user_module}:CountsItsClasses"), seed=0, base_dir=tmp_path)
    assert dm.n_classes == 4


def test_user_datamodule_classes_from_the_spec(tmp_path: Path, user_module: str) -> None:
    target = f"{user_module}:DoesNotSay"
    # without an attribute, data.n_classes says
    dm = load_data(user_spec(target, n_classes=6), seed=0, base_dir=tmp_path)
    assert dm.n_classes == 6
    # without either, the error names data.n_classes
    with pytest.raises(SpecError, match=r"^data\.n_classes: "):
        load_data(user_spec(target), seed=0, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        # a module that is nowhere
        (
            "no_such_module_xyz:Thing",
            r"^data\.datamodule: cannot import 'no_such_module_xyz:Thing': "
            r"No module named 'no_such_module_xyz'$",
        ),
        # a module without the class
        ("{module}:Missing", r"^data\.datamodule: cannot import .*has no attribute 'Missing'"),
        # a class that is not a LightningDataModule
        ("{module}:NotADataModule", r"^data\.datamodule: .*is not a subclass .*NotADataModule"),
        # a function, not a class
        ("{module}:not_a_class", r"^data\.datamodule: .*is not a subclass .*function"),
        # a constructor that raises
        ("{module}:Fails", r"^data\.datamodule: .*RuntimeError: no data here"),
    ],
)
def test_user_datamodule_errors_name_the_field(
    tmp_path: Path, user_module: str, target: str, pattern: str
) -> None:
    with pytest.raises(SpecError, match=pattern):
        load_data(user_spec(target.format(module=user_module)), seed=0, base_dir=tmp_path)


def test_user_datamodule_with_unknown_kwargs(tmp_path: Path, user_module: str) -> None:
    # a kwarg the class does not take is the user's error, about the datamodule
    spec = user_spec(f"{user_module}:TinyDataModule", kwargs={"colour": "red"})
    with pytest.raises(SpecError, match=r"^data\.datamodule: .*TypeError: .*colour"):
        load_data(spec, seed=0, base_dir=tmp_path)


def test_example_custom_datamodule_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = load_spec(ROOT / "examples" / "custom_datamodule" / "spec.yaml")
    dm = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    # the example's moons, 16 features and 2 classes, imported from beside the spec
    assert dm.input_shape == (16,)
    assert dm.n_classes == 2
    assert dm.name == "moons_datamodule:MoonsDataModule"

"""Turn `spec.data` into a LightningDataModule the model templates can size themselves from.

Three kinds of source: a built-in dataset (scikit-learn's bundled copies, or generated ones), a
.csv/.npz file, or the user's own LightningDataModule. Whatever the source, the datamodule that
comes back carries `input_shape` (one example's shape), `n_classes` and `name`, because the
templates build their first and last layers from them.

In-memory sources are read, split and standardised as numpy arrays by autotune.nn.sources (no torch
there) and served by `TensorBatches`: these datasets are small enough that slicing tensors beats a
DataLoader's per-row collation and worker processes, which would cost more than the tiny networks
take to train.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from autotune.core.checks import rows_served
from autotune.core.errors import SpecError, UserCodeError
from autotune.core.names import DEVICE_WORKERS_ENV
from autotune.core.spec import DataSpec
from autotune.core.user_code import USER_ERRORS, import_object, raised_line
from autotune.nn.sources import (
    load_builtin,
    read_file,
    split_rows,
    split_test,
    standardisation,
)

__all__ = [  # split_rows and the readers live in autotune.nn.sources; kept here for old imports
    "TensorBatches",
    "TensorDataModule",
    "datamodule_from_arrays",
    "hold_on_device",
    "load_data",
    "load_user_datamodule",
    "read_file",
    "split_rows",
]


class TensorBatches:
    """Serves (x, y) batches as slices of in-memory tensors: no DataLoader, no worker processes.

    Each `iter()` is one epoch. When shuffling, epoch k uses a permutation drawn from a generator
    seeded with `seed + k`, so two fits from fresh objects see the same batches in the same order.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # the permutation is drawn here, not lazily in a generator, so one iter() is one epoch
        # whether or not the caller ever asks for a batch
        order = self._permutation() if self.shuffle else None
        self.epoch += 1
        return self._batches(order)

    def __len__(self) -> int:
        return math.ceil(self._rows_served() / self.batch_size)

    def to(self, device: torch.device | str) -> TensorBatches:
        """The same batches (same seed, same epoch) with the tensors on `device`."""
        moved = TensorBatches(
            self.x.to(device),
            self.y.to(device),
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
        )
        moved.epoch = self.epoch
        return moved

    def _rows_served(self) -> int:
        return rows_served(len(self.x), self.batch_size, shuffle=self.shuffle)

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.x), generator=generator).to(self.x.device)

    def _batches(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self._rows_served(), self.batch_size):
            stop = start + self.batch_size
            if order is None:
                yield self.x[start:stop], self.y[start:stop]
            else:
                rows = order[start:stop]
                yield self.x[rows], self.y[rows]


class TensorDataModule(pl.LightningDataModule):
    """Train/validation tensors already in memory, and a test split where one is held out
    (`has_test`), which no trial sees: only the end of a study scores on it.

    Every `train_dataloader()` call starts again from epoch 0 of the seeded shuffle, so trials that
    share this datamodule differ by their configuration, not by the order they ran in. (Lightning
    calls iter() once before the first epoch, to check the loader is iterable, and that draws
    shuffle 0: a fit's E epochs train on shuffles 1 to E, the same in every trial.)
    """

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        *,
        batch_size: int,
        seed: int = 0,
        name: str = "tensors",
        n_classes: int | None = None,
        input_stats: dict[str, Any] | None = None,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if x_train.shape[1:] != x_val.shape[1:]:
            raise ValueError(
                f"train examples have shape {tuple(x_train.shape[1:])} "
                f"but validation examples {tuple(x_val.shape[1:])}"
            )
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
        empty = (x_val[:0], y_val[:0])
        self.x_test, self.y_test = test if test is not None and len(test[1]) else empty
        self.batch_size = batch_size
        self.seed = seed
        self.name = name
        self.input_shape: tuple[int, ...] = tuple(x_train.shape[1:])
        self.n_classes: int = n_classes if n_classes is not None else _count_classes(y_train, y_val)
        # how raw inputs become what the model sees: {"mean", "std", "classes"}, for production
        self.input_stats = input_stats

    def train_dataloader(self) -> TensorBatches:
        return TensorBatches(
            self.x_train, self.y_train, self.batch_size, shuffle=True, seed=self.seed
        )

    def val_dataloader(self) -> TensorBatches:
        return TensorBatches(self.x_val, self.y_val, self.batch_size, shuffle=False)

    @property
    def has_test(self) -> bool:
        return len(self.y_test) > 0

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(self.x_test, self.y_test, self.batch_size, shuffle=False)

    def to(self, device: torch.device | str) -> TensorDataModule:
        """Move the tensors to `device` (in place), so batches are born on the GPU."""
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.x_val, self.y_val = self.x_val.to(device), self.y_val.to(device)
        self.x_test, self.y_test = self.x_test.to(device), self.y_test.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def nbytes(self) -> int:
        tensors = (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)
        return sum(t.element_size() * t.nelement() for t in tensors)


# the share of a GPU's free memory the in-memory datasets may take when they move there, all the
# workers on it together (--trials-per-device); the rest is the trials'
DEVICE_DATA_SHARE = 0.25


def hold_on_device(datamodule: pl.LightningDataModule, device: torch.device) -> bool:
    """Move an in-memory dataset to the device trials train on, once per process; True if its
    tensors are there now.

    Batches are then slices of tensors already on the device, so Lightning's per-batch copy to
    the device finds nothing to copy. A dataset larger than its part of DEVICE_DATA_SHARE of the
    GPU's free memory (split between the workers the launcher started on that GPU, which move
    theirs at the same moment) stays in host memory and is copied batch by batch, as is a user's
    own DataModule, whose loaders are its own business. Apple's unified memory is not checked.
    """
    if not isinstance(datamodule, TensorDataModule):
        return False
    if datamodule.device == device:
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        sharing = max(1, int(os.environ.get(DEVICE_WORKERS_ENV, "1")))
        if datamodule.nbytes > DEVICE_DATA_SHARE * free / sharing:
            return False
    datamodule.to(device)
    return True


def test_batches(datamodule: pl.LightningDataModule) -> Any | None:
    """The test split's batches: an in-memory dataset's held-out rows, or a user datamodule's
    own test_dataloader() (after its setup("test")); None where there is no test split."""
    if isinstance(datamodule, TensorDataModule):
        return datamodule.test_dataloader() if datamodule.has_test else None
    if type(datamodule).test_dataloader is pl.LightningDataModule.test_dataloader:
        return None
    try:
        datamodule.setup("test")
        return datamodule.test_dataloader()
    except USER_ERRORS as exc:
        raise UserCodeError(
            f"data.datamodule: its test_dataloader() failed: {raised_line(exc)}"
        ) from exc


def _count_classes(*labels: torch.Tensor) -> int:
    """Classes as the largest label + 1, for labels already mapped to 0..K-1."""
    return int(max(int(y.max()) for y in labels if len(y))) + 1


def load_data(spec: DataSpec, *, seed: int, base_dir: Path = Path(".")) -> pl.LightningDataModule:
    """The datamodule `spec` names, with `input_shape`, `n_classes` and `name` set.

    `seed` drives the split, the shuffle and the generated datasets. `base_dir` (the spec file's
    folder) is where a user datamodule's module is looked for first. Raises SpecError, one line
    naming the field, for input the user can fix.
    """
    if spec.datamodule is not None:
        return load_user_datamodule(spec, base_dir=base_dir)
    if spec.path is not None:
        x, y = read_file(spec)
        name = spec.path.name
    else:
        name = spec.name or "digits"
        x, y = load_builtin(name, spec.synthetic, seed=seed)
    return datamodule_from_arrays(
        x,
        y,
        val_fraction=spec.val_fraction,
        test_fraction=spec.test_share,
        batch_size=spec.batch_size,
        seed=seed,
        name=name,
        standardize=spec.standardize,
    )


def datamodule_from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    val_fraction: float,
    batch_size: int,
    seed: int,
    name: str,
    test_fraction: float = 0.0,
    standardize: bool = True,
) -> TensorDataModule:
    """Map labels to 0..K-1, split stratified and seeded (the test rows first, where
    test_fraction holds some out), standardise on train statistics (standardize=False: the
    values as they are, the statistics those of no scaling)."""
    classes, labels = np.unique(y, return_inverse=True)
    labels = labels.reshape(-1)
    train_rows, val_rows, test_rows = split_test(
        labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    mean, std = standardisation(x[train_rows])
    if not standardize:
        mean, std = np.zeros_like(mean), np.ones_like(std)

    def scaled(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x[rows] - mean) / std).astype(np.float32))

    stats = {
        "mean": torch.from_numpy(mean),
        "std": torch.from_numpy(std),
        "classes": classes.tolist(),
    }

    def classes_of(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(labels[rows].astype(np.int64))

    return TensorDataModule(
        scaled(train_rows),
        classes_of(train_rows),
        scaled(val_rows),
        classes_of(val_rows),
        test=(scaled(test_rows), classes_of(test_rows)),
        batch_size=batch_size,
        seed=seed,
        name=name,
        n_classes=len(classes),
        input_stats=stats,
    )


# --- user datamodules ----------------------------------------------------------------------------


def load_user_datamodule(spec: DataSpec, *, base_dir: Path = Path(".")) -> pl.LightningDataModule:
    """Import "package.module:Class", build it with `spec.kwargs`, set it up, measure it.

    `prepare_data()` and `setup("fit")` run here, once, so the first batch can give the input
    shape; Lightning calls them again in `fit`, as it does for any datamodule.
    """
    assert spec.datamodule is not None
    target = spec.datamodule
    cls = import_datamodule_class(target, base_dir=base_dir)
    try:
        datamodule = cls(**spec.kwargs)
    except USER_ERRORS as exc:
        raise UserCodeError(
            f"data.datamodule: {target!r} failed to build with data.kwargs: {raised_line(exc)}"
        ) from exc
    shape = _first_batch_shape(datamodule, target)
    n_classes = _user_n_classes(datamodule, spec)
    _set_attribute(datamodule, "input_shape", shape)
    _set_attribute(datamodule, "n_classes", n_classes)
    _set_attribute(datamodule, "name", target)
    return datamodule


def import_datamodule_class(target: str, *, base_dir: Path = Path(".")) -> type:
    """The LightningDataModule subclass "package.module:Class" names, looked for in base_dir first,
    then the working directory, then the rest of sys.path."""
    cls = import_object(target, field="data.datamodule", base_dir=base_dir)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningDataModule)):
        kind = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise SpecError(
            f"data.datamodule: {target!r} is not a subclass of "
            f"lightning.pytorch.LightningDataModule (got {kind})"
        )
    return cls


def _first_batch_shape(datamodule: pl.LightningDataModule, target: str) -> tuple[int, ...]:
    """One example's shape, from the first training batch's inputs."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()), None)
    except USER_ERRORS as exc:
        raise UserCodeError(
            f"data.datamodule: {target!r} failed to set up its training data: {raised_line(exc)}"
        ) from exc
    if batch is None:
        raise SpecError(f"data.datamodule: {target!r}: train_dataloader() yielded no batches")
    x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        raise SpecError(
            f"data.datamodule: {target!r}: train_dataloader() must yield (x, y) batches "
            "with x of shape (batch, ...)"
        )
    return tuple(int(size) for size in shape[1:])


def _user_n_classes(datamodule: pl.LightningDataModule, spec: DataSpec) -> int:
    """`n_classes` or `num_classes` of the datamodule, else data.n_classes."""
    for attribute in ("n_classes", "num_classes"):
        value = getattr(datamodule, attribute, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise SpecError(
                f"data.datamodule: {attribute} of {spec.datamodule!r} must be an integer of at "
                f"least 2, got {value!r}"
            )
        return int(value)
    if spec.n_classes is not None:
        return spec.n_classes
    raise SpecError(
        f"data.n_classes: {spec.datamodule!r} has no n_classes or num_classes attribute; "
        "set data.n_classes"
    )


def _set_attribute(datamodule: pl.LightningDataModule, attribute: str, value: Any) -> None:
    """Set it unless the class made it read-only; then its own value stands."""
    with contextlib.suppress(AttributeError):
        setattr(datamodule, attribute, value)

"""Turn `spec.data` into a LightningDataModule the model templates can size themselves from.

Three kinds of source: a built-in dataset (scikit-learn's bundled copies, or generated ones), a
.csv/.npz file, or the user's own LightningDataModule. Whatever the source, the datamodule that
comes back carries `input_shape` (one example's shape), `n_classes` and `name`, because the
templates build their first and last layers from them.

In-memory sources are split (stratified, seeded), standardised with train statistics only (the
validation split must not leak into the scaling) and served by `TensorBatches`: these datasets are
small enough that slicing tensors beats a DataLoader's per-row collation and worker processes,
which would cost more than the tiny networks take to train.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split

from autotune.errors import SpecError, first_line
from autotune.spec import BUILTIN_DATASETS, DataSpec, SyntheticSpec
from autotune.user_code import describe, import_object

# Features whose train std is below this are constant (e.g. digits' corner pixels): they are
# centred but not scaled, as scikit-learn's StandardScaler does, so a value the validation split
# has and the train split never saw does not blow up to millions.
MIN_STD = 1e-6
# synthetic_images: pixel noise against templates of unit std, the largest shift in pixels, and
# the share of every template's variance that all classes have in common. Tried on 2000 16x16
# images, seed 0: a small 2-block CNN reaches about 98 % with 3 classes and 86 % with 10 (logistic
# regression 95 % and 74 %), with train accuracy above validation: room for regularisation to win.
IMAGE_NOISE = 2.0
IMAGE_MAX_SHIFT = 2
IMAGE_SHARED = 0.5
# at most this many names in an error message's list of columns or arrays
LISTED_NAMES = 20

Arrays = tuple[np.ndarray, np.ndarray]


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
        """All rows, less a last lone row when shuffling: BatchNorm cannot train on one row."""
        rows = len(self.x)
        if self.shuffle and rows % self.batch_size == 1:
            return rows - 1
        return rows

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
    """Train/validation tensors already in memory.

    Every `train_dataloader()` call starts again from epoch 0 of the seeded shuffle, so trials that
    share this datamodule differ by their configuration, not by the order they ran in.
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
    ) -> None:
        super().__init__()
        if x_train.shape[1:] != x_val.shape[1:]:
            raise ValueError(
                f"train examples have shape {tuple(x_train.shape[1:])} "
                f"but validation examples {tuple(x_val.shape[1:])}"
            )
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
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

    def to(self, device: torch.device | str) -> TensorDataModule:
        """Move the four tensors to `device` (in place), so batches are born on the GPU."""
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.x_val, self.y_val = self.x_val.to(device), self.y_val.to(device)
        return self


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
        x, y, val_fraction=spec.val_fraction, batch_size=spec.batch_size, seed=seed, name=name
    )


def datamodule_from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    val_fraction: float,
    batch_size: int,
    seed: int,
    name: str,
) -> TensorDataModule:
    """Map labels to 0..K-1, split stratified and seeded, standardise on train statistics."""
    classes, labels = np.unique(y, return_inverse=True)
    labels = labels.reshape(-1)
    train_rows, val_rows = split_rows(labels, val_fraction=val_fraction, seed=seed)
    x_train, x_val = standardise(x[train_rows], x[val_rows])
    mean, std = standardisation(x[train_rows])
    stats = {
        "mean": torch.from_numpy(mean),
        "std": torch.from_numpy(std),
        "classes": classes.tolist(),
    }
    return TensorDataModule(
        torch.from_numpy(x_train),
        torch.from_numpy(labels[train_rows].astype(np.int64)),
        torch.from_numpy(x_val),
        torch.from_numpy(labels[val_rows].astype(np.int64)),
        batch_size=batch_size,
        seed=seed,
        name=name,
        n_classes=len(classes),
        input_stats=stats,
    )


def split_rows(labels: np.ndarray, *, val_fraction: float, seed: int) -> Arrays:
    """Train and validation row indices; stratified where every class has two rows to split."""
    rows = np.arange(len(labels))
    stratify = labels if np.bincount(labels).min() >= 2 else None
    try:
        train, val = train_test_split(
            rows, test_size=val_fraction, random_state=seed, stratify=stratify
        )
    except ValueError:
        # fewer validation (or train) rows than classes: stratifying is impossible, split plainly
        try:
            train, val = train_test_split(rows, test_size=val_fraction, random_state=seed)
        except ValueError:
            raise SpecError(
                f"data.val_fraction: {val_fraction} of {len(rows)} rows leaves a split empty"
            ) from None
    return np.asarray(train), np.asarray(val)


def standardise(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits scaled per feature (per pixel for images) by the train split's mean and std."""
    mean, std = standardisation(train)
    return ((train - mean) / std).astype(np.float32), ((val - mean) / std).astype(np.float32)


def standardisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the train split; a constant feature's std is 1."""
    train = train.astype(np.float64)
    std = train.std(axis=0)
    return train.mean(axis=0).astype(np.float32), np.where(std < MIN_STD, 1.0, std).astype(
        np.float32
    )


# --- built-in datasets ---------------------------------------------------------------------------


def load_builtin(name: str, synthetic: SyntheticSpec, *, seed: int) -> Arrays:
    """Features and raw labels of a built-in dataset; digits stay (1, 8, 8) images for the cnn."""
    loaders: dict[str, Callable[[], Arrays]] = {
        "digits": _digits,
        "breast_cancer": lambda: datasets.load_breast_cancer(return_X_y=True),
        "wine": lambda: datasets.load_wine(return_X_y=True),
        "synthetic_tabular": lambda: synthetic_tabular(synthetic, seed=seed),
        "synthetic_images": lambda: synthetic_images(synthetic, seed=seed),
    }
    if name not in loaders:
        raise SpecError(
            f"data.name: unknown dataset {name!r}; expected one of: {', '.join(BUILTIN_DATASETS)}"
        )
    return loaders[name]()


def _digits() -> Arrays:
    x, y = datasets.load_digits(return_X_y=True)
    return x.reshape(-1, 1, 8, 8), y


def synthetic_tabular(synthetic: SyntheticSpec, *, seed: int) -> Arrays:
    """make_classification, with n_informative clamped to what it accepts."""
    informative = min(synthetic.n_informative, synthetic.n_features)
    # make_classification puts 2 clusters per class on the corners of an n_informative-cube
    if synthetic.n_classes * 2 > 2**informative:
        need = math.ceil(math.log2(synthetic.n_classes * 2))
        clamped = (
            f" (clamped to n_features={synthetic.n_features})"
            if informative < synthetic.n_informative
            else ""
        )
        raise SpecError(
            f"data.synthetic.n_informative: {synthetic.n_classes} classes need at least {need} "
            f"informative features; got {informative}{clamped}"
        )
    x, y = datasets.make_classification(
        n_samples=synthetic.n_samples,
        n_features=synthetic.n_features,
        n_informative=informative,
        n_redundant=min(2, synthetic.n_features - informative),
        n_repeated=0,
        n_classes=synthetic.n_classes,
        n_clusters_per_class=2,
        flip_y=synthetic.flip_y,
        random_state=seed,
    )
    return x, y


def synthetic_images(synthetic: SyntheticSpec, *, seed: int) -> Arrays:
    """(channels, size, size) images: a smooth template per class, shifted, plus noise.

    The shift makes a convolution's translation tolerance pay off; the noise and flipped labels
    keep every configuration short of 100 %, so the search has something to separate.
    """
    rng = np.random.default_rng(seed)
    templates = _smooth_templates(rng, synthetic)
    n, k = synthetic.n_samples, synthetic.n_classes
    y = rng.permutation(np.arange(n) % k)
    shifts = rng.integers(-IMAGE_MAX_SHIFT, IMAGE_MAX_SHIFT + 1, size=(n, 2))
    x = np.stack(
        [
            np.roll(templates[label], shift=(int(dy), int(dx)), axis=(1, 2))
            for label, (dy, dx) in zip(y, shifts, strict=True)
        ]
    )
    x += rng.normal(scale=IMAGE_NOISE, size=x.shape)
    flipped = rng.random(n) < synthetic.flip_y
    y[flipped] = rng.integers(0, k, size=int(flipped.sum()))
    return x.astype(np.float32), y


def _smooth_templates(rng: np.random.Generator, synthetic: SyntheticSpec) -> np.ndarray:
    """One unit-std template a class: a shared smooth pattern plus the class's own.

    The shared part makes the classes look alike, so telling them apart takes more than the mean
    brightness of a region; without it even 10 classes are near-trivially separable.
    """
    common, own = (
        _smooth_noise(rng, synthetic, 1),
        _smooth_noise(rng, synthetic, synthetic.n_classes),
    )
    templates = np.sqrt(IMAGE_SHARED) * common + np.sqrt(1 - IMAGE_SHARED) * own
    return templates / templates.std(axis=(1, 2, 3), keepdims=True)


def _smooth_noise(rng: np.random.Generator, synthetic: SyntheticSpec, count: int) -> np.ndarray:
    """`count` images of white noise blurred to blobs about a quarter of the image wide."""
    from scipy.ndimage import gaussian_filter  # scikit-learn's own dependency

    size = synthetic.image_size
    noise = rng.normal(size=(count, synthetic.channels, size, size))
    sigma = max(size / 8, 0.5)
    # wrap: the blobs continue across the border, as np.roll shifts them across it
    smooth = gaussian_filter(noise, sigma=(0, 0, sigma, sigma), mode="wrap")
    return smooth / smooth.std(axis=(1, 2, 3), keepdims=True)


# --- csv and npz files ---------------------------------------------------------------------------


def read_file(spec: DataSpec) -> Arrays:
    """Features and raw labels from `spec.path` (already resolved by the spec validator)."""
    assert spec.path is not None
    path = Path(spec.path)
    x, y = read_csv(path, spec.label) if path.suffix == ".csv" else read_npz(path, spec)
    _check_rows(x, y, path)
    return x, y


def read_csv(path: Path, label: str) -> Arrays:
    """Every column but `label` is a feature and must be numeric."""
    import pandas as pd  # only csv needs it, and it is slow to import

    try:
        frame = pd.read_csv(path)
    except Exception as exc:
        raise SpecError(f"data.path: cannot read {path.name}: {first_line(exc)}") from None
    columns = [str(column) for column in frame.columns]
    if label not in columns:
        raise SpecError(
            f"data.label: column {label!r} not in {path.name}; columns: {_listing(columns)}"
        )
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise SpecError(f"data.path: {path.name} has no feature columns besides {label!r}")
    for column in features.columns:
        _check_numeric_column(features[column], str(column), path)
    labels = frame[label]
    if labels.isna().any():
        raise SpecError(
            f"data.label: column {label!r} of {path.name} has an empty value "
            f"(data row {_first(labels.isna().to_numpy()) + 1})"
        )
    y = labels.to_numpy()
    # a column of mixed strings and numbers cannot be sorted by np.unique: compare them as text
    y = y.astype(str) if y.dtype == object else y
    return features.to_numpy(dtype=np.float64), y


def _check_numeric_column(values: Any, column: str, path: Path) -> None:
    import pandas as pd

    if values.dtype == bool:
        return
    if not pd.api.types.is_numeric_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce")
        bad = values[numbers.isna() & values.notna()]
        example = f" (e.g. {bad.iloc[0]!r})" if len(bad) else ""
        raise SpecError(f"data.path: column {column!r} of {path.name} is not numeric{example}")
    finite = np.isfinite(values.to_numpy(dtype=np.float64))
    if not finite.all():
        raise SpecError(
            f"data.path: column {column!r} of {path.name} has an empty, NaN or infinite value "
            f"(data row {_first(~finite) + 1})"
        )


def read_npz(path: Path, spec: DataSpec) -> Arrays:
    """Features from array `spec.features` (rows first), labels from array `spec.label`."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SpecError(f"data.path: cannot read {path.name}: {first_line(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SpecError(f"data.path: {path.name} is a single .npy array, not an .npz archive")
    with archive:
        for field, key in (("data.features", spec.features), ("data.label", spec.label)):
            if key not in archive.files:
                raise SpecError(
                    f"{field}: array {key!r} not in {path.name}; arrays: {_listing(archive.files)}"
                )
        try:
            x, y = archive[spec.features], archive[spec.label]
        except Exception as exc:
            raise SpecError(f"data.path: cannot read {path.name}: {first_line(exc)}") from None
    return _npz_features(x, spec.features, path), _npz_labels(y, spec.label, path)


def _npz_features(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.ndim == 0:
        raise SpecError(f"data.features: array {key!r} of {path.name} is a scalar, not rows")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise SpecError(f"data.features: array {key!r} of {path.name} is not numeric ({x.dtype})")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise SpecError(f"data.features: array {key!r} of {path.name} has NaN or infinite values")
    # one feature a row, stored flat
    return x.reshape(-1, 1) if x.ndim == 1 else x


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise SpecError(
            f"data.label: array {key!r} of {path.name} must hold one label a row, "
            f"got shape {y.shape}"
        )
    if np.issubdtype(y.dtype, np.floating) and np.isnan(y).any():
        raise SpecError(f"data.label: array {key!r} of {path.name} has NaN labels")
    return y


def _check_rows(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Rows that match, two of them at least (one to train, one to validate), two classes."""
    if len(x) != len(y):
        raise SpecError(
            f"data.label: {path.name} has {len(y)} labels but {len(x)} rows of features"
        )
    if len(y) < 2:
        raise SpecError(f"data.path: {path.name} has {len(y)} rows; need at least 2")
    classes = np.unique(y)
    if len(classes) < 2:
        raise SpecError(f"data.label: {path.name} has one class ({classes[0]!r}); need at least 2")


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
    except Exception as exc:
        raise SpecError(
            f"data.datamodule: {target!r} failed to build with data.kwargs: {describe(exc)}"
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
    except Exception as exc:
        raise SpecError(
            f"data.datamodule: {target!r} failed to set up its training data: {describe(exc)}"
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


# --- messages ------------------------------------------------------------------------------------


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(str(name) for name in names[:LISTED_NAMES])
    more = f", ... ({len(names)} in all)" if len(names) > LISTED_NAMES else ""
    return (shown + more) or "(none)"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])

"""In-memory data as numpy arrays, without torch.

Built-in datasets (scikit-learn's bundled copies, or generated ones) and .csv/.npz files become
(features, labels) arrays here; the split (stratified, seeded) and the standardisation (train
statistics only: the validation split must not leak into the scaling) are here too. autotune.data
turns the arrays into tensors and a LightningDataModule; `autotune validate` reads files through
here without torch (autotune.checks). scikit-learn, scipy and pandas are imported where they are
used: each takes a second or more to import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autotune.checks import generated_shape, informative_features, split_sizes
from autotune.errors import SpecError, first_line
from autotune.spec import BUILTIN_DATASETS, DataSpec, SyntheticSpec

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


def split_rows(labels: np.ndarray, *, val_fraction: float, seed: int) -> Arrays:
    """Train and validation row indices; stratified where every class has two rows to split."""
    from sklearn.model_selection import train_test_split

    split_sizes(len(labels), val_fraction)  # an empty split is said the way `describe` says it
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
    from sklearn import datasets

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
    if name.startswith("synthetic_"):
        generated_shape(name, synthetic)  # within the bound, before numpy allocates it
    return loaders[name]()


def _digits() -> Arrays:
    from sklearn import datasets

    x, y = datasets.load_digits(return_X_y=True)
    return x.reshape(-1, 1, 8, 8), y


def synthetic_tabular(synthetic: SyntheticSpec, *, seed: int) -> Arrays:
    """make_classification, with n_informative clamped to what it accepts."""
    informative = informative_features(synthetic)
    from sklearn import datasets

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


# --- messages ------------------------------------------------------------------------------------


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(str(name) for name in names[:LISTED_NAMES])
    more = f", ... ({len(names)} in all)" if len(names) > LISTED_NAMES else ""
    return (shown + more) or "(none)"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])

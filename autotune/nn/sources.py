"""In-memory data as numpy arrays, without torch.

Built-in datasets (scikit-learn's bundled copies, or generated ones) and .csv/.npz files become
(features, labels) arrays here; the split (stratified, seeded) and the standardisation (train
statistics only: the validation split must not leak into the scaling) are here too. autotune.nn.data
turns the arrays into tensors and a LightningDataModule; `autotune validate` reads files through
here without torch (autotune.core.checks). scikit-learn, scipy and pandas are imported where
they are used: each takes a second or more to import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autotune.core.checks import generated_shape, informative_features, split_sizes
from autotune.core.errors import SpecError, abbreviate, first_line, shorten
from autotune.core.spec import BUILTIN_DATASETS, DataSpec, SyntheticSpec

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
# an error message's list of columns or arrays: names up to this many characters in all (the
# names nearest the one asked for first), each name cut to NAME_CHARS
LISTED_CHARS = 200
NAME_CHARS = 40
# names compared with the one asked for, for a guess (difflib takes about a second for 10,000)
MATCHED_NAMES = 10_000
# the dtype kinds a feature may have: bool, int, unsigned, float (complex, datetime, text and
# objects are not features); a label may also be text or bytes
FEATURE_KINDS = "biuf"
LABEL_KINDS = "biufUS"

Arrays = tuple[np.ndarray, np.ndarray]


def split_test(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test row indices: the test rows held out first (none for a
    test_fraction of 0), then validation of the rest, each split stratified and seeded. Without
    a test split the train and validation rows are split_rows' own, as before test splits."""
    split_sizes(len(labels), val_fraction, test_fraction)  # said as `validate` says it
    rest, test = np.arange(len(labels)), np.arange(0)
    if test_fraction > 0:
        rest, test = split_rows(labels, val_fraction=test_fraction, seed=seed, field="test")
    train, val = split_rows(labels[rest], val_fraction=val_fraction, seed=seed)
    return rest[train], rest[val], test


def split_rows(labels: np.ndarray, *, val_fraction: float, seed: int, field: str = "val") -> Arrays:
    """Train and validation row indices; stratified where every class has two rows to split.
    `field`: the spec's data.<field>_fraction that `val_fraction` is, for an error."""
    from sklearn.model_selection import train_test_split

    if field == "val":  # an empty split is said the way `preflight.data_shape` says it
        split_sizes(len(labels), val_fraction)
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
                f"data.{field}_fraction: {val_fraction} of {len(rows)} rows leaves a split empty"
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
        # the header as written: pandas renames a repeated name (label, label.1), which would
        # make a second label column a feature
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
        frame = pd.read_csv(path)
    except Exception as exc:
        raise SpecError(f"data.path: cannot read {path.name}: {first_line(exc)}") from None
    _check_header([str(name) for name in header.iloc[0]], path)
    columns = [str(column) for column in frame.columns]
    if label not in columns:
        raise SpecError(
            f"data.label: column {abbreviate(label)} not in {path.name}; "
            f"{_listing(columns, label, 'columns')}"
        )
    if len(frame) == 0:
        raise SpecError(f"data.path: {path.name} has no rows, only a header")
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise SpecError(
            f"data.path: {path.name} has no feature columns besides {abbreviate(label)}"
        )
    for column in features.columns:
        _check_numeric_column(features[column], str(column), path)
    labels = frame[label]
    if labels.isna().any():
        raise SpecError(
            f"data.label: column {abbreviate(label)} of {path.name} has an empty value "
            f"(data row {_first(labels.isna().to_numpy()) + 1})"
        )
    y = _check_labels(labels.to_numpy(), f"column {abbreviate(label)}", path)
    # a column of mixed strings and numbers cannot be sorted by np.unique: compare them as text
    y = y.astype(str) if y.dtype == object else y
    return features.to_numpy(dtype=np.float64), y


def _check_header(names: list[str], path: Path) -> None:
    """Every column named once (unnamed ones aside)."""
    seen: set[str] = set()
    repeated = [name for name in names if name and (name in seen or seen.add(name))]
    if repeated:
        listed = ", ".join(abbreviate(name, NAME_CHARS) for name in dict.fromkeys(repeated))
        raise SpecError(
            f"data.path: {path.name} repeats the column name {listed}: each column needs a "
            "name of its own"
        )


def _check_numeric_column(values: Any, column: str, path: Path) -> None:
    import pandas as pd

    if values.dtype == bool:
        return
    name = abbreviate(column, NAME_CHARS)
    if not pd.api.types.is_numeric_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce")
        bad = values[numbers.isna() & values.notna()]
        example = f" (e.g. {abbreviate(bad.iloc[0])})" if len(bad) else ""
        raise SpecError(f"data.path: column {name} of {path.name} is not numeric{example}")
    finite = np.isfinite(values.to_numpy(dtype=np.float64))
    if not finite.all():
        raise SpecError(
            f"data.path: column {name} of {path.name} has an empty, NaN or infinite value "
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
                    f"{field}: array {abbreviate(key)} not in {path.name}; "
                    f"{_listing(archive.files, key, 'arrays')}"
                )
        try:
            x, y = archive[spec.features], archive[spec.label]
        except Exception as exc:
            raise SpecError(f"data.path: cannot read {path.name}: {first_line(exc)}") from None
    return _npz_features(x, spec.features, path), _npz_labels(y, spec.label, path)


def _npz_features(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    name = abbreviate(key)
    if x.ndim == 0:
        raise SpecError(f"data.features: array {name} of {path.name} is a scalar, not rows")
    if x.dtype.kind == "c":
        raise SpecError(
            f"data.features: array {name} of {path.name} is complex ({x.dtype}); "
            "features are real numbers"
        )
    if x.dtype.kind not in FEATURE_KINDS:
        raise SpecError(f"data.features: array {name} of {path.name} is not numeric ({x.dtype})")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise SpecError(f"data.features: array {name} of {path.name} has NaN or infinite values")
    # one feature a row, stored flat
    return x.reshape(-1, 1) if x.ndim == 1 else x


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise SpecError(
            f"data.label: array {abbreviate(key)} of {path.name} must hold one label a row, "
            f"got shape {y.shape}"
        )
    return _check_labels(y, f"array {abbreviate(key)}", path)


def _check_labels(y: np.ndarray, where: str, path: Path) -> np.ndarray:
    """Labels that name classes: numbers (finite: an infinite one would be a class of its own),
    text or bools; not complex numbers, dates or objects."""
    if y.dtype.kind not in LABEL_KINDS and y.dtype != object:
        raise SpecError(
            f"data.label: {where} of {path.name} holds {y.dtype} values; labels are integers, "
            "finite numbers or text"
        )
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise SpecError(
            f"data.label: {where} of {path.name} has a NaN or infinite label "
            f"(row {_first(~np.isfinite(y)) + 1})"
        )
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


def _listing(names: Sequence[str], wanted: str, what: str) -> str:
    """`what: a, b, ...` for a name not found: the names nearest `wanted` first (so a line cut
    short still shows the one meant), then the rest in order, up to LISTED_CHARS characters."""
    near = difflib.get_close_matches(wanted, names[:MATCHED_NAMES], n=3, cutoff=0.6)
    near += [n for n in names if n.lower() == wanted.lower() and n not in near]
    guess = f"did you mean {', '.join(abbreviate(n, NAME_CHARS) for n in near)}? " if near else ""
    shown: list[str] = []
    for name in [*near, *(n for n in names if n not in near)]:
        if sum(len(n) + 2 for n in shown) > LISTED_CHARS:
            break
        shown.append(shorten(str(name), NAME_CHARS))
    more = f", ... ({len(names)} in all)" if len(shown) < len(names) else ""
    return f"{guess}{what}: {', '.join(shown) + more or '(none)'}"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])

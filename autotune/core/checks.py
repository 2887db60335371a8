"""What can be wrong with a spec before any training, as facts and checks that need no torch.

The split sizes and the rows an epoch serves, a generated dataset's shape, the template against
the data's shape, a template network's size counted without building it, the sampler against
the space, the accelerator and the batches. `autotune.run.preflight` puts them together (`validate`,
and `run`'s checks with the data loaded); `sources`, `data` and `models` use the same facts, so
that a refusal reads the same wherever it is made. Only `check_accelerator` may import
Lightning, and only for a gpu, cuda or mps device or a precision other than float32.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from autotune.core.errors import SpecError, first_line
from autotune.core.space import SearchSpace
from autotune.core.spec import ModelSpec, SyntheticSpec

# samplers that model numeric parameters only
NUMERIC_SAMPLERS = ("cmaes", "gp")
# accelerators that are always there: auto falls back to the CPU
ALWAYS_THERE = ("auto", "cpu")
# the most values a generated dataset may hold (rows × features, or rows × pixels, class
# templates included): 2**28 float64 values are 2 GB a copy, and generating them holds about
# three copies; synthetic_images' default is 2000 × 256
MAX_GENERATED = 2**28
# the largest template network: 10**9 float32 weights are 4 GB, 16 GB with their gradients and
# AdamW's two moments, before any activation: more than most GPUs hold beside the data. The
# digits mlp has 60,000
MAX_PARAMETERS = 10**9


def split_sizes(rows: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int]:
    """(train rows, validation rows) of split_rows, by scikit-learn's rounding (held-out rows
    rounded up, the rest to train): the test rows first, then validation of the rest; SpecError
    when a split is empty."""
    test = math.ceil(test_fraction * rows)
    if test_fraction and test >= rows:
        raise SpecError(f"data.test_fraction: {test_fraction} of {rows} rows leaves a split empty")
    val = math.ceil(val_fraction * (rows - test))
    train = rows - test - val
    if train < 1 or val < 1:
        raise SpecError(
            f"data.val_fraction: {val_fraction} of {rows - test} rows leaves a split empty"
        )
    return train, val


def rows_served(rows: int, batch_size: int, *, shuffle: bool) -> int:
    """The rows an epoch serves: all, less a last lone row when shuffling (BatchNorm cannot
    train on one row)."""
    if shuffle and rows % batch_size == 1:
        return rows - 1
    return rows


@dataclass(frozen=True)
class DataShape:
    """What the templates and `validate` need to know of a dataset."""

    name: str
    input_shape: tuple[int, ...]  # one example's shape
    n_classes: int
    train_rows: int | None = None  # None: a user datamodule, which serves what it serves
    val_rows: int | None = None


def generated_shape(name: str, synthetic: SyntheticSpec) -> tuple[int, ...]:
    """One example's shape in a generated dataset; SpecError when the dataset would hold more
    than MAX_GENERATED values."""
    if name == "synthetic_tabular":
        shape: tuple[int, ...] = (synthetic.n_features,)
        rows = synthetic.n_samples
    else:  # synthetic_images: one smooth template a class besides the images
        size = synthetic.image_size
        shape, rows = (synthetic.channels, size, size), synthetic.n_samples + synthetic.n_classes
    values = rows * math.prod(shape)
    if values > MAX_GENERATED:
        fields = "n_features" if name == "synthetic_tabular" else "image_size, channels"
        raise SpecError(
            f"data.synthetic: {name} of {synthetic.n_samples:,} rows shaped {shape} would "
            f"hold {values:,} values; at most {MAX_GENERATED:,} (lower n_samples or {fields})"
        )
    return shape


def informative_features(synthetic: SyntheticSpec) -> int:
    """n_informative clamped to n_features; SpecError when too few for the classes."""
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
    return informative


def check_sampler(name: str, space: SearchSpace) -> None:
    """cmaes and gp need at least one numeric parameter to model."""
    if name in NUMERIC_SAMPLERS and not space.has_numeric():
        raise SpecError(f"study.sampler: {name} models numeric parameters; this space has none")


def check_template(template: str, input_shape: Sequence[int]) -> None:
    """The cnn and resnet templates take images, (C, H, W)."""
    if template in ("cnn", "resnet") and len(input_shape) != 3:
        raise SpecError(
            f"model.template: {template} needs images shaped (C, H, W); "
            f"the data has shape {tuple(input_shape)}"
        )


def check_accelerator(accelerator: str, precision: str = "32-true") -> None:
    """The accelerator exists here and takes the precision. Only Lightning (torch) can tell for
    gpu, cuda and mps, or for a precision other than float32."""
    if accelerator in ALWAYS_THERE and precision == "32-true":
        return
    try:
        _trainer(accelerator, precision)
    except Exception as exc:  # MisconfigurationException: no such device, or precision, here
        # Lightning raises the same MisconfigurationException (or ValueError) for either: the
        # precision is at fault when the accelerator alone, in float32, is taken
        field, value = ("accelerator", accelerator)
        if precision != "32-true" and _takes(accelerator):
            field, value = ("precision", precision)
        raise SpecError(f"train.{field}: {value!r}: {first_line(exc)}") from None


def _trainer(accelerator: str, precision: str) -> None:
    """Make (and drop) a Lightning Trainer for one device of `accelerator` at `precision`."""
    import lightning.pytorch as pl  # only here: validate imports no Lightning otherwise

    quiet_lightning()
    pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _takes(accelerator: str) -> bool:
    """Whether Lightning takes `accelerator` in float32."""
    try:
        _trainer(accelerator, "32-true")
    except Exception:
        return False
    return True


def count_parameters(model: ModelSpec, input_shape: Sequence[int], n_classes: int) -> int:
    """The trainable parameters of a template network (models.build_model), counted without
    building it: weights, BN's scale and shift, the head's weights and bias."""
    widths = model.resolved_widths
    if model.template == "mlp":
        fan_in, total = math.prod(input_shape), 0
        for width in widths:
            total += fan_in * width + 2 * width
            fan_in = width
        return total + fan_in * n_classes + n_classes
    channels, side, total = input_shape[0], min(input_shape[1:]), 0
    for i, width in enumerate(widths):
        if model.template == "cnn":
            total += 9 * channels * width + 2 * width
        else:  # resnet: two 3x3 convolutions, and a 1x1 projection where the shape changes
            stride = 2 if model.pool and i > 0 and side >= 2 else 1
            side = (side + 1) // 2 if stride == 2 else side
            total += 9 * channels * width + 9 * width * width + 4 * width
            if stride != 1 or channels != width:
                total += channels * width + 2 * width
        channels = width
    return total + channels * n_classes + n_classes


def check_size(model: ModelSpec, input_shape: Sequence[int], n_classes: int) -> None:
    """A template network of at most MAX_PARAMETERS parameters (a model of one's own is the
    user's business). The shape is checked against the template first."""
    if model.imported:
        return
    check_template(model.template, input_shape)
    count = count_parameters(model, input_shape, n_classes)
    if count > MAX_PARAMETERS:
        raise SpecError(
            f"model.widths: the {model.template} would have {count:,} parameters for data "
            f"shaped {tuple(input_shape)} with {n_classes} classes; at most {MAX_PARAMETERS:,}"
        )


def check_batches(train_rows: int, batch_size: int) -> None:
    """At least one training batch an epoch."""
    if rows_served(train_rows, batch_size, shuffle=True) == 0:
        raise SpecError("data.val_fraction: the training split is too small for one batch")


def quiet_lightning() -> None:
    """Lightning's per-fit banners ("GPU available ...") and hints would drown the progress bar."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

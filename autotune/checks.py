"""What can be wrong with a spec before any training, checked without torch where it can be.

`check_spec` is `autotune validate`: the search space, the data (`describe` reads a file as
training would, and knows the built-in datasets without loading them), the template
against the data's shape, the sampler against the space, the accelerator and the batches. torch,
Lightning and MLflow take seconds to import, and none of these checks needs them, with two
exceptions: whether a gpu, cuda or mps device is there (or takes a precision other than
float32), which only torch can tell, and the user's own code, a LightningDataModule or an
imported model, whose blocks a forward pass finds. Those take the path `autotune run` takes
(`study.check_runnable`). `run` makes the same checks, with the data loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autotune.errors import SpecError, first_line
from autotune.space import SearchSpace, Slot, load_space
from autotune.spec import BUILTIN_DATASETS, DataSpec, ModelSpec, Spec, SyntheticSpec

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


def split_sizes(rows: int, val_fraction: float) -> tuple[int, int]:
    """(train rows, validation rows) of split_rows, by scikit-learn's rounding (validation rows
    rounded up, the rest to train); SpecError when either split is empty."""
    val = math.ceil(val_fraction * rows)
    train = rows - val
    if train < 1 or val < 1:
        raise SpecError(f"data.val_fraction: {val_fraction} of {rows} rows leaves a split empty")
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


# the bundled datasets: rows, one example's shape, classes (a test checks them against the data)
BUNDLED = {
    "digits": (1797, (1, 8, 8), 10),
    "breast_cancer": (569, (30,), 2),
    "wine": (178, (13,), 3),
}


def describe(spec: DataSpec) -> DataShape:
    """The shape, classes and split sizes `load_data` will give, with the same SpecErrors, for a
    built-in dataset or a file; not for a user datamodule (that needs its own code).

    Built-in datasets are not loaded: the bundled ones are known, and the generated ones are what
    their spec says (`n_classes` is the classes the generator draws from). Files are read and
    checked as `load_data` reads them.
    """
    if spec.datamodule is not None:
        raise ValueError("describe() cannot tell a user datamodule's shape; use load_data()")
    if spec.path is not None:
        import numpy as np

        from autotune.sources import read_file

        x, y = read_file(spec)
        name, rows, shape, classes = spec.path.name, len(y), tuple(x.shape[1:]), len(np.unique(y))
    else:
        name = spec.name or "digits"
        rows, shape, classes = _builtin_shape(name, spec.synthetic)
    train, val = split_sizes(rows, spec.val_fraction)
    return DataShape(name, tuple(int(size) for size in shape), int(classes), train, val)


def _builtin_shape(name: str, synthetic: SyntheticSpec) -> tuple[int, tuple[int, ...], int]:
    if name in BUNDLED:
        return BUNDLED[name]
    if name == "synthetic_tabular":
        informative_features(synthetic)
    if name in ("synthetic_tabular", "synthetic_images"):
        return synthetic.n_samples, generated_shape(name, synthetic), synthetic.n_classes
    raise SpecError(
        f"data.name: unknown dataset {name!r}; expected one of: {', '.join(BUILTIN_DATASETS)}"
    )


def resolve_space(spec: Spec, data: Any | None = None) -> SearchSpace:
    """The spec's search space, overrides applied, for the model's blocks. An imported model's
    blocks are found by a forward pass (torch): it needs `data`, a datamodule or a DataShape, for
    the input shape and the classes."""
    if not spec.model.imported:
        return load_space(
            spec.search_space.base,
            params=spec.search_space.params,
            blocks=spec.search_space.blocks,
            n_blocks=len(spec.model.resolved_widths),
            template=spec.model.template,
            base_dir=spec.base_dir,
        )
    if data is None:
        raise ValueError("an imported model's blocks come from its data: pass the data")
    slots = model_slots(spec, tuple(data.input_shape), int(data.n_classes))
    return load_space(
        spec.search_space.base,
        params=spec.search_space.params,
        blocks=spec.search_space.blocks,
        n_blocks=len(slots),
        slots=slots,
        base_dir=spec.base_dir,
    )


def model_slots(spec: Spec, shape: tuple[int, ...], n_classes: int) -> tuple[Slot, ...]:
    """What each block of the imported model has room for; SpecError when it has no block."""
    from autotune.surgery import make_user_model, user_blocks

    target = spec.model.import_
    model = make_user_model(spec.model, shape, n_classes, base_dir=spec.base_dir)
    blocks = user_blocks(spec.model, model, shape)
    if not blocks:
        raise SpecError(
            f"model.import: {target!r} uses no BatchNorm layer in its forward pass: "
            "there is nothing to tune"
        )
    return tuple(block.slot() for block in blocks)


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
    import lightning.pytorch as pl

    from autotune.training import quiet_lightning

    quiet_lightning()
    try:
        pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except Exception as exc:  # MisconfigurationException: no such device, or precision, here
        field, value = (
            ("precision", precision)
            if "precision" in str(exc).lower()
            else ("accelerator", accelerator)
        )
        raise SpecError(f"train.{field}: {value!r}: {first_line(exc)}") from None


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


def check_spec(spec: Spec) -> tuple[SearchSpace, DataShape]:
    """Everything `autotune validate` checks; SpecError, one line, on the first problem."""
    seed, base_dir = spec.train.seed, spec.base_dir
    if spec.data.datamodule is not None or spec.model.imported:  # the user's own code: as
        from autotune.data import load_data  # `run` does it
        from autotune.study import check_runnable

        datamodule = load_data(spec.data, seed=seed, base_dir=base_dir)
        space = resolve_space(spec, datamodule)
        check_runnable(spec, space, datamodule)
        shape = DataShape(
            str(datamodule.name),  # type: ignore[attr-defined]
            tuple(datamodule.input_shape),  # type: ignore[attr-defined]
            int(datamodule.n_classes),  # type: ignore[attr-defined]
        )
        return space, shape
    space = resolve_space(spec)
    data = describe(spec.data)
    check_sampler(spec.study.sampler, space)
    check_template(spec.model.template, data.input_shape)
    check_size(spec.model, data.input_shape, data.n_classes)
    check_accelerator(spec.train.accelerator, spec.train.precision)
    if data.train_rows is not None:
        check_batches(data.train_rows, spec.data.batch_size)
    return space, data

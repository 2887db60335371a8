"""What is checked and resolved before any trial: the first steps of `run`, `validate` and
`predict`.

`check_spec` is `autotune validate`: the search space, the data (`data_shape` reads a file as
training would, and knows the built-in datasets without loading them), the template against the
data's shape, the sampler against the space, the accelerator and the batches. torch, Lightning,
Optuna and MLflow take seconds to import, and none of these checks needs them, with two
exceptions: whether a gpu, cuda or mps device is there (or takes a precision other than
float32), which only torch can tell, and the user's own code, a LightningDataModule or an
imported model, whose blocks a forward pass finds. Those take the path `autotune run` takes:
the data loaded, `resolve_space` with it, then `check_runnable`, which `run` and `predict` call
too. The checks themselves, torch-free, are in `autotune.core.checks`.

This module imports nothing heavy at the top: the data, the models, the surgery and the sampler
are imported inside the functions that need them, so `validate` of a built-in dataset or a file
imports none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.core.checks import (
    DataShape,
    check_accelerator,
    check_batches,
    check_sampler,
    check_size,
    check_template,
    generated_shape,
    informative_features,
    split_sizes,
)
from autotune.core.errors import SpecError, UserCodeError, abbreviate
from autotune.core.space import SearchSpace, Slot, TrialConfig
from autotune.core.space_files import load_space
from autotune.core.spec import BUILTIN_DATASETS, DataSpec, Spec, SyntheticSpec
from autotune.core.user_code import USER_ERRORS, message_of, raised_line

# the bundled datasets: rows, one example's shape, classes (a test checks them against the data)
BUNDLED = {
    "digits": (1797, (1, 8, 8), 10),
    "breast_cancer": (569, (30,), 2),
    "wine": (178, (13,), 3),
}


def data_shape(spec: DataSpec) -> DataShape:
    """The shape, classes and split sizes `load_data` will give, with the same SpecErrors, for a
    built-in dataset or a file; not for a user datamodule (that needs its own code).

    Built-in datasets are not loaded: the bundled ones are known, and the generated ones are what
    their spec says (`n_classes` is the classes the generator draws from). Files are read and
    checked as `load_data` reads them.
    """
    if spec.datamodule is not None:
        raise ValueError("data_shape() cannot tell a user datamodule's shape; use load_data()")
    if spec.path is not None:
        import numpy as np

        from autotune.nn.sources import read_file

        x, y = read_file(spec)
        name, rows, shape, classes = spec.path.name, len(y), tuple(x.shape[1:]), len(np.unique(y))
    else:
        name = spec.name or "digits"
        rows, shape, classes = _builtin_shape(name, spec.synthetic)
    train, val = split_sizes(rows, spec.val_fraction, spec.test_share)
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
    from autotune.nn.surgery import make_user_model, user_blocks

    target = spec.model.import_
    model = make_user_model(spec.model, shape, n_classes, base_dir=spec.base_dir)
    blocks = user_blocks(spec.model, model, shape)
    if not blocks:
        raise SpecError(
            f"model.import: {target!r} uses no BatchNorm layer in its forward pass: "
            "there is nothing to tune"
        )
    return tuple(block.slot() for block in blocks)


def check_runnable(spec: Spec, space: SearchSpace, datamodule: Any) -> None:
    """Fail on input before any training: the template must fit the data, the sampler the space."""
    from autotune.nn.models import build_model  # torch
    from autotune.search.storage import make_sampler  # optuna

    make_sampler(spec.study.sampler, spec.train.seed, space)
    shape, n_classes = datamodule.input_shape, datamodule.n_classes
    check_size(spec.model, shape, n_classes)  # before torch allocates it
    build_model(spec.model, space.defaults(), shape, n_classes, base_dir=spec.base_dir)
    check_accelerator(spec.train.accelerator, spec.train.precision)
    try:  # a user's DataModule may fail here, or give a loader whose len() raises
        loader = datamodule.train_dataloader()
        empty = hasattr(loader, "__len__") and len(loader) == 0
    except USER_ERRORS as exc:
        code = spec.data.datamodule
        where = f"data.datamodule: {abbreviate(code)}" if code else "data"
        raise UserCodeError(f"{where}: its training loader failed: {raised_line(exc)}") from None
    if empty:
        raise SpecError("data.val_fraction: the training split is too small for one batch")
    try:  # the metric needs validation batches; a DataModule without them fails every trial
        next(iter(datamodule.val_dataloader()))
    except USER_ERRORS as exc:
        raise UserCodeError(f"data: no validation batch: {message_of(exc)}") from None


def check_spec(spec: Spec) -> tuple[SearchSpace, DataShape]:
    """Everything `autotune validate` checks; SpecError, one line, on the first problem."""
    seed, base_dir = spec.train.seed, spec.base_dir
    if spec.data.datamodule is not None or spec.model.imported:  # the user's own code: as
        from autotune.nn.data import load_data  # `run` does it

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
    data = data_shape(spec.data)
    check_sampler(spec.study.sampler, space)
    check_template(spec.model.template, data.input_shape)
    check_size(spec.model, data.input_shape, data.n_classes)
    check_accelerator(spec.train.accelerator, spec.train.precision)
    if data.train_rows is not None:
        check_batches(data.train_rows, spec.data.batch_size)
    return space, data


def read_config(space: SearchSpace, config_file: Path) -> TrialConfig:
    """The configuration in `config_file` (blocks, recalibrate_bn: a recommended.yaml, or one
    written by hand), checked against `space`; SpecError naming the file where it does not fit."""
    from autotune.core.files import read_yaml
    from autotune.core.space_files import config_from_mapping

    return config_from_mapping(
        read_yaml(config_file, what="config file"),
        n_blocks=len(space.blocks),
        slots=space.slots,
        source=str(config_file),
    )

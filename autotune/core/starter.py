"""What `autotune init` writes: a commented starter spec that validates as it is, and with
`--model` a factory of the user's own network to start from. Text only: no torch, no Optuna."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from autotune.core.errors import SpecError
from autotune.core.spec import BUILTIN_DATASETS

HEAD = """\
# A starter spec written by `autotune init`. Check it with `autotune validate {spec}` (a
# second, nothing trained), run it with `autotune run {spec}`. Every field: docs/spec.md.
study:
  name: {name}{pad}# a rerun with the same name resumes this study
  metric: val_acc           # val_acc (maximised), or val_loss, train_loss (minimised)
  n_trials: 20              # the budget; TPE samples at random for its first 10
  pruner: variance_shift    # stops trials predicted to miss, before and during training
"""

BUILTIN = """\
data:
  name: {dataset}{pad}# built in: {builtins}
  # path: my_data.csv       # or a file of your own: a csv with a label column, or an npz
"""

OWN_FILE = """\
data:
  path: {path}{pad}# a csv with one column of labels, or an npz (features, label)
  label: {label}{pad_label}# the labels' column (csv) or array (npz)
"""

REST = """\
  test_fraction: 0.2        # held out first and seen by no trial: the pick is scored on it
  val_fraction: 0.2         # of the rest: what every trial is scored on
  batch_size: 64            # BN's statistics need a few dozen rows a batch
{model}train:
  max_epochs: 10            # raise it until the best trials stop improving
  lr: 1.0e-3
  accelerator: auto         # a GPU where there is one, else the CPU
search_space: dropout_bn    # per block: placement, rate, kind, BN momentum (`autotune spaces`)
output: {out}{pad_out}# recommended.yaml, best_model.py, the study and MLflow's store
"""

TEMPLATE_MODEL = """\
model:
  template: mlp             # mlp, cnn (images) or resnet (images); or a network of your own
  widths: [256, 128]        # a block per width: Linear, BatchNorm, ReLU, a regulariser slot
"""

IMPORTED_MODEL = """\
model:
  import: {target}{pad}# {file}: `build` returns your nn.Module
  kwargs:
    width: 128              # what build takes beyond what the data tells it
"""

FACTORY = '''\
"""A network of your own, for autotune to tune (`model.import: {target}` in {spec}).

`build` returns any torch nn.Module. autotune calls it with what it can tell from the data under
the names its arguments have (input_shape, n_classes or num_classes, in_features, in_channels,
...) and with model.kwargs for the rest. Every BatchNorm layer the forward pass reaches becomes a
block: a regulariser slot before it, after it and after the activation that follows it, and its
momentum. Give each activation a module of its own, used once, so that it gets an after_act slot.
"""

from torch import nn


def build(in_features: int, n_classes: int, width: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),  # images too: a row of in_features values
        nn.Linear(in_features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, n_classes),
    )
'''

COMMENT_AT = 28  # the column the comments of the starter spec start at


def starter_spec(
    spec_file: Path,
    *,
    dataset: str = "digits",
    data_file: Path | None = None,
    label: str = "label",
    model_file: Path | None = None,
) -> str:
    """The starter spec's text. `data_file` and `model_file` are written into it relative to
    the spec's folder, where autotune looks for them."""
    name = _study_name(spec_file, data_file, dataset)
    if model_file is not None and spec_file.stem in ("spec", "autotune"):
        name = f"{name}-{model_file.stem}"
    name = scalar(name)
    text = HEAD.format(spec=spec_file, name=name, pad=_pad("  name: " + name))
    if data_file is None:
        if dataset not in BUILTIN_DATASETS:
            raise SpecError(
                f"--data: {dataset!r} is neither a built-in dataset "
                f"({', '.join(BUILTIN_DATASETS)}) nor a file"
            )
        text += BUILTIN.format(
            dataset=dataset,
            pad=_pad("  name: " + dataset),
            builtins=", ".join(BUILTIN_DATASETS),
        )
    else:
        path, label = scalar(_beside(data_file, spec_file, "--data")), scalar(label)
        text += OWN_FILE.format(
            path=path,
            pad=_pad("  path: " + path),
            label=label,
            pad_label=_pad("  label: " + label),
        )
    if model_file is None:
        model = TEMPLATE_MODEL
    else:
        target = f"{module_name(model_file, spec_file)}:build"
        model = IMPORTED_MODEL.format(
            target=target, pad=_pad("  import: " + target), file=model_file.name
        )
    out = scalar(f"runs/{name.strip(chr(34))}")
    return text + REST.format(model=model, out=out, pad_out=_pad("output: " + out))


def starter_factory(model_file: Path, spec_file: Path) -> str:
    """The factory's text: a small network that runs on any of the built-in datasets."""
    target = f"{module_name(model_file, spec_file)}:build"
    return FACTORY.format(target=target, spec=spec_file.name)


def module_name(model_file: Path, spec_file: Path) -> str:
    """The module `model.import` names for a file under the spec's folder: models/net.py is
    models.net."""
    parts = Path(_beside(model_file, spec_file, "--model")).with_suffix("").parts
    if model_file.suffix != ".py" or not all(part.isidentifier() for part in parts):
        raise SpecError(
            f"--model: {model_file.name!r} is not a Python module's name: a file like my_model.py"
        )
    return ".".join(parts)


def _beside(path: Path, spec_file: Path, option: str) -> str:
    """`path` relative to the spec's folder, where autotune looks for it; SpecError elsewhere."""
    folder = spec_file.resolve().parent
    try:
        return path.resolve().relative_to(folder).as_posix()
    except ValueError:
        raise SpecError(
            f"{option}: {path} is not under the spec's folder {spec_file.parent}: put the spec "
            "beside it (or in a folder above)"
        ) from None


def _study_name(spec_file: Path, data_file: Path | None, dataset: str) -> str:
    stem = spec_file.stem if spec_file.stem not in ("spec", "autotune") else None
    name = stem or (data_file.stem if data_file is not None else dataset)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "study"


def scalar(text: str) -> str:
    """`text` as a YAML value that reads back as this string: as it is where YAML would read it
    so, else in double quotes (a name like 2024, yes or on, a "#" that would start a comment)."""
    try:
        plain = yaml.safe_load(text) == text and "#" not in text and ": " not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _pad(line: str) -> str:
    """Spaces from the end of `line` to the comments' column (at least two)."""
    return " " * max(2, COMMENT_AT - len(line))

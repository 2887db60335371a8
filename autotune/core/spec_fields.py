"""The validated field types and shared validators of spec.yaml's sections (autotune.core.spec).

`Int` and `Float` are what a number in a spec may be; `Section` is what every section is (frozen,
no unknown key, no NaN); the validators check what several sections check alike: an import path,
a storage or tracking URL's file, a value best_model.py can write back, a file the spec reads
(relative to the spec file's folder).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
)

from autotune.core.errors import abbreviate, quote_path
from autotune.core.files import file_problem, path_too_long, url_file

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# the most an int field holds: what numpy, torch and the storages' integer columns hold
MAX_INT = 2**63 - 1


def no_bool(value: Any) -> Any:
    """YAML's true and false are Python bools, which are ints: refuse them where a number goes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _int64(value: int) -> int:
    if abs(value) > MAX_INT:
        raise ValueError(f"expected an integer of at most 2**63 - 1, got {abbreviate(value)}")
    return value


# an integer as written (true, 2.0 or "2" are refused), within what int64 holds
Int = Annotated[int, Strict(), AfterValidator(_int64)]
# a number: an int or a float (or a string such as "1e-3", which YAML 1.1 reads as text), not a
# bool; NaN and infinity are refused by the sections' allow_inf_nan=False
Float = Annotated[float, BeforeValidator(no_bool)]


class Section(BaseModel):
    # every section of a spec. NaN and infinity are refused in every float field; bytes in kwargs
    # (YAML's !!binary) are dumped as base64 for the MLflow params, where they are not UTF-8 text
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, ser_json_bytes="base64"
    )


def reads_back(value: Any) -> bool:
    """Whether `value`'s repr is a Python literal that reads back as `value`."""
    try:
        return bool(ast.literal_eval(repr(value)) == value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def shorthand(value: Any, key: str = "name") -> Any:
    """Let `pruner: median` stand for `pruner: {name: median}`."""
    return {key: value} if isinstance(value, str) else value


def import_path(what: str) -> Callable[[str | None], str | None]:
    """A validator of "package.module:<what>" strings (None passes)."""

    def check(value: str | None) -> str | None:
        if value is not None and not IMPORT_PATH.match(value):
            raise ValueError(f"expected 'package.module:{what}', got {abbreviate(value)}")
        return value

    return check


def file_url_fits(url: str | None) -> str | None:
    """A storage or tracking URL whose file's path the file system can hold (None passes)."""
    path = None if url is None else url_file(url)
    if path is not None and path_too_long(Path(path)):
        raise ValueError(f"path too long for the file system: {quote_path(path)}")
    return url


def resolve(path: Path, info: ValidationInfo) -> Path:
    """A path the spec reads, relative to the spec file's folder (the validation context's)."""
    base = Path((info.context or {}).get("base_dir", "."))
    return path if path.is_absolute() else base / path


def existing(path: Path) -> Path:
    """The path of a file that can be read; ValueError saying why not, for the field's error."""
    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"file {problem}: {quote_path(path)}")
    return path


class SyntheticSpec(Section):
    # rows drawn for synthetic_tabular and synthetic_images
    n_samples: Int = Field(2000, ge=20)
    # synthetic_tabular: columns; synthetic_images: ignored (the image size sets the features)
    n_features: Int = Field(20, ge=2)
    # synthetic_tabular: columns that carry the label; the rest is noise
    n_informative: Int = Field(10, ge=1)
    n_classes: Int = Field(3, ge=2)
    # synthetic_images: side of the square image, and channels
    image_size: Int = Field(16, ge=4)
    channels: Int = Field(1, ge=1)
    # label noise: the share of labels flipped at random, so that no config reaches 100 %
    flip_y: Float = Field(0.02, ge=0, lt=1)

"""The user's own code, named in a spec as "package.module:name": a datamodule or a model factory.

A module is looked for in the spec file's folder first, then the working directory, then the rest
of sys.path, so that a spec and the code beside it work from anywhere. Errors are one line that
names the spec field.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autotune.errors import SpecError, abbreviate, first_line, shorten


def import_object(target: str, *, field: str, base_dir: Path = Path(".")) -> Any:
    """The object "package.module:name" names; SpecError naming `field` when it cannot be had."""
    module_name, _, attribute = target.partition(":")
    put_first_on_path([Path(base_dir).resolve(), Path.cwd()])
    # a module written since the last import (a test, a notebook) is missed by cached listings
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        said = shorten(first_line(exc), 200)  # it may quote the name
        raise SpecError(f"{field}: cannot import {abbreviate(target)}: {said}") from exc
    if not hasattr(module, attribute):
        raise SpecError(
            f"{field}: cannot import {abbreviate(target)}: "
            f"module {abbreviate(module_name)} has no attribute {abbreviate(attribute)}"
        )
    return getattr(module, attribute)


def put_first_on_path(folders: Sequence[Path]) -> None:
    for folder in reversed(folders):
        entry = str(folder)
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def describe(exc: BaseException) -> str:
    """`Type: first line`, for errors raised by the user's own code."""
    return f"{type(exc).__name__}: {first_line(exc)}"

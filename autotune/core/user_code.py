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

from autotune.core.errors import (
    SpecError,
    UserCodeError,
    abbreviate,
    first_line,
    first_line_with_type,
    shorten,
)

# what the user's code may raise that autotune reports in one line and goes on from: any
# exception, and SystemExit (a factory that calls sys.exit() does not choose autotune's exit
# code). KeyboardInterrupt is left alone, so that Ctrl-C still interrupts.
USER_ERRORS = (Exception, SystemExit)


def import_object(target: str, *, field: str, base_dir: Path = Path(".")) -> Any:
    """The object "package.module:name" names; SpecError naming `field` when it cannot be had."""
    module_name, _, attribute = target.partition(":")
    put_first_on_path([Path(base_dir).resolve(), Path.cwd()])
    # a module written since the last import (a test, a notebook) is missed by cached listings
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except USER_ERRORS as exc:  # a module that is not there, or whose code raises
        said = shorten(message_of(exc), 200)  # it may quote the name
        raise UserCodeError(f"{field}: cannot import {abbreviate(target)}: {said}") from exc
    if not hasattr(module, attribute):
        raise SpecError(
            f"{field}: cannot import {abbreviate(target)}: "
            f"module {abbreviate(module_name)} has no attribute {abbreviate(attribute)}"
        )
    return getattr(module, attribute)


def raised_in(exc: BaseException, target: str) -> bool:
    """Whether `exc` came through the code of the module "package.module:name" names: an error
    of the user's own, not of the code that called it."""
    module = sys.modules.get(target.partition(":")[0])
    path = getattr(module, "__file__", None)
    frame = exc.__traceback__
    while frame is not None:
        if path is not None and frame.tb_frame.f_code.co_filename == path:
            return True
        frame = frame.tb_next
    return False


def put_first_on_path(folders: Sequence[Path]) -> None:
    for folder in reversed(folders):
        entry = str(folder)
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def message_of(exc: BaseException) -> str:
    """The first line of what the user's code raised; `SystemExit(code)` for an exit, whose
    message is only its code."""
    return raised_line(exc) if isinstance(exc, SystemExit) else first_line(exc)


def raised_line(exc: BaseException) -> str:
    """`Type: first line`, for errors raised by the user's own code; `SystemExit(code)`."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r})"
    return first_line_with_type(exc)

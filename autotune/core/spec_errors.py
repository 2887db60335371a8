"""A pydantic ValidationError of a spec as one line: `field.path: what is wrong (got value)`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from autotune.core.errors import abbreviate, shorten


def describe_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first error of a ValidationError of `model` as `field.path: what is wrong (got value)`;
    an unknown key's error lists the keys its section takes."""
    errors = exc.errors()
    first = errors[0]
    # a key of the user's own (an unknown one, or one in kwargs) may be any length
    where = ".".join(
        shorten(part, 40) if isinstance(part, str) else str(part) for part in first["loc"]
    )
    if first["type"] == "extra_forbidden":
        message = "unknown key" + _allowed_keys(model, first["loc"][:-1])
    else:
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] not in ("value_error", "missing") and "input" in first:
            message += f" (got {abbreviate(first['input'])})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    # a check across sections (Spec's own validators) names its fields itself
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def _allowed_keys(model: Any, loc: tuple[Any, ...]) -> str:
    """'; expected one of: ...' for the section of `model` at loc, or '' where it is not one."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    keys = [field.alias or name for name, field in model.model_fields.items() if not field.exclude]
    return f"; expected one of: {', '.join(keys)}"

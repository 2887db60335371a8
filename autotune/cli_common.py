"""What every `autotune` command shares: how it fails (one line, an exit code, no secret) and
where it prints. click alone is imported here; the rest inside the functions."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn

import click

from autotune.core.errors import SpecError, WriteError, one_line
from autotune.core.names import EXIT_BAD_INPUT, EXIT_WRITE, STORAGE_ENV, TRACKING_ENV
from autotune.core.redaction import redact

storage_option = click.option(
    "--storage",
    help=f"Optuna storage URL (overrides ${STORAGE_ENV} and study.storage): sqlite:///, "
    "postgresql://, journal:///path, redis://.",
)
tracking_option = click.option(
    "--tracking-uri",
    help=f"MLflow tracking URI (overrides ${TRACKING_ENV} and mlflow.tracking_uri), "
    "e.g. http://mlflow-host:5000.",
)


def url_overrides(storage: str | None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Each URL from its flag, else its environment variable, else what the spec says."""
    chosen = {
        "study.storage": storage or os.environ.get(STORAGE_ENV),
        "mlflow.tracking_uri": tracking_uri or os.environ.get(TRACKING_ENV),
    }
    return {key: url for key, url in chosen.items() if url}


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """SpecError -> one line on stderr, exit 2; no traceback for the user's mistakes. WriteError
    -> one line, exit 3: the disk, not the input."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SpecError, WriteError) as exc:
            fail(str(exc), EXIT_WRITE if isinstance(exc, WriteError) else EXIT_BAD_INPUT)

    return wrapper


def fail(message: str, code: int) -> NoReturn:
    """Exit with `code` after `error: <message>` on stderr: the one way the CLI says what went
    wrong, so every error line is one line, at most MAX_LINE characters, with no secret in it."""
    click.echo(f"error: {one_line(redact(message))}", err=True)
    sys.exit(code)


def make_console(*, stderr: bool = True) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)

"""Writing the run's files: whole or not at all, and a failure said in one line.

Every file a run writes into its output folder (input_stats.pt, weights/trial_<n>.pt,
recommended.yaml and .json, best_model.py, figures/, report.html) goes through `write_atomic`:
the bytes go to a temporary file in the same folder, reach the disk (fsync), and only then take
the file's name (os.replace, atomic on POSIX). A disk that fills or a folder that cannot be
written leaves the file as it was, or absent, never cut short, and no temporary file behind. The
failure is a WriteError that names the file and the reason (the CLI's exit code 3).

`write_failure` finds a failed write in what a library raised (the Optuna storage, MLflow): an
OSError of the disk (ENOSPC, EDQUOT, EROFS, EACCES, ...), sqlite's codes for a full or
read-only database, or PostgreSQL's SQLSTATEs for the same, anywhere in the exception's chain.
A refused connection is not one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sqlite3
from pathlib import Path
from typing import TextIO

from autotune.core.errors import WriteError, first_line

# an OSError with one of these numbers: the disk or the folder does not take the write
DISK_ERRNOS = frozenset(
    {
        errno.ENOSPC,  # no space left on device
        errno.EDQUOT,  # disk quota exceeded
        errno.EFBIG,  # file too large
        errno.EROFS,  # read-only file system
        errno.EACCES,  # permission denied
        errno.EPERM,  # operation not permitted (an immutable folder)
        errno.EIO,  # input/output error
        errno.ENOTDIR,  # a file where a folder must be
        errno.EISDIR,  # a folder where a file must be
        errno.EEXIST,  # a file where a folder must be created
    }
)
# sqlite's primary result codes for the same (sqlite3.Error.sqlite_errorcode, Python 3.11+):
# SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN
SQLITE_DISK_CODES = frozenset({3, 8, 10, 13, 14})
# PostgreSQL's SQLSTATEs for the same, as psycopg (sqlstate) and psycopg2 (pgcode) carry them:
# disk_full, io_error, read_only_sql_transaction (a server that takes no writes, a standby)
POSTGRES_DISK_STATES = frozenset({"53100", "58030", "25006"})


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path`, creating its folder: the whole file or, where the
    disk refuses, the old file untouched. Returns `path`; raises WriteError naming it."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(temporary, "xb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise WriteError(f"{path}: {_reason(exc)}") from exc
    return path


def check_writable(folder: Path) -> None:
    """Create `folder` and a file in it, so that a folder that takes no file fails here, in one
    line, before a trial runs. Raises WriteError naming the folder."""
    folder = Path(folder)
    probe = folder / f".autotune-write-check.{os.getpid()}.{secrets.token_hex(4)}"  # per worker
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.open("wb").close()
        probe.unlink()
    except OSError as exc:
        raise WriteError(f"{folder}: {_reason(exc)}") from exc


def open_to_append(path: Path) -> TextIO:
    """`path` opened to append text (a log), its folder created; WriteError naming it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a")
    except OSError as exc:
        raise WriteError(f"{path}: {_reason(exc)}") from exc


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` is, or was raised in handling or because of, an error of
    the disk: an OSError in DISK_ERRNOS, a sqlite error in SQLITE_DISK_CODES, or a PostgreSQL
    error in POSTGRES_DISK_STATES. None for any other error."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            return _reason(current)
        # the primary code of an extended one (SQLITE_IOERR_WRITE is SQLITE_IOERR | 3 << 8)
        code = (
            getattr(current, "sqlite_errorcode", None)
            if isinstance(current, sqlite3.Error)
            else None
        )
        if code is not None and code & 0xFF in SQLITE_DISK_CODES:
            return first_line(current)
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if state in POSTGRES_DISK_STATES:
            return first_line(current)
        pending += [current.__cause__, current.__context__]
    return None


def _reason(exc: OSError) -> str:
    return exc.strerror or first_line(exc)

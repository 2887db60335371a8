"""Writing the run's files: whole or not at all, and a failed write told apart by its cause."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from autotune.core import writes
from autotune.core.errors import WriteError


def _full_sqlite_error() -> sqlite3.OperationalError:
    """A real SQLITE_FULL: a database allowed two pages, filled."""
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA max_page_count = 2")
    db.execute("CREATE TABLE t (x)")
    try:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (?)", ("x" * 1000,))
    except sqlite3.OperationalError as exc:
        return exc
    raise AssertionError("the database did not fill")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_file_is_written_whole_and_replaces_the_old_one(tmp_path: Path):
    path = tmp_path / "new" / "recommended.yaml"
    # the folder is created, text is UTF-8, bytes are bytes
    assert writes.write_atomic(path, "Δ: 1\n") == path
    assert path.read_text(encoding="utf-8") == "Δ: 1\n"
    writes.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    # no temporary file is left beside it
    assert _leftovers(path.parent) == []


def test_a_disk_that_fills_leaves_the_old_file_and_no_temporary_one(tmp_path: Path, monkeypatch):
    path = tmp_path / "best_model.py"
    path.write_text("the old file\n")

    def full(fd: int) -> None:  # the bytes did not all reach the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as raised:
        writes.write_atomic(path, "a new file, cut short\n")
    # one line naming the file and the reason
    assert str(raised.value) == f"{path}: No space left on device"
    # the old file is whole, and nothing else is there
    assert path.read_text() == "the old file\n"
    assert _leftovers(tmp_path) == []


def test_a_folder_where_a_file_must_go_is_a_write_error(tmp_path: Path):
    (tmp_path / "input_stats.pt").mkdir()  # a real fault: os.replace onto a folder
    with pytest.raises(WriteError, match=r"input_stats\.pt: Is a directory"):
        writes.write_atomic(tmp_path / "input_stats.pt", b"stats")
    assert _leftovers(tmp_path) == []
    # a path through a regular file: ENOTDIR, for real
    (tmp_path / "a-file").write_text("")
    with pytest.raises(WriteError, match="Not a directory"):
        writes.check_writable(tmp_path / "a-file" / "out")


def test_a_log_that_cannot_be_opened_is_a_write_error(tmp_path: Path):
    (tmp_path / "workers").write_text("")  # a file where the workers' log folder must be
    with pytest.raises(WriteError, match=r"workers/worker-0\.log: "):
        writes.open_to_append(tmp_path / "workers" / "worker-0.log")
    # where it can be, the log is opened to append, its folder made
    with writes.open_to_append(tmp_path / "logs" / "worker-0.log") as log:
        log.write("started\n")
    assert (tmp_path / "logs" / "worker-0.log").read_text() == "started\n"


def test_a_folder_that_takes_no_file_fails_the_check(tmp_path: Path, read_only):
    out = tmp_path / "out"
    read_only.on(out)
    with pytest.raises(WriteError) as raised:
        writes.check_writable(out)
    # the line names the folder and the file system's reason; the folder stays empty
    assert str(raised.value) == f"{out}: Operation not permitted"
    assert list(out.iterdir()) == []


def test_a_failed_write_is_found_in_the_chain_a_library_raised():
    full = _full_sqlite_error()
    assert writes.write_failure(full) == "database or disk is full"
    # Optuna's storage raises its own error from sqlite's, and its trial loop then fails an
    # assertion while handling that one: sqlite's error, a cause under a context, is found
    handled = AssertionError("Should not reach.")
    handled.__context__ = RuntimeError("commit failed")
    handled.__context__.__cause__ = full
    assert writes.write_failure(handled) == "database or disk is full"
    # an OSError of the disk, and torch's RuntimeError raised in handling one
    assert writes.write_failure(OSError(errno.EROFS, "Read-only file system")) == (
        "Read-only file system"
    )
    wrapping = RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    wrapping.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert writes.write_failure(wrapping) == "No space left on device"


def test_errors_that_are_not_the_disk_are_not_write_failures():
    # a server that refuses the connection is an OSError too, but not the disk's
    assert writes.write_failure(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
    assert writes.write_failure(ValueError("bad value")) is None
    assert writes.write_failure(sqlite3.OperationalError("no such table: trials")) is None


def test_a_postgresql_server_that_takes_no_writes_is_a_write_failure():
    # a real server's refusal, as SQLAlchemy raises it (psycopg's error as its cause): a
    # read-only transaction stands in for a standby or a full disk (SQLSTATE 25006, 53100)
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            with pytest.raises(sqlalchemy.exc.InternalError) as caught:
                connection.exec_driver_sql("CREATE TEMPORARY TABLE autotune_probe (x int)")
    except sqlalchemy.exc.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    finally:
        engine.dispose()
    assert "read-only transaction" in writes.write_failure(caught.value)
    # a statement the server refuses for another reason is not the disk's
    with engine.connect() as connection, pytest.raises(sqlalchemy.exc.ProgrammingError) as other:
        connection.exec_driver_sql("SELECT * FROM autotune_no_such_table")
    engine.dispose()
    assert writes.write_failure(other.value) is None

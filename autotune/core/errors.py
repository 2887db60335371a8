"""The errors a user sees, each said in one line: bad input, the user's own code failing, and a
run that could not write."""

from __future__ import annotations

import reprlib

from autotune.core.redaction import redact


class SpecError(ValueError):
    """A spec, search space or data file the user gave is wrong.

    The message is one line that names the field or file, the rule and the value. The CLI prints
    it without a traceback and exits with code 2.
    """


class UserCodeError(SpecError):
    """The user's own code that a spec names (`model.import`, `data.datamodule`) raised, or gave
    what it must not. The message names the field and the code. Before any trial it is bad
    input, as any SpecError; during a trial it fails that trial; in the export it leaves the
    files it would have checked unverified."""


class WriteError(Exception):
    """A file of the run could not be written: a read-only or full disk, or a folder where a
    file must go. The message is one line, `<path>: <reason>`. The CLI prints it without a
    traceback and exits with code 3; the study stays as its storage holds it, so the same
    command, once the disk takes writes again, goes on from there.
    """


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, or its type's name when it has no message: how
    a one-line error quotes the error underneath it."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def first_line_with_type(exc: BaseException) -> str:
    """`Type: first line`, or the type's name alone when the message is empty: an error
    quoted where its type says as much as its message (a library's or the user's own)."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)}" if str(exc).strip() else name


# the longest error line the CLI prints: a longer one keeps its start (the field) and its end
# (the rule), and says how much of the middle (a long bad value, as a rule) it left out
MAX_LINE = 300


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` as one line of at most about `limit` characters: line breaks and runs of white
    space become one space; a longer line loses its middle, said in place of it."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    head, tail = line[: limit * 2 // 3], line[len(line) - limit // 4 :]
    return f"{head} ... [{len(line) - len(head) - len(tail)} characters left out] ... {tail}"


# the longest value or name an error message echoes, and the longest path (a path of the usual
# depth fits); the rest is cut with "…"
ECHO_LIMIT = 80
PATH_LIMIT = 240


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` on one line (line breaks escaped, as in a repr), redacted, cut to `limit`
    characters, the last one "…" where it was longer: a name or a file's path echoed in an
    error. Redacted before it is cut: a URL cut inside its password would no longer be seen as
    one."""
    text = redact(text.translate(_LINE_BREAKS))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def abbreviate(value: object, limit: int = ECHO_LIMIT) -> str:
    """A value's repr for an error message, at most `limit` characters: a 1 MB string or a
    list of a million items is echoed by its start, and never rendered whole."""
    try:
        text = _ECHO_REPR.repr(value)
    except ValueError:  # an int of more digits than Python converts to text (4300)
        text = f"an integer of {value.bit_length():,} bits"  # type: ignore[attr-defined]
    return shorten(text, limit)


def quote_path(path: object) -> str:
    """A path for an error message: its repr, at most PATH_LIMIT characters."""
    return abbreviate(str(path), PATH_LIMIT)


# every character str.splitlines() breaks at
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
# reprlib elides the middle of a longer value: at 4 times the limit, the start stays intact
_ECHO_REPR = reprlib.Repr()
_ECHO_REPR.maxstring = _ECHO_REPR.maxother = _ECHO_REPR.maxlong = 4 * ECHO_LIMIT
_ECHO_REPR.maxlevel = 3

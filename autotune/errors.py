"""The errors a user sees, each said in one line: bad input, and a run that could not write."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec, search space or data file the user gave is wrong.

    The message is one line that names the field or file, the rule and the value. The CLI prints
    it without a traceback and exits with code 2.
    """


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

"""The errors a user sees, each said in one line: bad input, the user's own code failing, and a
run that could not write."""

from __future__ import annotations


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

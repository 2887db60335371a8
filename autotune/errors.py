"""The one error type a user sees: bad input, said in one line."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec, search space or data file the user gave is wrong.

    The message is one line that names the field or file, the rule and the value. The CLI prints
    it without a traceback and exits with code 2.
    """


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, or its type's name when it has no message: how
    a one-line error quotes the error underneath it."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

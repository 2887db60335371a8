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

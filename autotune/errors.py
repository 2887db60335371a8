"""The one error type a user sees: bad input, said in one line."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec, search space or data file the user gave is wrong.

    The message is one line that names the field or file, the rule and the value. The CLI prints
    it without a traceback and exits with code 2.
    """

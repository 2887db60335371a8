"""autotune.core.errors: the one-line form of an error."""

from __future__ import annotations

import pytest

from autotune.core.errors import (
    MAX_LINE,
    abbreviate,
    first_line,
    first_line_with_type,
    one_line,
    shorten,
)


def test_a_short_line_is_left_as_it_is() -> None:
    assert one_line("train.lr: must be finite (got inf)") == "train.lr: must be finite (got inf)"


def test_line_breaks_become_spaces() -> None:
    # a message of several lines (a library's, or a path with a newline) is one line
    assert one_line("spec.yaml: bad\n  value\r\nhere") == "spec.yaml: bad value here"


def test_a_long_line_keeps_its_start_and_end_and_says_what_it_left_out() -> None:
    text = "data.kwargs: unknown key (got '" + "x" * 1_000_000 + "'); expected a mapping"
    line = one_line(text)
    # about MAX_LINE characters, not a megabyte
    assert len(line) < MAX_LINE + 60
    # the field and the rule stay readable, and the cut is said
    assert line.startswith("data.kwargs: unknown key (got 'xxx")
    assert line.endswith("xxx'); expected a mapping")
    left_out = len(text) - MAX_LINE * 2 // 3 - MAX_LINE // 4
    assert f"... [{left_out} characters left out] ..." in line


@pytest.mark.parametrize("cut", [20, 30, 40])
def test_a_secret_is_redacted_before_its_value_is_cut(cut: int) -> None:
    # an echoed URL cut inside its password would no longer look like a URL with a password
    url = "postgresql://user:" + "s3cr3t" * 10 + "@db/x"
    for shown in (shorten(url, cut), abbreviate(url, cut), abbreviate({"storage": url}, cut)):
        assert "s3cr3t" not in shown


@pytest.mark.parametrize(
    ("exc", "line", "typed"),
    [
        (ValueError("bad\nmore"), "bad", "ValueError: bad"),
        (ValueError("  \n bad "), "bad", "ValueError: bad"),
        (ValueError(""), "ValueError", "ValueError"),
        (ValueError(" \n "), "ValueError", "ValueError"),
        (OSError(), "OSError", "OSError"),
    ],
)
def test_an_error_is_quoted_by_its_first_line(exc: Exception, line: str, typed: str) -> None:
    # an empty message is the type's name, never `Type: ` or `Type: Type`
    assert first_line(exc) == line
    assert first_line_with_type(exc) == typed

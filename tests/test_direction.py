"""autotune.core.direction: one "is this better" for every comparison of trial values."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest

from autotune.core.direction import best_first, best_of, better, maximizes


def test_a_study_maximizes_by_its_direction() -> None:
    assert maximizes(optuna.create_study(direction="maximize"))
    assert not maximizes(optuna.create_study(direction="minimize"))
    assert maximizes(SimpleNamespace(direction=SimpleNamespace(name="MAXIMIZE")))  # no optuna


@pytest.mark.parametrize(
    ("a", "b", "maximize", "strict", "tie"),
    [
        (2, 1, True, True, True),
        (1, 2, True, False, False),
        (1, 1, True, False, True),
        (1, 2, False, True, True),
        (2, 1, False, False, False),
        (1, 1, False, False, True),
    ],
)
def test_better_follows_the_direction(a, b, maximize, strict, tie) -> None:
    assert better(a, b, maximize) is strict
    assert better(a, b, maximize, or_equal=True) is tie


def test_best_first_and_best_of_keep_the_first_of_a_tie() -> None:
    rows = [("a", 1.0), ("b", 3.0), ("c", 3.0), ("d", 0.5)]
    value = lambda r: r[1]  # noqa: E731
    assert [r[0] for r in best_first(rows, True, value)] == ["b", "c", "a", "d"]
    assert [r[0] for r in best_first(rows, False, value)] == ["d", "a", "b", "c"]
    assert best_of(rows, True, value)[0] == "b"
    assert best_of(rows, False, value)[0] == "d"
    with pytest.raises(ValueError):
        best_of([], True, value)

"""Which of two values is better, given the study's direction: said once.

A study maximises (accuracy) or minimises (a loss); every comparison of trial values, every
ranking and every pick of the best goes through these functions. Duck-typed on the study
(`study.direction.name`), so core code may call them without importing Optuna.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import optuna  # core imports no Optuna at run time

T = TypeVar("T")


def maximizes(study: optuna.Study) -> bool:
    """Whether an Optuna study maximises its value (its `direction` is MAXIMIZE)."""
    return study.direction.name == "MAXIMIZE"


def better(a: float, b: float, maximize: bool, *, or_equal: bool = False) -> bool:
    """Whether `a` is better than `b`: larger when maximising, smaller when minimising;
    `or_equal`: a tie counts as better."""
    if or_equal:
        return a >= b if maximize else a <= b
    return a > b if maximize else a < b


def best_first(items: Iterable[T], maximize: bool, key: Callable[[T], Any]) -> list[T]:
    """`items` sorted best first by `key` (stable: ties keep their order)."""
    return sorted(items, key=(lambda x: -key(x)) if maximize else key)


def best_of(items: Iterable[T], maximize: bool, key: Callable[[T], Any]) -> T:
    """The best of `items` by `key`, the first one of a tie; ValueError when there is none."""
    return (max if maximize else min)(items, key=key)

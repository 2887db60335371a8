"""The pruner's public path: `from autotune.pruners import VarianceShiftPruner` in plain Optuna
code, with Optuna installed and nothing else of autotune's heavier dependencies. The pruner lives
in autotune/search/pruners.py."""

from __future__ import annotations

from autotune.search.pruners import (
    DELTA_KEY,
    MIN_LEARNED_DISTANCE,
    VarianceShiftPruner,
    shift_distance,
)

__all__ = ["DELTA_KEY", "MIN_LEARNED_DISTANCE", "VarianceShiftPruner", "shift_distance"]

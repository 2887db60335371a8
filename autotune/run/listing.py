"""`autotune trials`: every trial of a study, from the Optuna storage alone (no MLflow), as a
table that reads at 80 columns or as JSON: how it ended and why, its value, the epochs it
trained, its configuration and its variance shift."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from rich import box
from rich.markup import escape  # a stored reason shown as it is
from rich.table import Table

from autotune.core.direction import maximizes
from autotune.core.names import (
    CONFIG_ATTR,
    DELTA_KEY,
    MEASURED_SHIFT_ATTR,
    RECALIBRATE_ATTR,
    WORKER_ATTR,
)
from autotune.core.space import block_line
from autotune.run.summary import STYLES
from autotune.search.endings import ENDINGS, ending, epochs_run, why


def listed(
    study: optuna.Study, *, sort: str = "number", endings: tuple[str, ...] = ()
) -> list[FrozenTrial]:
    """The study's trials, those that ended one of `endings` (all: none given), in `sort`'s
    order: by number; by value, best first and those without one last; by ending, in ENDINGS'
    order; by epochs trained, most first."""
    trials = [t for t in study.get_trials(deepcopy=False) if not endings or ending(t) in endings]
    if sort == "value":
        sign = -1 if maximizes(study) else 1
        return sorted(trials, key=lambda t: (not _has_value(t), sign * (t.value or 0), t.number))
    if sort == "ending":
        return sorted(trials, key=lambda t: (ENDINGS.index(ending(t)), t.number))
    if sort == "epochs":
        return sorted(trials, key=lambda t: (-epochs_run(t), t.number))
    return sorted(trials, key=lambda t: t.number)


def trials_table(study: optuna.Study, trials: list[FrozenTrial], metric: str) -> Table:
    """A row per trial: number, ending, value, epochs, then its blocks a line each and, under
    them, why it stopped."""
    table = Table(
        title=f"study {study.study_name!r}: {len(trials)} of {len(study.trials)} trials",
        caption="blocks: a line each, regulariser, placement, drop rate, BN momentum m",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for name in ("trial", "ended", metric, "epochs", "blocks, and why it stopped"):
        justify = "left" if name in ("ended", "blocks, and why it stopped") else "right"
        table.add_column(name, justify=justify, overflow="fold")
    for trial in trials:
        kind = ending(trial)
        blocks = [block_line(i, b) for i, b in enumerate(trial.user_attrs.get(CONFIG_ATTR, []))]
        reason = why(trial)
        cell = "\n".join([*blocks, *([f"[dim]{escape(reason)}[/]"] if reason else [])]) or "-"
        table.add_row(
            str(trial.number),
            f"[{STYLES[kind]}]{kind}[/]" if kind in STYLES else kind,
            f"{trial.value:.4f}" if _has_value(trial) else "-",
            str(epochs_run(trial)),
            cell,
        )
    return table


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    """A trial as `autotune trials --json` gives it."""
    attrs = trial.user_attrs
    measured = attrs.get(MEASURED_SHIFT_ATTR) or {}
    start, end = trial.datetime_start, trial.datetime_complete
    return {
        "number": trial.number,
        "ended": ending(trial),
        "state": trial.state.name,
        "value": trial.value if _has_value(trial) else None,
        "epochs": epochs_run(trial),
        "why": why(trial),
        "blocks": attrs.get(CONFIG_ATTR, []),
        "recalibrate_bn": attrs.get(RECALIBRATE_ATTR, False),
        "params": trial.params,
        "predicted_delta": attrs.get(DELTA_KEY),
        "measured_delta": (measured.get("summary") or {}).get("worst_delta"),
        "seconds": None if start is None or end is None else (end - start).total_seconds(),
        "worker": attrs.get(WORKER_ATTR),
    }


def _has_value(trial: FrozenTrial) -> bool:
    return trial.value is not None and math.isfinite(trial.value)

"""What every benchmark prints beside its numbers: the machine, and mean ± spread over seeds."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    """One line: cores, GPU, torch, Python and today's date."""
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return (
        f"Machine: {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}, "
        f"Python {platform.python_version()}. Date: {time.strftime('%Y-%m-%d')}."
    )


def spread(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    """mean ± standard deviation of scale · values (0 for a single value)."""
    scaled = [scale * v for v in values]
    sd = statistics.stdev(scaled) if len(scaled) > 1 else 0.0
    return f"{statistics.mean(scaled):.{digits}f} ± {sd:.{digits}f}"


def timed_against_older(
    results: Path,
    limit: float,
    run: Callable[[], list[dict]],
    table: Callable[[list[dict], float], str],
    *,
    report: bool = False,
) -> None:
    """A benchmark timed beside an older checkout, stopped past `limit` seconds: with `report`,
    the table of the rows saved at `results`; else the rows measured, saved there with the
    machine and the limit, and printed."""
    if report:
        saved = json.loads(results.read_text())
        print(table(saved["rows"], saved["limit"]))
        return
    rows = run()
    results.parent.mkdir(exist_ok=True)
    saved = {"machine": machine(), "limit": limit, "rows": rows}
    results.write_text(json.dumps(saved, indent=1) + "\n")
    print(machine())
    print(table(rows, limit))

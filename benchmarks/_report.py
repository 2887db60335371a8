"""What every benchmark prints beside its numbers: the machine, and mean ± spread over seeds."""

from __future__ import annotations

import os
import platform
import statistics
import time

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

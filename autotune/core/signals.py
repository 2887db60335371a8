"""Ctrl-C and SIGTERM during a study: the first one stops the running trial at its next batch.

Stdlib only: the launcher of `--workers` and the trial loop both hold it, and neither needs
Lightning for it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class TrialInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived during a trial; raised at the next batch boundary."""


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C or SIGTERM into an event the running trial checks between batches.

    A second Ctrl-C interrupts at once; a second SIGTERM changes nothing (a scheduler such as
    SLURM signals every process of a job, so a worker hears its launcher's SIGTERM and its own).
    Outside the main thread signals cannot be caught, and the event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

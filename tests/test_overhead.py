"""benchmarks/overhead.py: its hand loop trains what a trial trains, and its figures add up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402

TINY = {
    "data": {"name": "digits", "batch_size": 128},
    "model": {"template": "mlp", "widths": [32, 16]},
    "train": {"max_epochs": 2},
}


@pytest.mark.slow
def test_the_hand_loop_trains_what_a_real_trial_trains(tmp_path: Path) -> None:
    result = overhead.run_task("digits mlp", TINY, pairs=1, folder=tmp_path)
    rows = result["rows"]

    # a pair per order: trial first, then hand loop first
    assert [row["first"] for row in rows] == ["trial", "hand"]
    for row in rows:
        # the same weights, batches and masks: the same losses and accuracy, to the last digit
        assert row["same_metrics"], (row["metrics_trial"], row["metrics_hand"])
        # each part of the trial took time, and the parts add up to the trial
        parts = row["parts_s"]
        for part in ("sampling", "prediction", "training (Lightning)", "MLflow"):
            assert parts[part] > 0, part
        assert sum(parts.values()) == pytest.approx(row["trial_s"])
    # the wrapped calls are unwrapped again
    assert overhead.fitting.fit.__module__ == "autotune.nn.fitting"
    assert not hasattr(overhead.fitting.fit, "__wrapped__")


@pytest.mark.slow
def test_memory_is_read_after_every_trial(tmp_path: Path) -> None:
    memory = overhead.run_memory(3, 1, tmp_path, TINY)

    # one resident-memory figure a trial, in MiB
    assert memory["trials"] == 3
    assert len(memory["rss_mib"]) == 3
    assert all(10 < rss < 100_000 for rss in memory["rss_mib"])
    assert "after trial 3" in overhead.memory_lines(memory)

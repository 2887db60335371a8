"""Trials per minute with 1 and 2 local workers, measured side by side.

The same study, the quickstart's mlp on the digits with every trial trained to the end (pruner
none, so every trial does the same work), runs as `autotune run spec.yaml --workers N` for N = 1
and N = 2, alternating, `--repeats` times. Each run is a fresh study on the embedded defaults
(sqlite for Optuna and MLflow), as on a laptop. One worker is the plain in-process run; with two,
a launcher starts two worker processes that split the cores.

Two rates per run:
    end to end   finished trials per minute of the whole command, start-up included
    steady       trials per minute between the first trial's start and the last trial's end,
                 from the Optuna storage's timestamps
and where the rest of the wall time goes: from the command's start to the first trial's, and
from the last trial's end to the command's.

Run from the repository root:

    .venv/bin/python benchmarks/scaling.py             # the numbers in docs/benchmarks.md
    .venv/bin/python benchmarks/scaling.py --quick     # a smoke run of about a minute

It prints a markdown table and writes the raw rows to benchmarks/results/scaling.json
(--quick: scaling_quick.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import optuna
import yaml
from _report import machine, spread

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def spec(name: str, output: Path, n_trials: int, epochs: int) -> dict:
    return {
        "study": {"name": name, "n_trials": n_trials, "pruner": "none"},
        "data": {"name": "digits", "batch_size": 64, "test_fraction": 0},
        "model": {"template": "mlp", "widths": [256, 256, 128]},
        "train": {"max_epochs": epochs},
        "output": str(output),
    }


def one_run(workers: int, n_trials: int, epochs: int, folder: Path) -> dict:
    name = f"scaling-{workers}"
    output = folder / name
    spec_file = folder / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(spec(name, output, n_trials, epochs)))
    command = [sys.executable, "-m", "autotune.cli", "run", str(spec_file)]
    start, began = time.perf_counter(), datetime.now()
    done = subprocess.run(
        [*command, "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT
    )
    wall, ended = time.perf_counter() - start, datetime.now()
    if done.returncode != 0:
        raise SystemExit(f"{workers} workers failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{output / 'autotune.db'}")
    trials = [t for t in study.trials if t.state.is_finished()]
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    steady = (last - first).total_seconds()
    return {
        "workers": workers,
        "trials": len(trials),
        "wall_s": wall,
        "steady_s": steady,
        "start_up_s": (first - began).total_seconds(),
        "wind_down_s": (ended - last).total_seconds(),
        "end_to_end_per_min": 60 * len(trials) / wall,
        "steady_per_min": 60 * len(trials) / steady,
        "processes": len({t.user_attrs["worker"] for t in trials}),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| workers | end to end, trials/min | steady, trials/min | wall time, s "
        "| to the first trial, s | after the last trial, s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in (1, 2):
        mine = [r for r in rows if r["workers"] == n]
        lines.append(
            f"| {n} | {spread([r['end_to_end_per_min'] for r in mine])} "
            f"| {spread([r['steady_per_min'] for r in mine])} "
            f"| {spread([r['wall_s'] for r in mine], 0)} "
            f"| {spread([r['start_up_s'] for r in mine])} "
            f"| {spread([r['wind_down_s'] for r in mine])} |"
        )
    ratios = {
        key: [
            two[key] / one[key]
            for one, two in zip(
                [r for r in rows if r["workers"] == 1],
                [r for r in rows if r["workers"] == 2],
                strict=True,
            )
        ]
        for key in ("end_to_end_per_min", "steady_per_min")
    }
    lines.append(
        f"| 2 ÷ 1, pair by pair | {spread(ratios['end_to_end_per_min'], 2)} "
        f"| {spread(ratios['steady_per_min'], 2)} | | | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 6 short trials")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    repeats, n_trials, epochs = (
        (1, 6, 2) if args.quick else (args.repeats, args.trials, args.epochs)
    )

    rows = []
    for repeat in range(repeats):
        for workers in (1, 2) if repeat % 2 == 0 else (2, 1):  # neither always goes first
            with tempfile.TemporaryDirectory() as folder:
                row = one_run(workers, n_trials, epochs, Path(folder))
            row["repeat"] = repeat
            rows.append(row)
            print(
                f"repeat {repeat}, {workers} workers: {row['trials']} trials in "
                f"{row['wall_s']:.1f} s ({row['steady_per_min']:.1f}/min steady)",
                file=sys.stderr,
            )
    rows.sort(key=lambda r: (r["repeat"], r["workers"]))
    print(machine())
    print(f"{n_trials} trials of {epochs} epochs per run, {repeats} runs per worker count.\n")
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("scaling_quick.json" if args.quick else "scaling.json")
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"\nraw rows: {out.relative_to(ROOT)}", file=sys.stderr)
    assert all(r["processes"] == r["workers"] for r in rows), "a worker ran no trial"


if __name__ == "__main__":
    main()

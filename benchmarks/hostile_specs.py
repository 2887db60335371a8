"""How fast `autotune validate` refuses a hostile spec, against an older checkout side by side.

Each case is a spec file written to a temporary folder:

    20 MB spec          a valid spec padded with a 20 MB comment-free list under data.kwargs
    billion laughs      nine levels of aliases, each ten of the one before, under data.kwargs
    deep nesting        '[' * 5000: a list 5000 levels deep
    duplicate keys      `study:` twice, the second one hostile to a last-wins reader

and each is timed as `python -m autotune.cli validate <spec>` in a fresh process (the start-up
of Python and of autotune included, as a user sees it), in turns for this checkout and, with
--old, an older one (`git worktree add --detach /tmp/old <commit>`). A run that passes --limit
seconds is stopped and reported as "> limit". The exit code and the first line of stderr are kept:
the new code must refuse each case with exit 2 and one `error:` line.

    .venv/bin/python benchmarks/hostile_specs.py --old /tmp/old   # the table in docs/benchmarks.md

Writes the rows to benchmarks/results/hostile_specs.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import timed_against_older

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hostile_specs.json"
TINY = "study: {name: hostile, n_trials: 1}\ndata:\n  name: digits\n"


def cases() -> dict[str, str]:
    """Each hostile spec's text, by name."""
    laughs = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        laughs.append(f"  a{i}: &a{i} [{refs}]")
    padding = ", ".join(["1234567"] * 2_500_000)  # 8 bytes an item: about 20 MB
    return {
        "20 MB spec": f"{TINY}  kwargs:\n    padding: [{padding}]\n",
        "billion laughs": f"{TINY}  kwargs:\n" + "\n".join("  " + line for line in laughs) + "\n",
        "deep nesting": "[" * 5000,
        "duplicate keys": "study: {name: first}\nstudy: {name: second, n_trials: 1}\n",
    }


def validate(checkout: Path, spec: Path, limit: float) -> dict:
    """One `autotune validate` of `spec` with the package of `checkout`: seconds, exit code and
    the first line of stderr (the error line), or a timeout."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-m", "autotune.cli", "validate", str(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=limit, cwd=spec.parent
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "code": None, "said": f"stopped after {limit:g} s"}
    seconds = time.perf_counter() - start
    # the temporary folder is noise in the table
    lines = done.stderr.replace(f"{spec.parent}/", "").strip().splitlines()
    return {
        "seconds": seconds,
        "code": done.returncode,
        "said": (lines[-1] if "Traceback" in done.stderr else lines[0]) if lines else "",
        "lines": len(lines),
    }


def run(old: Path | None, repeats: int, limit: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, text in cases().items():
            spec = Path(folder) / f"{name.replace(' ', '_')}.yaml"
            spec.write_text(text)
            new_runs, old_runs = [], []
            for _ in range(repeats):  # in turns, so both see the same machine
                new_runs.append(validate(ROOT, spec, limit))
                if old is not None:
                    old_runs.append(validate(old, spec, limit))
            rows.append({"case": name, "bytes": len(text), "new": new_runs, "old": old_runs})
    return rows


def cell(runs: list[dict], limit: float) -> str:
    if not runs:
        return "-"
    times = [r["seconds"] for r in runs]
    if any(t is None for t in times):
        return f"> {limit:g}"
    return f"{statistics.median(times):.2f}"


def outcome(runs: list[dict]) -> str:
    if not runs:
        return "-"
    last = runs[-1]
    if last["code"] is None:
        return last["said"]
    if last["code"] == 0:
        return "accepted (exit 0)"
    said = last["said"][:70] + ("…" if len(last["said"]) > 70 else "")
    return f"exit {last['code']}, {last['lines']} line(s): `{said}`"


def table(rows: list[dict], limit: float) -> str:
    lines = [
        "| case | size | this version, s | its answer | older version, s | its answer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        size = f"{row['bytes'] / 1e6:.1f} MB" if row["bytes"] > 1e5 else f"{row['bytes']} B"
        lines.append(
            f"| {row['case']} | {size} | {cell(row['new'], limit)} | {outcome(row['new'])} "
            f"| {cell(row['old'], limit)} | {outcome(row['old'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="an older checkout to time beside this one")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each case and version")
    parser.add_argument("--limit", type=float, default=20.0, help="seconds before a run is stopped")
    parser.add_argument("--report", action="store_true", help="print the table of the last run")
    args = parser.parse_args()
    timed_against_older(
        RESULTS,
        args.limit,
        lambda: run(args.old, args.repeats, args.limit),
        table,
        report=args.report,
    )


if __name__ == "__main__":
    main()

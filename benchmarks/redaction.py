"""How long the redaction takes on hostile text, against an older checkout side by side.

Every MLflow param, error line and note goes through `autotune.core.redaction.redact`. A spec may
hold a long value (a string under `data.kwargs` is logged as a param of the parent run), so the
redaction must take time linear in the text. Each case is a text of a repeated piece, at three
sizes, each doubling the one before:

    url starts      'a://b:' again and again: a URL's start with no @ to end a password
    dotted words    'x.y.' again and again, then '://'
    dict items      "'password': '" again and again
    parameters      'p=' again and again

Each is timed in a fresh process per checkout (`redact(text)` alone, after the import), in turns
for this checkout and, with --old, an older one (`git worktree add --detach /tmp/old <commit>`).
A run that passes --limit seconds is stopped and reported as "> limit". Linear time shows as a
ratio of about 2 between a size and the one before; quadratic as about 4.

    .venv/bin/python benchmarks/redaction.py --old /tmp/old   # the table in docs/benchmarks.md

Writes the rows to benchmarks/results/redaction.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _report import timed_against_older

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "redaction.json"
PIECES = {
    "url starts": ("a://b:", ""),
    "dotted words": ("x.y.", "://"),
    "dict items": ("'password': '", ""),
    "parameters": ("p=", ""),
}
SIZES = (60_000, 120_000, 240_000)  # characters
TIMED = """
import sys, time
from autotune.core.redaction import redact
piece, end, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = piece * (size // len(piece)) + end
start = time.perf_counter()
redact(text)
print(time.perf_counter() - start)
"""


def timed(checkout: Path, piece: str, end: str, size: int, limit: float) -> float | None:
    """Seconds one redact() of the text took with the package of `checkout`; None past limit."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-c", TIMED, piece, end, str(size)]
    try:
        done = subprocess.run(
            # in the checkout's folder: `python -c` puts the working directory first on sys.path
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=limit,
            check=True,
            cwd=checkout,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout.strip())


def run(old: Path | None, limit: float) -> list[dict]:
    rows = []
    for name, (piece, end) in PIECES.items():
        for size in SIZES:
            row = {"case": name, "size": size, "new": timed(ROOT, piece, end, size, limit)}
            if old is not None:
                row["old"] = timed(old, piece, end, size, limit)
            rows.append(row)
    return rows


def cell(seconds: float | None, limit: float) -> str:
    return f"> {limit:g}" if seconds is None else f"{seconds:.3f}"


def table(rows: list[dict], limit: float) -> str:
    lines = [
        "| case | characters | this version, s | older version, s |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        old = cell(row["old"], limit) if "old" in row else "-"
        lines.append(f"| {row['case']} | {row['size']:,} | {cell(row['new'], limit)} | {old} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="an older checkout to time beside this one")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds before a run is stopped")
    parser.add_argument("--report", action="store_true", help="print the table of the last run")
    args = parser.parse_args()
    timed_against_older(
        RESULTS, args.limit, lambda: run(args.old, args.limit), table, report=args.report
    )


if __name__ == "__main__":
    main()

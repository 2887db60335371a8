"""What a newcomer waits for: the quickstart (`make demo`'s study) and the five-minute tour's
study, each timed end to end as `autotune run` from the README, the installation not counted.

The tour's spec is read from README.md itself (the yaml block that starts `# digits-cnn.yaml`),
so the figure is the README's example as it stands. Each study runs in a fresh folder of its own,
one after the other, with nothing else of autotune running.

    .venv/bin/python benchmarks/newcomer.py            # both, results/newcomer.json
    .venv/bin/python benchmarks/newcomer.py --only tour
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "newcomer.json"
AUTOTUNE = [sys.executable, "-m", "autotune.cli"]


def tour_spec() -> str:
    """The tour's spec, as README.md gives it."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```yaml\n(# digits-cnn\.yaml\n.*?)```", readme, re.S)
    if found is None:
        raise SystemExit("README.md has no ```yaml block starting with # digits-cnn.yaml")
    return found.group(1)


def timed_study(name: str, spec_text: str, folder: Path) -> dict:
    """`autotune run` of the spec in a folder of its own: wall time, how the trials ended."""
    folder.mkdir(parents=True)
    spec = folder / "spec.yaml"
    spec.write_text(spec_text)
    env = {**os.environ, "COLUMNS": "80"}
    start = time.perf_counter()
    run = subprocess.run(
        [*AUTOTUNE, "run", str(spec)], cwd=folder, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{name}: autotune run exited {run.returncode}:\n{run.stderr[-2000:]}")
    listed = subprocess.run(
        [*AUTOTUNE, "trials", str(spec), "--json"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    trials = json.loads(listed.stdout)
    epochs = sum(t["epochs"] for t in trials)
    return {
        "name": name,
        "seconds": round(seconds, 1),
        "trials": dict(Counter(t["ended"] for t in trials)),
        "epochs_trained": epochs,
        "last_line": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["quickstart", "tour"])
    args = parser.parse_args()
    studies = {
        "quickstart": (ROOT / "examples" / "quickstart.yaml").read_text(),
        "tour": tour_spec(),
    }
    if args.only:
        studies = {args.only: studies[args.only]}
    work = Path(tempfile.mkdtemp(prefix="newcomer-"))
    try:
        rows = [timed_study(name, text, work / name) for name, text in studies.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    measured = {row["name"]: row for row in rows}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.python_version()}",
        "studies": {**previous.get("studies", {}), **measured},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| study | wall time | trials | epochs trained |")
    print("| --- | --- | --- | --- |")
    for row in result["studies"].values():
        ended = ", ".join(f"{n} {kind}" for kind, n in row["trials"].items())
        print(f"| {row['name']} | {row['seconds']:.0f} s | {ended} | {row['epochs_trained']} |")


if __name__ == "__main__":
    main()

"""The MLflow UI as a user meets it, in a real browser: a 12-trial quickstart study logged to a
fresh `mlflow server`, then headless chromium's screenshots of the page autotune prints at the
end of the run (the trials, flat, best first) and of MLflow's comparison of all of them, the two
clicks away from it (select all, Compare). They are the pictures in docs/outputs.md.

    .venv/bin/python benchmarks/mlflow_ui.py          # writes docs/mlflow-trials.png, ...

Needs chromium (`make browser` installs Debian's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("mlflow server did not start")


def screenshot(url: str, path: Path, height: int = 900) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size=1440,{height}",
                "--virtual-time-budget=20000",
                f"--screenshot={path}",
                url,
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    if CHROMIUM is None:
        raise SystemExit("needs chromium: `make browser` installs Debian's")
    work = Path(tempfile.mkdtemp(prefix="mlflow-ui-"))
    port = free_port()
    server = start_server(work, port)
    try:
        spec = (ROOT / "examples" / "quickstart.yaml").read_text()
        spec = spec.replace("n_trials: 30", "n_trials: 12")
        (work / "spec.yaml").write_text(spec)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "COLUMNS": "400"}
        run = subprocess.run(
            [sys.executable, "-m", "autotune.cli", "run", "spec.yaml"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise SystemExit(run.stderr[-2000:])
        [link] = re.findall(r"compare trials: (\S+)", run.stderr)
        screenshot(link, DOCS / "mlflow-trials.png")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("quickstart").experiment_id
        trials = client.search_runs(
            [experiment], filter_string="tags.`autotune.role` = 'trial'", max_results=1000
        )
        ids = quote(json.dumps([r.info.run_id for r in trials]))
        compare = (
            f"http://127.0.0.1:{port}/#/compare-runs?runs={ids}"
            f"&experiments={quote(json.dumps([experiment]))}"
        )
        screenshot(compare, DOCS / "mlflow-compare.png", height=1100)
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Shared fixtures: small specs that train in about a second."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

# one thread per test process: two busy-waiting OpenMP pools on two cores crawl
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a spec dict to tmp_path/spec.yaml with outputs under tmp_path; return its path."""

    def write(spec: dict, name: str = "spec.yaml") -> Path:
        spec = {"output": str(tmp_path / "out"), **spec}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def tiny_spec(**sections) -> dict:
    """A spec that trains a 2-block mlp on digits for 2 epochs: about a second a trial. No test
    split: the measured figures the tests compare with were taken on digits' 80/20 split, before
    test splits (tests/test_held_out.py holds one out)."""
    spec = {
        "study": {"name": "tiny", "n_trials": 3, "pruner": "none"},
        "data": {"name": "digits", "batch_size": 128, "test_fraction": 0},
        "model": {"template": "mlp", "widths": [32, 16]},
        "train": {"max_epochs": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


class ReadOnly:
    """Makes folders take no new file, for real: `chattr +i` (immutable), which stops root too,
    where chmod does not (the tests run as root). Every folder is made writable again at the
    end of the test; a test skips where the file system has no immutable flag."""

    def __init__(self) -> None:
        self.folders: list[Path] = []

    def on(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"no immutable folders here (chattr +i): {exc}")
        self.folders.append(folder)

    def off(self) -> None:
        while self.folders:
            subprocess.run(["chattr", "-i", str(self.folders.pop())], check=True)


@pytest.fixture
def read_only():
    folders = ReadOnly()
    yield folders
    folders.off()


STORED = Path(__file__).parent / "data" / "stored-0.1.0"


@pytest.fixture
def stored(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the study an earlier version stored (tests/data/stored-0.1.0), the working
    directory in it (its spec's output is `out`); returns its spec."""
    import shutil

    copy = tmp_path / "stored"
    shutil.copytree(STORED, copy)
    monkeypatch.chdir(copy)
    return copy / "spec.yaml"


# --- a tracking server of the test's own -------------------------------------------------------

SERVER_START_SECONDS = 90


class MlflowServer:
    """`mlflow server` on a free loopback port, its store in a folder; killed and started again
    on the same port and store, as a tracking server that went away and came back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.folder / "artifacts")]
        # no background job runners: seven more processes that a test has no use for
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.folder / "server.log").open("a") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.uri}/health", timeout=2),
            ):
                return
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path):
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    server = MlflowServer(folder)
    server.start()
    yield server
    server.kill()

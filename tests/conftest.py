"""Shared fixtures: small specs that train in about a second."""

from __future__ import annotations

import os
import subprocess
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

"""The small end: a 12-trial digits study through `autotune run`, end to end, against a plain
Optuna study of the same budget written as a user would (TPE, the median pruner, a plain PyTorch
loop, a MLflow run per trial nested under a parent), side by side, in alternating order; and
autotune's tail: from its last trial's end to the process's exit.

Both train the quickstart's network (mlp [256, 256, 128], BN after each Linear, dropout after
each activation, batch 64, 12 epochs, adamw 1e-3) on the same digits split sizes (a fifth held
out as test, a fifth of the rest for validation), both log to a sqlite MLflow store, and both
start as fresh processes (imports included).

    .venv/bin/python benchmarks/small_end.py            # 2 pairs, results/small_end.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "small_end.json"
TRIALS = 12

PLAIN = r"""
import sys

import mlflow
import numpy as np
import optuna
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

optuna.logging.set_verbosity(optuna.logging.WARNING)
torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x_rest, _, y_rest, _ = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
x_tr, x_va, y_tr, y_va = train_test_split(
    x_rest, y_rest, test_size=0.2, stratify=y_rest, random_state=0
)
mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
tensor = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
x_tr, x_va = tensor(x_tr), tensor(x_va)
y_tr, y_va = torch.tensor(y_tr), torch.tensor(y_va)
mlflow.set_tracking_uri("sqlite:///mlflow.db")
mlflow.set_experiment("plain")


def objective(trial):
    layers, width_in = [], 64
    for i, width in enumerate((256, 256, 128)):
        rate = trial.suggest_float(f"block{i}.rate", 0.0, 0.5)
        momentum = trial.suggest_float(f"block{i}.bn_momentum", 0.01, 0.5, log=True)
        layers += [nn.Linear(width_in, width, bias=False), nn.BatchNorm1d(width, momentum=momentum)]
        layers += [nn.ReLU(), nn.Dropout(rate)]
        width_in = width
    model = nn.Sequential(*layers, nn.Linear(width_in, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params(trial.params)
        for epoch in range(1, 13):
            model.train()
            order = torch.randperm(len(x_tr))
            for start in range(0, len(order), 64):
                rows = order[start : start + 64]
                loss = nn.functional.cross_entropy(model(x_tr[rows]), y_tr[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                acc = float((model(x_va).argmax(1) == y_va).float().mean())
            mlflow.log_metric("val_acc", acc, step=epoch)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return acc


with mlflow.start_run(run_name="plain"):
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3),
        storage="sqlite:///optuna.db",
    )
    study.optimize(objective, n_trials=int(sys.argv[1]))
    mlflow.log_metric("best_val_acc", study.best_value)
print(f"best {study.best_value:.4f}")
"""


def run_autotune(folder: Path) -> dict:
    spec = (ROOT / "examples" / "quickstart.yaml").read_text()
    (folder / "spec.yaml").write_text(spec.replace("n_trials: 30", f"n_trials: {TRIALS}"))
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "run", "spec.yaml"],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    seconds, ended = time.perf_counter() - start, dt.datetime.now(dt.timezone.utc)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = folder / "runs" / "quickstart"
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{out / 'autotune.db'}")
    last = max(t.datetime_complete for t in study.trials).astimezone(dt.timezone.utc)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("quickstart").experiment_id],
        filter_string="tags.`autotune.role` = 'parent'",
    )
    closed = dt.datetime.fromtimestamp(parent.info.end_time / 1000, dt.timezone.utc)
    return {
        "seconds": round(seconds, 1),
        "tail_after_last_trial": round((ended - last).total_seconds(), 1),
        "exit_after_parent_closed": round((ended - closed).total_seconds(), 1),
    }


def run_plain(folder: Path) -> dict:
    (folder / "plain.py").write_text(PLAIN)
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "plain.py", str(TRIALS)], cwd=folder, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return {"seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for pair in range(args.pairs):
        order = ("autotune", "plain") if pair % 2 == 0 else ("plain", "autotune")
        row: dict = {"pair": pair, "first": order[0]}
        for name in order:
            with tempfile.TemporaryDirectory() as folder:
                runner = run_autotune if name == "autotune" else run_plain
                row[name] = runner(Path(folder))
        row["ratio"] = round(row["autotune"]["seconds"] / row["plain"]["seconds"], 2)
        rows.append(row)
        print(json.dumps(row))
    RESULTS.write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "trials": TRIALS, "rows": rows}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()

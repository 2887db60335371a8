"""Is autotune's recommendation worth it, on data no search saw?

In the regime where regularisation matters (few training rows, a wide network, epochs enough to
overfit), per task:

1. autotune's study, as a user runs it: the defaults (the variance-shift pruner; at the end the
   top 2 configurations and the baselines trained again over 5 folds of the training and
   validation rows, which recommend.top_k: 2 asks for whatever the study's time), and what it
   recommends (a tuned trial, or a baseline as good and simpler);
2. a plain Optuna study of the same budget: TPE, the median pruner, the same search space, no
   re-ranking; its best trial;
3. the hand baselines: BN only, and plain dropout 0.5 after every activation.

Each of the four configurations is trained again over 5 seeds (100 to 104: seeds no study used)
on the same training split, and scored on the test split (data.test_fraction), which no trial,
pruner or re-ranking saw. Differences are paired: each seed trains every configuration from the
same initialisation state and batches. Also the recommendation's own score on validation
against its score on test, and the 95 % interval autotune states for the latter.

Run from the repository root (two tasks at a time on two cores):

    .venv/bin/python benchmarks/recommendation.py --tasks images-cnn breast-cancer-mlp
    .venv/bin/python benchmarks/recommendation.py --tasks images-resnet
    .venv/bin/python benchmarks/recommendation.py --report   # the table of every task run

Results are kept per task in benchmarks/results/recommendation-<task>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from _report import machine
from scipy import stats

from autotune.core.baselines import baselines
from autotune.core.checks import quiet_lightning
from autotune.core.names import TEST_ATTR
from autotune.core.spec import parse_spec
from autotune.nn.data import load_data, test_batches
from autotune.nn.fitting import evaluate, fit
from autotune.run.held_out import seed_interval
from autotune.run.loop import run_study
from autotune.run.preflight import resolve_space
from autotune.search.queries import best_trial, recommended_config, trial_config

RESULTS = Path(__file__).parent / "results"
SEEDS = range(100, 105)
N_TRIALS = 20
IMAGES = {"n_samples": 600, "n_classes": 6, "image_size": 16}
TASKS = {
    "images-cnn": {
        "data": {"name": "synthetic_images", "synthetic": IMAGES, "batch_size": 32},
        "model": {"template": "cnn", "widths": [64, 128]},
        "train": {"max_epochs": 30},
    },
    "images-resnet": {
        "data": {"name": "synthetic_images", "synthetic": IMAGES, "batch_size": 32},
        "model": {"template": "resnet", "widths": [32, 64]},
        "train": {"max_epochs": 30},
    },
    "breast-cancer-mlp": {
        "data": {"name": "breast_cancer", "batch_size": 32},
        "model": {"template": "mlp", "widths": [512, 512]},
        "train": {"max_epochs": 60},
    },
}


def spec_for(task: str, folder: Path, name: str, study: dict, recommend: dict):
    raw = TASKS[task]
    return parse_spec(
        {
            "study": {"name": name, "n_trials": N_TRIALS, **study},
            "data": {**raw["data"], "test_fraction": 0.25},
            "model": raw["model"],
            "train": {**raw["train"], "accelerator": "cpu", "seed": 0},
            "recommend": recommend,
            "mlflow": {"enabled": False},
            "output": str(folder / name),
        }
    )


def run_task(task: str, folder: Path) -> dict:
    """The four configurations, each trained over SEEDS and scored on the test split."""
    quiet_lightning()
    began = time.time()
    ours = spec_for(task, folder, "autotune", {}, {"top_k": 2})
    ours_study = run_study(ours).study
    name, config = recommended_config(ours_study, ours)
    tuned_at = time.time()
    plain = spec_for(task, folder, "plain", {"sampler": "tpe", "pruner": "median"}, {"top_k": 0})
    plain_study = run_study(plain).study
    plain_best = best_trial(plain_study)
    datamodule = load_data(ours.data, seed=0)
    hand = {row.name: row.config for row in baselines(ours, resolve_space(ours, datamodule))}
    picks = {
        "autotune": config,
        "plain Optuna": trial_config(plain_best),
        "bn_only": hand["bn_only"],
        "dropout_after_act": hand["dropout_after_act"],
    }
    tested = test_batches(datamodule)
    scores = {}
    for label, chosen in picks.items():
        scores[label] = []
        for seed in SEEDS:
            seeded = ours.model_copy(update={"train": ours.train.model_copy(update={"seed": seed})})
            scores[label].append(evaluate(fit(seeded, chosen, datamodule).model, tested)["val_acc"])
    own = ours_study.user_attrs.get(TEST_ATTR, {})
    robust = ours_study.user_attrs.get("robust") or {}
    validation = next((r["mean"] for r in robust.get("rows", []) if r["name"] == name), None)
    return {
        "task": task,
        "recommended": name,
        "blocks": config.to_dicts(),
        "plain_blocks": trial_config(plain_best).to_dicts(),
        "verdict": robust.get("verdict"),
        "scores": scores,
        "validation": validation,  # the recommendation's mean val_acc over the re-ranking's seeds
        "own_test": own.get("acc"),  # its own weights on the test split, as autotune stated
        "own_interval": own.get("acc_interval"),
        "own_robust_test": next((r for r in own.get("robust", []) if r["name"] == name), None),
        "test_rows": own.get("rows"),
        "seconds": {"autotune": tuned_at - began, "total": time.time() - began},
    }


def paired(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """Mean difference in points and the half-width of its two-sided 95 % t interval."""
    diffs = [100 * (a - b) for a, b in zip(ours, theirs, strict=True)]
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.mean(diffs), float(half)


def table(rows: list[dict]) -> str:
    def cell(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    lines = [
        "| task | recommended | autotune | BN only | dropout 0.5 after act | plain Optuna "
        "| vs best hand | vs plain | val − test of the pick |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s = row["scores"]
        best_hand = max(("bn_only", "dropout_after_act"), key=lambda k: statistics.mean(s[k]))
        hand, hand_half = paired(s["autotune"], s[best_hand])
        plain, plain_half = paired(s["autotune"], s["plain Optuna"])
        robust = row["own_robust_test"]
        gap = "-"
        if row["validation"] is not None and robust is not None:
            # the interval autotune states now: the fits' spread and the test rows' sampling
            low, high = seed_interval(robust["values"], (0.0, 1.0), rows=row["test_rows"])[
                "interval"
            ]
            gap = (
                f"{100 * (row['validation'] - robust['mean']):+.1f} "
                f"(interval ± {100 * (high - low) / 2:.1f})"
            )
        lines.append(
            f"| {row['task']} | {row['recommended']} | {cell(s['autotune'])} "
            f"| {cell(s['bn_only'])} | {cell(s['dropout_after_act'])} | {cell(s['plain Optuna'])} "
            f"| {hand:+.1f} ± {hand_half:.1f} ({best_hand}) | {plain:+.1f} ± {plain_half:.1f} "
            f"| {gap} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--report", action="store_true", help="the table of the saved results")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if not args.report:
        for task in args.tasks:
            with tempfile.TemporaryDirectory() as folder:
                row = run_task(task, Path(folder))
            row["machine"] = machine()
            (RESULTS / f"recommendation-{task}.json").write_text(json.dumps(row, indent=1))
            print(f"{task}: {row['seconds']['total']:.0f} s", flush=True)
    rows = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("recommendation-*.json"))]
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()

"""What the variance-shift pruner saves: the same trial budget under four pruners.

On three tasks and several seeds, one study per (task, seed, pruner), each with the same budget of
finished trials and the same seeded TPE sampler:

    none            every trial trains to the end
    median          Optuna's MedianPruner (5 start-up trials, 3 warm-up epochs)
    hyperband       Optuna's HyperbandPruner (epochs as the resource)
    variance_shift  autotune's VarianceShiftPruner over the same median base (gate at Δ 0.5,
                    10 % exploration, strictness 0.5), in four variants: the gate fixed or
                    learned from the completed trials (learn_threshold), and 2 or 0 extra
                    warm-up epochs near Δ = 1 (patience). The spec's default is the learned
                    gate with patience 0, the variant that met the claim below.

Per task it reports epochs trained in all, wall time, the best validation accuracy, and the
epochs a study needed before a trial reached the no-pruner study's final best. The claim under
test: at least 30 % fewer epochs than the median pruner for an equal best metric (within the
seed-to-seed spread), on average over the tasks.

Run from the repository root:

    .venv/bin/python benchmarks/pruners.py            # the numbers in docs/benchmarks.md
    .venv/bin/python benchmarks/pruners.py --quick    # a smoke run in about a minute

It prints markdown tables, writes the raw rows to benchmarks/results/pruners.json and the plot to
docs/pruners.png (--quick: pruners_quick.json, no plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna
import torch
from _report import machine, spread
from _tasks import DIGITS_CNN, DIGITS_MLP, NARROW_TABULAR
from optuna.trial import TrialState

from autotune.core.spec import parse_spec
from autotune.run.loop import run_study

TASKS = {"digits mlp": DIGITS_MLP, "digits cnn": DIGITS_CNN, "narrow tabular": NARROW_TABULAR}
# name in the tables -> the spec's study.pruner; the variance-shift variants spell out the two
# settings this benchmark chose the defaults by (the default is the last one)
PRUNERS = {
    "none": "none",
    "median": "median",
    "hyperband": "hyperband",
    **{
        f"variance_shift, {'learned gate' if learned else 'gate 0.5'}, patience {patience}": {
            "name": "variance_shift",
            "learn_threshold": learned,
            "patience": patience,
        }
        for learned in (False, True)
        for patience in (2, 0)
    },
}
RESULTS = Path(__file__).parent / "results" / "pruners.json"
PLOT = Path(__file__).parents[1] / "docs" / "pruners.png"


def run_one(task: str, pruner: str, seed: int, n_trials: int, epochs: int, out: Path) -> dict:
    """One study; what it cost and what it found."""
    spec = parse_spec(
        {
            **TASKS[task],
            "study": {"name": "bench", "n_trials": n_trials, "pruner": PRUNERS[pruner]},
            "train": {"max_epochs": epochs, "seed": seed},
            "mlflow": {"enabled": False},
            "output": str(out),
        }
    )
    start = time.perf_counter()
    outcome = run_study(spec)
    seconds = time.perf_counter() - start
    trials = sorted(outcome.study.get_trials(deepcopy=False), key=lambda t: t.number)
    return {
        "task": task,
        "pruner": pruner,
        "seed": seed,
        "seconds": seconds,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "epochs": len(t.intermediate_values),
                "value": t.value if t.state == TrialState.COMPLETE else None,
                "predicted_delta": t.user_attrs.get("predicted_delta"),
            }
            for t in trials
        ],
    }


def epochs(run: dict) -> int:
    return sum(t["epochs"] for t in run["trials"])


def best(run: dict) -> float:
    return max(t["value"] for t in run["trials"] if t["value"] is not None)


def epochs_to_reach(run: dict, target: float) -> int | None:
    """Epochs spent, in trial order, until a complete trial scored at least `target`."""
    spent = 0
    for trial in run["trials"]:
        spent += trial["epochs"]
        if trial["value"] is not None and trial["value"] >= target:
            return spent
    return None


def summary_table(runs: list[dict]) -> str:
    lines = [
        "| task | pruner | epochs trained | wall time (s) | best val_acc (%) | epochs to reach "
        "the no-pruner best | gated before training | epochs vs median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        mine = [r for r in runs if r["task"] == task]
        reference = {r["seed"]: best(r) for r in mine if r["pruner"] == "none"}
        medians = [epochs(r) for r in mine if r["pruner"] == "median"]
        median_epochs = statistics.mean(medians) if medians else None
        for pruner in PRUNERS:
            rows = [r for r in mine if r["pruner"] == pruner]
            if not rows:
                continue
            spent = [epochs(r) for r in rows]
            reached = [
                epochs_to_reach(r, reference[r["seed"]]) for r in rows if r["seed"] in reference
            ]
            got = [n for n in reached if n is not None]
            reach = f"{statistics.mean(got):.0f} ({len(got)}/{len(reached)} seeds)" if got else "-"
            if reached and not got:
                reach = "never"
            ratio = (
                "-" if median_epochs is None else f"{statistics.mean(spent) / median_epochs:.2f}"
            )
            gated = sum(
                1 for r in rows for t in r["trials"] if t["state"] == "PRUNED" and t["epochs"] == 0
            )
            lines.append(
                f"| {task} | {pruner} | {spread(spent, 0)} "
                f"| {spread([r['seconds'] for r in rows], 0)} "
                f"| {spread([100 * best(r) for r in rows], 1)} | {reach} "
                f"| {gated / len(rows):.1f} | {ratio} |"
            )
    return "\n".join(lines)


def claim(runs: list[dict]) -> str:
    """The average over tasks of variance_shift's epochs relative to median's, and the bests."""
    lines = []
    for name in (p for p in PRUNERS if p.startswith("variance_shift")):
        lines.append(f"{name}:")
        lines.extend(_claim(runs, name))
    return "\n".join(lines)


def _claim(runs: list[dict], name: str) -> list[str]:
    ratios, lines = [], []
    for task in TASKS:
        mine = [r for r in runs if r["task"] == task]
        vs = [r for r in mine if r["pruner"] == name]
        med = [r for r in mine if r["pruner"] == "median"]
        if not vs or not med:
            continue
        ratio = statistics.mean(map(epochs, vs)) / statistics.mean(map(epochs, med))
        ratios.append(ratio)
        gap = statistics.mean(map(best, vs)) - statistics.mean(map(best, med))
        spread = statistics.stdev(map(best, med)) if len(med) > 1 else 0.0
        lines.append(
            f"- {task}: {100 * (1 - ratio):.0f} % fewer epochs than median; best val_acc "
            f"{100 * gap:+.1f} points against median (median's seed-to-seed sd "
            f"{100 * spread:.1f})"
        )
    if ratios:
        mean = statistics.mean(ratios)
        lines.append(f"- on average over the tasks: {100 * (1 - mean):.1f} % fewer epochs")
    return lines


def why(runs: list[dict]) -> str:
    """Does the predicted Δ tell good trials from bad? In the unpruned studies, per task: the
    share of trials past the default gate, and Spearman's ρ between |log Δ| and the final metric
    (negative: the more shifted, the worse)."""
    from scipy.stats import spearmanr

    lines = [
        "| task | trials (no pruner) | past the gate (Δ < 0.5) | ρ(\\|log Δ\\|, val_acc) "
        "| best val_acc past the gate | best val_acc within it |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        trials = [
            t
            for r in runs
            if r["task"] == task and r["pruner"] == "none"
            for t in r["trials"]
            if t["value"] is not None and t["predicted_delta"] is not None
        ]
        if len(trials) < 3:
            continue
        distance = [abs(math.log(t["predicted_delta"])) for t in trials]
        values = [t["value"] for t in trials]
        rho = float(spearmanr(distance, values).statistic)
        past = [t["value"] for t, d in zip(trials, distance, strict=True) if d > math.log(2)]
        within = [t["value"] for t, d in zip(trials, distance, strict=True) if d <= math.log(2)]
        lines.append(
            f"| {task} | {len(trials)} | {len(past)} | {rho:.2f} "
            f"| {_best(past)} | {_best(within)} |"
        )
    return "\n".join(lines)


def ceiling(runs: list[dict]) -> str:
    """An upper bound on what any gate before training saves against the median: the share of
    the median's epochs spent on the trials it went on to prune (a gate that knew the future
    would stop exactly those, before their first epoch)."""
    lines = []
    for task in TASKS:
        shares = []
        for r in runs:
            if r["task"] == task and r["pruner"] == "median":
                pruned = sum(t["epochs"] for t in r["trials"] if t["state"] == "PRUNED")
                shares.append(pruned / epochs(r))
        if shares:
            each = ", ".join(f"{100 * x:.0f} %" for x in shares)
            lines.append(
                f"- {task}: the median spent {100 * statistics.mean(shares):.0f} % of its epochs "
                f"on trials it pruned (per seed: {each})"
            )
    return "\n".join(lines)


def _best(values: list[float]) -> str:
    return f"{100 * max(values):.1f}" if values else "-"


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(PRUNERS)
    for i, pruner in enumerate(PRUNERS):
        spent, scores = [], []
        for task in TASKS:
            rows = [r for r in runs if r["task"] == task and r["pruner"] == pruner]
            spent.append(statistics.mean(map(epochs, rows)) if rows else 0)
            scores.append(100 * statistics.mean(map(best, rows)) if rows else 0)
        xs = [x + (i - (len(PRUNERS) - 1) / 2) * width for x in range(len(TASKS))]
        axes[0].bar(xs, spent, width, label=pruner)
        axes[1].bar(xs, scores, width, label=pruner)
    for ax, title in zip(
        axes, ("epochs trained (mean over seeds)", "best val_acc, %"), strict=True
    ):
        ax.set_xticks(range(len(TASKS)), list(TASKS))
        ax.set_title(title)
    low = min(100 * best(r) for r in runs)
    axes[1].set_ylim(max(0, low - 5), 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trial budget of every study")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed, first-seed+1, ..."
    )
    parser.add_argument("--only", default="", help="pruners to run, ';' between (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the rows go")
    parser.add_argument("--quick", action="store_true", help="8 trials, 3 epochs, 1 seed")
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the tables and plot the last results; run nothing",
    )
    parser.add_argument(
        "--reuse",
        default="",
        help="pruners, separated by ';', whose rows are taken from the last results file instead "
        "of run again (e.g. 'none; median; hyperband' when only the variance-shift pruner changed)",
    )
    args = parser.parse_args()
    reuse = {name.strip() for name in args.reuse.split(";") if name.strip()}
    only = {name.strip() for name in args.only.split(";") if name.strip()} or set(PRUNERS)
    unknown = (reuse | only) - set(PRUNERS)
    if unknown:
        parser.error(
            f"--reuse: unknown pruner {sorted(unknown)[0]!r}; expected: {', '.join(PRUNERS)}"
        )
    if args.quick:  # a smoke run: its rows go beside the documented ones, and no plot
        args.trials, args.epochs, args.seeds = 8, 3, 1
        if args.results == RESULTS:
            args.results = RESULTS.with_name("pruners_quick.json")
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if args.report:
        runs = json.loads(args.results.read_text())
        if args.results == RESULTS:  # the plot in the docs is of the main results
            plot(runs)
        print(summary_table(runs), claim(runs), why(runs), ceiling(runs), sep="\n\n")
        return
    runs = (
        [r for r in json.loads(args.results.read_text()) if r["pruner"] in reuse] if reuse else []
    )
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed study first: imports and caches warm, so the first timed one is not slower
        run_one("digits mlp", "none", 0, 1, 1, Path(tmp) / "warm-up")
        for task in TASKS:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for pruner in PRUNERS:
                    if pruner in reuse or pruner not in only:
                        continue
                    out = Path(tmp) / f"{task}-{seed}-{pruner}".replace(" ", "_")
                    runs.append(run_one(task, pruner, seed, args.trials, args.epochs, out))
                    run = runs[-1]
                    print(
                        f"  {task} seed {seed} {pruner}: {epochs(run)} epochs, "
                        f"{run['seconds']:.0f} s, best {best(run):.4f}",
                        flush=True,
                    )
    elapsed = time.time() - start
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps(runs, indent=1))
    if args.results == RESULTS:
        plot(runs)
    print()
    flags = " ".join(
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if value and name not in ("quick", "report") and value != parser.get_default(name)
    )
    flags = (" --quick" if args.quick else "") + (f" {flags}" if flags else "")
    print(
        f"Command: `.venv/bin/python benchmarks/pruners.py{flags}` "
        f"({args.trials} trials of up to {args.epochs} epochs per study, {args.seeds} seed(s); "
        f"{elapsed:.0f} s)"
    )
    print(machine())
    print()
    print(summary_table(runs))
    print()
    print(claim(runs))
    print()
    print(why(runs))
    print()
    print(ceiling(runs))


if __name__ == "__main__":
    main()

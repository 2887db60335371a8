"""What the variance-shift pruner saves: the same trial budget under several pruners.

On each task and seed, one study per pruner, each with the same budget of finished trials and
the same seeded TPE sampler:

    none            every trial trains to the end; it is also every variant's twin: the gates
                    watch it without stopping anything, and record what they would have stopped
    median          Optuna's MedianPruner (5 start-up trials, 3 warm-up epochs)
    hyperband       Optuna's HyperbandPruner (epochs as the resource)
    variance_shift  autotune's VarianceShiftPruner over the same median, in six variants:
                    the line on Δ learned from the completed trials (gate delta, the default
                    before the cost gate); the gate on the predicted final metric (gate cost)
                    at optimism 1, 0.75 or 0.5, deciding again after the first epoch, and at
                    0.5 after each of the first three (the default); and gate cost at optimism
                    1 with 5 start-up trials seeded with the configurations of least predicted
                    shift

Per task it reports epochs trained in all, wall time, the best validation accuracy, the epochs a
study needed before a trial reached the no-pruner study's final best, and for each variant the
goals: epochs against the median's and hyperband's, the best metric against theirs and their
seed spread, epochs to the no-pruner best against the median's, and the gate's errors (of the
trials it would have stopped in the twin study, the share that study ranks in its top quarter).

The defaults were chosen on the first three tasks, seeds 0 to 2 (--tasks defaults to them); the
synthetic-image cnn and seeds 3 to 5 are held out.

Run from the repository root:

    .venv/bin/python benchmarks/pruners.py            # the chosen-on numbers in docs/benchmarks.md
    .venv/bin/python benchmarks/pruners.py --quick    # a smoke run in about a minute

It prints markdown tables, writes the raw rows to benchmarks/results/pruners.json and the plot to
docs/pruners.png (--quick: pruners_quick.json, no plot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna
import torch
from _report import machine, spread
from _tasks import DIGITS_CNN, DIGITS_MLP, NARROW_TABULAR, SYNTHETIC_IMAGE_CNN
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from autotune.core.spec import parse_spec
from autotune.core.spec_study import PrunerSpec
from autotune.run.loop import run_study
from autotune.search import storage
from autotune.search.storage import make_pruner

# the first three chose the defaults (seeds 0 to 2); the last is held out, with seeds 3 to 5
TASKS = {
    "digits mlp": DIGITS_MLP,
    "digits cnn": DIGITS_CNN,
    "narrow tabular": NARROW_TABULAR,
    "synthetic-image cnn": SYNTHETIC_IMAGE_CNN,
}
CHOSEN_ON = ("digits mlp", "digits cnn", "narrow tabular")
# name in the tables -> the spec's study.pruner; the variance-shift variants spell out the
# settings this benchmark chose the defaults by
PRUNERS = {
    "none": "none",
    "median": "median",
    "hyperband": "hyperband",
    # the default before the cost gate: the line on Δ, learned from the completed trials
    "variance_shift, gate delta": {"name": "variance_shift", "gate": "delta"},
    # the gate on the predicted cost, deciding again after the first epoch only ...
    **{
        f"variance_shift, gate cost, optimism {optimism:g}": {
            "name": "variance_shift",
            "optimism": optimism,
            "cost_steps": 1,
        }
        for optimism in (1.0, 0.75, 0.5)
    },
    # ... or after each of the first three: the default since the cost gate
    "variance_shift, gate cost, optimism 0.5, cost_steps 3": {
        "name": "variance_shift",
        "optimism": 0.5,
        "cost_steps": 3,
    },
    "variance_shift, gate cost, optimism 1, seeded": {
        "name": "variance_shift",
        "optimism": 1.0,
        "cost_steps": 1,
        "seed_trials": 5,
    },
}
VARIANTS = [name for name in PRUNERS if name.startswith("variance_shift")]
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
    twin = Twin(spec, seed) if pruner == "none" else None
    start = time.perf_counter()
    with twin or contextlib.nullcontext():
        outcome = run_study(spec)
    seconds = time.perf_counter() - start
    trials = sorted(outcome.study.get_trials(deepcopy=False), key=lambda t: t.number)
    return {
        "task": task,
        "pruner": pruner,
        "seed": seed,
        "seconds": seconds,
        # the unpruned study is every variant's twin: what each would have gated, per trial
        "verdicts": twin.verdicts if twin else {},
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


class Twin(BasePruner):
    """A study without the gate: prunes nothing, and records for each variance-shift variant
    which trials its gate would have stopped (before training or after a cost step), so that
    the unpruned results rank the configurations each gate stops. Installed in place of
    storage.make_pruner for the one study it is made for."""

    def __init__(self, spec: Any, seed: int) -> None:
        self.judges = {
            name: make_pruner(PrunerSpec.model_validate(PRUNERS[name]), spec.train.max_epochs, seed)
            for name in VARIANTS
        }
        self.verdicts: dict[str, dict[int, int]] = {name: {} for name in VARIANTS}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        for name, judge in self.judges.items():
            if trial.number in self.verdicts[name]:
                continue  # gated already: the epoch it would have stopped at is recorded
            step = trial.last_step
            if step is None:
                stopped = judge.gated(study, trial)
            elif 1 <= step <= judge.cost_steps:
                stopped = judge.stops(judge.cost_verdict(study, trial, step), trial.number)
            else:
                continue
            if stopped:
                self.verdicts[name][trial.number] = step or 0
        return False

    def __enter__(self) -> Twin:
        self._made = storage.make_pruner
        storage.make_pruner = lambda *args, **kwargs: self
        return self

    def __exit__(self, *exc: object) -> None:
        storage.make_pruner = self._made


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


def goals(runs: list[dict]) -> str:
    """Each variance-shift variant against the goals, per task and on average over the tasks:
    epochs against the median's and hyperband's (goals: at most 0.60 and 0.75), the best metric
    against the median's, seed by seed, beside the median's seed spread (goal: within it),
    epochs until the no-pruner best against the median's (goal: at most 0.50), and the gate's
    errors in its twin study (goal: at most 10 %)."""
    lines = [
        "| variant | task | epochs vs median | epochs vs hyperband | best vs median, seed by seed "
        "(median's sd) | epochs to the no-pruner best vs median's | gate errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in VARIANTS:
        cells = [_goal_cells(runs, task, name) for task in TASKS]
        cells = [cell for cell in cells if cell]
        if not cells:
            continue
        lines.extend(f"| {name} | {' | '.join(cell['text'])} |" for cell in cells)
        mean = [statistics.mean(cell[key] for cell in cells) for key in ("med", "hyp", "reach")]
        wrong, gated = (sum(cell[key] for cell in cells) for key in ("wrong", "gated"))
        share = f"{wrong}/{gated} ({100 * wrong / gated:.0f} %)" if gated else "-"
        lines.append(
            f"| {name} | mean over {len(cells)} tasks | {mean[0]:.2f} | {mean[1]:.2f} | | "
            f"{mean[2]:.2f} | {share} |"
        )
    return "\n".join(lines)


def _goal_cells(runs: list[dict], task: str, name: str) -> dict | None:
    mine = {p: [r for r in runs if r["task"] == task and r["pruner"] == p] for p in PRUNERS}
    vs, med, hyp = mine[name], mine["median"], mine["hyperband"]
    if not (vs and med and hyp and mine["none"]):
        return None
    ratio_med, ratio_hyp = _ratio(vs, med), _ratio(vs, hyp)
    sd = statistics.stdev(map(best, med)) if len(med) > 1 else 0.0
    reach_vs, reach_med = _reach(mine["none"], vs), _reach(mine["none"], med)
    reach = (reach_vs or 0.0) / reach_med if reach_med else math.nan
    wrong, gated = gate_errors(mine["none"], name) or (0, 0)
    share = f"{wrong}/{gated} ({100 * wrong / gated:.0f} %)" if gated else "-"
    return {
        "text": [
            task,
            f"{ratio_med:.2f}",
            f"{ratio_hyp:.2f}",
            f"{_paired_gaps(vs, med)} ({100 * sd:.1f})",
            f"{reach:.2f}",
            share,
        ],
        "med": ratio_med,
        "hyp": ratio_hyp,
        "reach": reach,
        "wrong": wrong,
        "gated": gated,
    }


def _paired_gaps(runs: list[dict], against: list[dict]) -> str:
    """The best metric's gap on each seed both ran, in points: the spread over seeds is that of
    the tasks' data as much as of the pruners, and a paired gap is free of the first."""
    theirs = {r["seed"]: best(r) for r in against}
    gaps = [100 * (best(r) - theirs[r["seed"]]) for r in runs if r["seed"] in theirs]
    return ", ".join(f"{gap:+.1f}" for gap in gaps)


def _ratio(runs: list[dict], against: list[dict]) -> float:
    return statistics.mean(map(epochs, runs)) / statistics.mean(map(epochs, against))


def _reach(reference: list[dict], runs: list[dict]) -> float | None:
    """Mean epochs until the no-pruner best of the same seed; a study that never reached it
    counts all its epochs (a lower bound on what it would have needed)."""
    target = {r["seed"]: best(r) for r in reference}
    spent = [
        epochs_to_reach(r, target[r["seed"]]) or epochs(r) for r in runs if r["seed"] in target
    ]
    return statistics.mean(spent) if spent else None


def gate_errors(twins: list[dict], name: str) -> tuple[int, int] | None:
    """Of the trials a variant's gate would have stopped in the unpruned twin studies, how many
    that study ranks in its top quarter, and how many it stopped. Ties share their mean rank
    (as Spearman's ρ ranks them): on the digits a validation row is 0.28 points, and a third of
    a study can tie at the quarter's edge, where rank by trial order would decide by chance."""
    from scipy.stats import rankdata

    wrong = gated = 0
    recorded = False
    for run in twins:
        stopped = run.get("verdicts", {}).get(name)
        if stopped is None:
            continue
        recorded = True
        done = [t for t in run["trials"] if t["value"] is not None]
        ranks = rankdata([-t["value"] for t in done])  # 1: the best; ties: their mean rank
        edge = max(1.0, len(done) / 4)
        top = {t["number"] for t, rank in zip(done, ranks, strict=True) if rank <= edge}
        gated += len(stopped)
        wrong += sum(1 for number in stopped if int(number) in top)
    return (wrong, gated) if recorded else None


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
    tasks = [task for task in TASKS if any(r["task"] == task for r in runs)]
    for i, pruner in enumerate(PRUNERS):
        spent, scores = [], []
        for task in tasks:
            rows = [r for r in runs if r["task"] == task and r["pruner"] == pruner]
            spent.append(statistics.mean(map(epochs, rows)) if rows else 0)
            scores.append(100 * statistics.mean(map(best, rows)) if rows else 0)
        xs = [x + (i - (len(PRUNERS) - 1) / 2) * width for x in range(len(tasks))]
        axes[0].bar(xs, spent, width, label=pruner)
        axes[1].bar(xs, scores, width, label=pruner)
    for ax, title in zip(
        axes, ("epochs trained (mean over seeds)", "best val_acc, %"), strict=True
    ):
        ax.set_xticks(range(len(tasks)), tasks)
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
    parser.add_argument(
        "--tasks",
        default="; ".join(CHOSEN_ON),
        help="tasks to run, ';' between (default: the three the defaults were chosen on)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the rows go")
    parser.add_argument("--quick", action="store_true", help="8 trials, 3 epochs, 1 seed")
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the tables and plot the last results; run nothing",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="results files whose rows go into --results, a later row replacing an earlier one "
        "of the same task, pruner and seed; then report, as --report does; run nothing",
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
    tasks = [name.strip() for name in args.tasks.split(";") if name.strip()]
    if set(tasks) - set(TASKS):
        parser.error(f"--tasks: unknown task; expected: {'; '.join(TASKS)}")
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

    if args.merge:
        merged = {}
        for path in args.merge:
            for run in json.loads(path.read_text()):
                merged[run["task"], run["pruner"], run["seed"]] = run
        args.results.write_text(json.dumps(list(merged.values()), indent=1))
        args.report = True
    if args.report:
        runs = json.loads(args.results.read_text())
        if args.results == RESULTS:  # the plot in the docs is of the main results
            plot(runs)
        print(summary_table(runs), goals(runs), why(runs), ceiling(runs), sep="\n\n")
        return
    runs = (
        [r for r in json.loads(args.results.read_text()) if r["pruner"] in reuse] if reuse else []
    )
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed study first: imports and caches warm, so the first timed one is not slower
        run_one("digits mlp", "none", 0, 1, 1, Path(tmp) / "warm-up")
        for task in tasks:
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
        if value and name not in ("quick", "report", "merge") and value != parser.get_default(name)
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
    print(goals(runs))
    print()
    print(why(runs))
    print()
    print(ceiling(runs))


if __name__ == "__main__":
    main()

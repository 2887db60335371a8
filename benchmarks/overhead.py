"""The tuner's own overhead: one autotune trial against a hand-written PyTorch loop, side by side.

For each task, the same network (autotune.nn.models.build_model from the same TrialConfig, the same
seed), the same optimizer, the same batches (the datamodule's own TensorBatches) and the same
epochs, with a validation pass and one host sync of the metrics after each epoch, are trained

    by hand    a plain loop: forward, cross-entropy, backward, step; validation each epoch;
               when the configuration recalibrates BN, the plain PyTorch way (momentum=None,
               regularisers off) and validation again
    by a trial one trial of a real study through autotune's own trial loop (loop.run_trials and
               objective.Objective): Optuna with sqlite storage, MLflow with sqlite tracking,
               Lightning, the prediction of the variance shift before training and the
               measurements after it, as `autotune run` does

in pairs that alternate which goes first. The study and MLflow are set up once per task, as once
per process in `autotune run`; that set-up is reported apart. A trial's wall time is split into
parts by timing the calls it makes (each part's own time, less the parts inside it), so the table
shows where the overhead goes. The hand loop must reach the trial's validation accuracy before
recalibration, and its losses, to the last digit: the check that both trained the same thing.

Tasks:
    digits mlp   scikit-learn's digits, mlp [256, 256, 128], batch 64, 12 epochs (the quickstart)
    cnn          the cnn template [32, 64] on 2,000 synthetic 3x32x32 images, batch 128, 4 epochs
    wide mlp     mlp [512, 512, 256] on 100,000 rows of synthetic tabular data (64 features),
                 batch 512, 3 epochs

Before them, start-up: `autotune --help` and `autotune validate examples/quickstart.yaml`, each
in a fresh process, interleaved. After them, memory over a long study: 50 short trials of the
digits mlp in one process, resident memory (VmRSS) after trial 5 and after trial 50.

Run from the repository root:

    .venv/bin/python benchmarks/overhead.py            # the numbers in docs/benchmarks.md
    .venv/bin/python benchmarks/overhead.py --quick    # a smoke run of about a minute

It prints markdown tables and writes the raw rows to benchmarks/results/overhead.json
(--quick: overhead_quick.json).
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
import yaml
from _report import machine, spread
from torch.nn import functional as F

import autotune.nn.fitting as fitting
import autotune.nn.observers as observers
import autotune.run.objective as objective
from autotune.core.checks import quiet_lightning
from autotune.core.space import SearchSpace, TrialConfig
from autotune.core.spec import Spec, load_spec
from autotune.nn.models import build_model
from autotune.run.loop import Observer, run_trials
from autotune.run.session import Session, open_session
from autotune.search.queries import count_finished
from autotune.search.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# the goals: a trial at most this many times the hand loop's wall time
GOALS = {"digits mlp": 1.5, "cnn": 1.15, "wide mlp": 1.15}
# what the hand loop must reproduce of the trial's last epoch
METRICS = ("train_loss", "val_loss", "val_acc")


def tasks(quick: bool) -> dict[str, dict[str, Any]]:
    """Each task's spec sections. --quick: the same shapes, smaller, for a smoke test."""
    images = {"n_samples": 400 if quick else 2000, "image_size": 32, "channels": 3}
    table = {"n_samples": 2000 if quick else 100_000, "n_features": 64, "n_informative": 16}
    return {
        "digits mlp": {
            "data": {"name": "digits", "batch_size": 64, "test_fraction": 0},
            "model": {"template": "mlp", "widths": [256, 256, 128]},
            "train": {"max_epochs": 2 if quick else 12},
        },
        "cnn": {
            "data": {
                "name": "synthetic_images",
                "batch_size": 128,
                "synthetic": images,
                "test_fraction": 0,
            },
            "model": {"template": "cnn", "widths": [32, 64]},
            "train": {"max_epochs": 1 if quick else 4},
        },
        "wide mlp": {
            "data": {
                "name": "synthetic_tabular",
                "batch_size": 512,
                "synthetic": table,
                "test_fraction": 0,
            },
            "model": {"template": "mlp", "widths": [512, 512, 256]},
            "train": {"max_epochs": 1 if quick else 3},
        },
    }


def write_spec(name: str, sections: dict[str, Any], folder: Path, n_trials: int) -> Spec:
    """A spec as a user would write it: sqlite for Optuna and MLflow in `folder`, no pruner (so
    every trial trains all its epochs, as the hand loop does)."""
    spec = {
        "study": {"name": name, "n_trials": n_trials, "pruner": "none"},
        **sections,
        "output": str(folder / name),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


# --- the hand-written loop --------------------------------------------------------------------


def hand_loop(spec: Spec, config: TrialConfig, datamodule: Any) -> tuple[dict[str, float], float]:
    """What one would write without autotune: the same network, optimizer, batches and epochs,
    validated after each epoch with one host sync of its metrics, then BN recalibrated and
    validated again when the configuration asks for it. Returns the last epoch's metrics and the
    seconds the recalibration and its validation took."""
    device = _device(spec)
    torch.manual_seed(spec.train.seed)  # the seed build_seeded sets before building
    model = build_model(spec.model, config, datamodule.input_shape, datamodule.n_classes)
    model.to(device)
    optimizer = _optimizer(spec, model)
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    # Lightning calls iter() on the loader once before the first epoch, to check it is
    # iterable, and TensorBatches draws an epoch's shuffle at each iter(): the trial's epochs
    # are shuffles 1..E. Skip shuffle 0 here too, so both see the same batches in the same order
    iter(train)
    metrics: dict[str, float] = {}
    for _ in range(spec.train.max_epochs):
        model.train()
        total = torch.zeros((), device=device)
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(y)
        val_loss, correct = validate(model, val, device)
        sums = torch.stack([total, val_loss, correct.float()]).tolist()  # one sync an epoch
        n_train, n_val = len(datamodule.y_train), len(datamodule.y_val)
        metrics = {
            "train_loss": sums[0] / n_train,
            "val_loss": sums[1] / n_val,
            "val_acc": sums[2] / n_val,
        }
    start = time.perf_counter()
    if config.recalibrate_bn:  # on the batches the trial's recalibration sees: a fresh loader's
        recalibrate(model, datamodule.train_dataloader(), device)
        torch.stack(validate(model, val, device)).tolist()  # to the host, as the trial's are
    return metrics, time.perf_counter() - start


def validate(
    model: torch.nn.Module, val: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed validation loss and the count of right answers, on the device."""
    model.eval()
    val_loss = correct = torch.zeros((), device=device)
    with torch.no_grad():
        for x, y in val:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            val_loss = val_loss + F.cross_entropy(logits, y, reduction="sum")
            correct = correct + (logits.argmax(dim=1) == y).sum()
    return val_loss, correct


def recalibrate(model: torch.nn.Module, train: Any, device: torch.device) -> None:
    """BN recalibration as one writes it by hand: BN's own cumulative average (momentum=None)
    over the training batches (as many as the trial's, at most 200), every other module in eval
    mode, so the regularisers are off."""
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
            module.train()
    with torch.no_grad():
        for x, _ in itertools.islice(train, fitting.RECALIBRATION_BATCHES):
            model(x.to(device, non_blocking=True))


def _device(spec: Spec) -> torch.device:
    cuda = spec.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def _optimizer(spec: Spec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer Classifier.configure_optimizers makes."""
    return fitting.make_optimizer(spec.train, model.parameters())


# --- where a trial's time goes -------------------------------------------------------------------


class Parts:
    """Each wrapped call's own wall time, less the wrapped calls inside it, summed by part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open call: time spent in wrapped calls inside it
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[part] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        self._undo.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)
        self._undo.clear()

    def take(self) -> dict[str, float]:
        """The seconds so far, and start again from zero."""
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


# the parts of a trial, in the order a trial meets them, and what each wraps
PART_NAMES = (
    "sampling",
    "prediction",
    "building the network and the Trainer",
    "training (Lightning)",
    "prediction after epoch 1",
    "recalibration",
    "Δ's two factors",
    "train-mode accuracy",
    "MLflow",
    "Optuna report and attrs",
    "saving weights",
    "the rest",
)
# the variance-shift work a trial does besides training: the prediction before it and the
# measurements after it. Recalibration is not among them: a configuration that asks for it is
# trained with it, and the hand loop recalibrates too
SHIFT_PARTS = ("prediction", "prediction after epoch 1", "Δ's two factors", "train-mode accuracy")


@contextmanager
def timed_parts() -> Iterator[Parts]:
    parts = Parts()
    parts.wrap(SearchSpace, "sample", "sampling")
    parts.wrap(fitting, "predict", "prediction")
    # fit's own time is building the network and the Trainer; the loop is Trainer.fit, and the
    # measurements after it are wrapped apart
    parts.wrap(fitting, "fit", "building the network and the Trainer")
    parts.wrap(pl.Trainer, "fit", "training (Lightning)")
    # after_training: recalibration and validating again, where Δ is observed; the train-mode
    # pass is wrapped apart. Where Δ is observed in the last validation, its hooks' time is in
    # the training part
    parts.wrap(fitting, "after_training", "recalibration")
    parts.wrap(fitting, "train_mode_accuracy", "train-mode accuracy")
    parts.wrap(fitting, "factor_shift", "Δ's two factors")  # one more pass over validation
    parts.wrap(observers, "predict_trained", "prediction after epoch 1")  # inside Trainer.fit
    for method in ("start_trial", "log_metrics", "log_values", "end_trial"):
        parts.wrap(Tracker, method, "MLflow")
    for method in ("report", "should_prune", "set_user_attr"):
        parts.wrap(optuna.Trial, method, "Optuna report and attrs")
    parts.wrap(objective.Objective, "_save_if_best", "saving weights")
    try:
        yield parts
    finally:
        parts.restore()


# --- one pair ----------------------------------------------------------------------------------


def draw_configs(session: Session, n: int) -> list[dict[str, Any]]:
    """n configurations drawn at random from the study's space, as Optuna params."""
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    drawn = []
    for _ in range(n):
        trial = scratch.ask()
        session.space.sample(trial)
        drawn.append(trial.params)
    return drawn


def one_trial(session: Session, params: dict[str, Any], parts: Parts) -> dict[str, Any]:
    """One trial of the study, with `params`, through autotune's trial loop."""
    session.study.enqueue_trial(params)
    session.budget = count_finished(session.study) + 1
    parts.take()
    start = time.perf_counter()
    outcome = run_trials(session)
    wall = time.perf_counter() - start
    seconds = parts.take()
    seconds["the rest"] = wall - sum(seconds.values())
    trial = session.study.trials[-1]
    if trial.state != optuna.trial.TrialState.COMPLETE or outcome.finished != session.budget:
        raise SystemExit(f"the trial did not complete: {trial.user_attrs.get('fail_reason')}")
    last = trial.user_attrs["history"][-1]  # the last epoch's metrics, before recalibration
    return {
        "wall_s": wall,
        "parts_s": seconds,
        "metrics": {key: last[key] for key in METRICS},
        "recalibrate_bn": trial.user_attrs["recalibrate_bn"],
    }


def one_hand(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    config = session.space.sample(optuna.trial.FixedTrial(params))
    start = time.perf_counter()
    metrics, recalibration = hand_loop(session.spec, config, session.datamodule)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "recalibration_s": recalibration, "metrics": metrics}


def run_task(name: str, sections: dict[str, Any], pairs: int, folder: Path) -> dict[str, Any]:
    """Set the study up once, then `pairs` pairs of (trial, hand loop), alternating order, after
    one pair that is not counted (first calls: allocator, kernels, MLflow's first run)."""
    spec = write_spec(name.replace(" ", "-"), sections, folder, n_trials=pairs + 1)
    start = time.perf_counter()
    session = open_session(spec)
    set_up = time.perf_counter() - start
    rows = []
    with timed_parts() as parts:
        for index, params in enumerate(draw_configs(session, pairs + 1)):
            first, second = ("trial", "hand") if index % 2 == 0 else ("hand", "trial")
            sides = {
                "trial": lambda p=params: one_trial(session, p, parts),
                "hand": lambda p=params: one_hand(session, p),
            }
            done = {}
            for side in (first, second):
                gc.collect()  # neither side pays for the other's garbage
                done[side] = sides[side]()
            trial, hand = done["trial"], done["hand"]
            # the check that both trained the same: same weights, batches, order and masks
            same = all(
                math.isclose(trial["metrics"][key], hand["metrics"][key], rel_tol=1e-9)
                for key in METRICS
            )
            row = {
                "task": name,
                "pair": index,
                "counted": index > 0,
                "first": first,
                "params": params,
                "trial_s": trial["wall_s"],
                "hand_s": hand["wall_s"],
                "hand_recalibration_s": hand["recalibration_s"],
                "ratio": trial["wall_s"] / hand["wall_s"],
                "parts_s": trial["parts_s"],
                "recalibrate_bn": trial["recalibrate_bn"],
                "metrics_trial": trial["metrics"],
                "metrics_hand": hand["metrics"],
                "same_metrics": same,
            }
            rows.append(row)
            print(
                f"{name} pair {index}: trial {row['trial_s']:.2f} s, hand {row['hand_s']:.2f} s, "
                f"ratio {row['ratio']:.3f}, same metrics: {same}",
                file=sys.stderr,
            )
    session.tracker.end_study({}, {}, [])
    return {"task": name, "set_up_s": set_up, "sections": sections, "rows": rows}


# --- memory over a long study -------------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident memory (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: this measurement needs Linux")


class MemoryProgress(Observer):
    """Records resident memory after each finished trial."""

    def __init__(self) -> None:
        self.rss: list[float] = []

    def trial_done(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        gc.collect()
        self.rss.append(rss_mib())


def run_memory(
    n_trials: int, epochs: int, folder: Path, sections: dict[str, Any] | None = None
) -> dict[str, Any]:
    """n_trials short trials (default: of the digits mlp) in this process, drawn by the study's
    own sampler (TPE); resident memory after each."""
    sections = {**(sections or tasks(quick=False)["digits mlp"]), "train": {"max_epochs": epochs}}
    spec = write_spec("memory", sections, folder, n_trials=n_trials)
    session = open_session(spec)
    progress = MemoryProgress()
    start = time.perf_counter()
    outcome = run_trials(session, progress=progress)
    session.tracker.end_study({}, {}, [])
    return {
        "trials": outcome.finished,
        "epochs": epochs,
        "wall_s": time.perf_counter() - start,
        "rss_mib": progress.rss,
    }


# --- start-up ----------------------------------------------------------------------------------

# what a user types, and how the benchmark runs it; `python -c pass` is the interpreter alone
STARTUP = {
    "python -c pass": ["-c", "pass"],
    "autotune --help": ["-m", "autotune.cli", "--help"],
    "autotune validate examples/quickstart.yaml": [
        "-m",
        "autotune.cli",
        "validate",
        "examples/quickstart.yaml",
    ],
}


def run_startup(repeats: int) -> dict[str, list[float]]:
    """Wall time of each command in a fresh process, `repeats` times, interleaved."""
    seconds: dict[str, list[float]] = {name: [] for name in STARTUP}
    for _ in range(repeats):
        for name, args in STARTUP.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, check=True)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def startup_table(seconds: dict[str, list[float]]) -> str:
    lines = ["| command | wall time, s | goal |", "| --- | --- | --- |"]
    for name, values in seconds.items():
        goal = "" if name.startswith("python") else "≤ 1"
        lines.append(f"| `{name}` | {spread(values, 2)} | {goal} |")
    return "\n".join(lines)


# --- the report -----------------------------------------------------------------------------------


def ratio_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | epochs | set-up once, s | hand loop, s | trial, s | trial ÷ hand, pair by pair "
        "| goal | trial less the variance-shift parts ÷ hand | training alone ÷ hand epochs "
        "| same metrics |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        rows = [r for r in result["rows"] if r["counted"]]
        # Lightning's fit against the hand loop's epochs (its recalibration left out)
        fit = [
            r["parts_s"].get("training (Lightning)", 0.0)
            / (r["hand_s"] - r.get("hand_recalibration_s", 0.0))
            for r in rows
        ]
        tuner = [
            (r["trial_s"] - sum(r["parts_s"].get(part, 0.0) for part in SHIFT_PARTS)) / r["hand_s"]
            for r in rows
        ]
        same = sum(r["same_metrics"] for r in rows)
        lines.append(
            f"| {result['task']} | {result['sections']['train']['max_epochs']} "
            f"| {result['set_up_s']:.1f} "
            f"| {spread([r['hand_s'] for r in rows], 2)} "
            f"| {spread([r['trial_s'] for r in rows], 2)} "
            f"| {spread([r['ratio'] for r in rows], 3)} "
            f"| ≤ {GOALS[result['task']]} "
            f"| {spread(tuner, 3)} | {spread(fit, 3)} | {same}/{len(rows)} |"
        )
    return "\n".join(lines)


def parts_table(results: list[dict[str, Any]]) -> str:
    """Each part of a trial as a share of the hand loop's time, pair by pair."""
    names = [r["task"] for r in results]
    lines = [
        "| part of a trial | " + " | ".join(f"{n}, ÷ hand loop" for n in names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for part in PART_NAMES:
        cells = []
        for result in results:
            rows = [r for r in result["rows"] if r["counted"]]
            cells.append(spread([r["parts_s"].get(part, 0.0) / r["hand_s"] for r in rows], 3))
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_lines(memory: dict[str, Any]) -> str:
    rss = memory["rss_mib"]
    early, late = rss[min(4, len(rss) - 1)], rss[-1]
    return (
        f"{memory['trials']} trials of {memory['epochs']} epochs in one process "
        f"({memory['wall_s']:.0f} s): resident memory {early:.0f} MiB after trial "
        f"{min(5, len(rss))}, {late:.0f} MiB after trial {len(rss)}: "
        f"{100 * (late / early - 1):+.1f} % (goal: within ±10 %); "
        f"lowest {min(rss):.0f}, highest {max(rss):.0f} MiB."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tasks, 1 pair, 6 trials")
    parser.add_argument("--pairs", type=int, default=5, help="counted pairs per task")
    parser.add_argument("--memory-trials", type=int, default=50)
    parser.add_argument("--startup-repeats", type=int, default=5)
    parser.add_argument(
        "--only", help="one part: a task by name (e.g. 'digits mlp'), 'startup' or 'memory'"
    )
    parser.add_argument("--results", type=Path, help="where the raw rows go")
    parser.add_argument(
        "--report", action="store_true", help="print the tables of --results again, run nothing"
    )
    # one thread: on a small machine that others share, two busy-waiting OpenMP pools make
    # timings swing tenfold; both sides of a pair run with the same threads
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs, memory_trials = (1, 6) if args.quick else (args.pairs, args.memory_trials)
    default = RESULTS / ("overhead_quick.json" if args.quick else "overhead.json")
    out = args.results or default
    if args.report:
        return print_report(json.loads(out.read_text()))
    pl.seed_everything(0, verbose=False)
    quiet_lightning()

    def wanted(part: str) -> bool:
        return args.only is None or args.only == part

    report: dict[str, Any] = {"machine": machine(), "threads": torch.get_num_threads()}
    if wanted("startup"):  # first, while nothing else of this run competes for the cores
        report["startup"] = run_startup(1 if args.quick else args.startup_repeats)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name, sections in tasks(args.quick).items():
            if wanted(name):
                results.append(run_task(name, sections, pairs, Path(folder)))
        if wanted("memory"):
            report["memory"] = run_memory(memory_trials, 1 if args.quick else 2, Path(folder))
    if results:
        report["tasks"] = results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print(f"\nraw rows: {out}", file=sys.stderr)
    return report


def print_report(report: dict[str, Any]) -> dict[str, Any]:
    print(report["machine"])
    if "startup" in report:
        print(startup_table(report["startup"]) + "\n")
    if report.get("tasks"):
        pairs = sum(r["counted"] for r in report["tasks"][0]["rows"])
        print(
            f"{pairs} pairs per task (after one that is not counted), order alternating; "
            f"{report['threads']} CPU thread(s).\n"
        )
        print(ratio_table(report["tasks"]) + "\n")
        print(parts_table(report["tasks"]) + "\n")
    if "memory" in report:
        print(memory_lines(report["memory"]))
    return report


if __name__ == "__main__":
    main()

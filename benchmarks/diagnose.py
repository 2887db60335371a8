"""Does `autotune diagnose` see the shift the closed form predicts, and does `autotune fix` win
back accuracy, on a model no autotune study made?

A small cnn (conv 8, BN, ReLU, conv 16, nn.Dropout(rate) straight before BN, ReLU, pool, linear)
is trained in plain PyTorch on the training split of digits (the values as they are: the spec
says data.standardize: false), Adam at 1e-2 for 8 epochs, two ways:

- constant: the rate stays at 1e-2 to the end;
- settled: one cycle, the rate falling to nothing, so the weights settle at the end.

Per rate, schedule and seed, autotune.run.repair.fix (what `autotune fix` runs) diagnoses the
weights and recalibrates BN on the training split. Reported: the measured dropout factor of the
BN after the dropout against the closed form v / ((c² + v)/p − c²) from the moments of the
dropout's input, and the accuracy that recalibration wins on the validation and the test
splits, which the training never saw.

    .venv/bin/python benchmarks/diagnose.py           # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/diagnose.py --report  # the table of the saved results

Results: benchmarks/results/diagnose.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from _report import machine
from sklearn.datasets import load_digits

from autotune.core.checks import quiet_lightning
from autotune.core.spec import load_spec
from autotune.nn.data import load_data
from autotune.run.repair import fix

RESULTS = Path(__file__).parent / "results" / "diagnose.json"
RATES = (0.0, 0.3, 0.5, 0.7)  # 0: nn.Dropout(0), BN's lag alone
SEEDS = (0, 1, 2)
SCHEDULES = ("constant", "settled")
EPOCHS, BATCH, LR = 8, 64, 1e-2
MODEL = """
from torch import nn


def build(n_classes=10, rate=0.5):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.Dropout(rate), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes),
    )
"""


def write_task(folder: Path, rate: float) -> Path:
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]
    np.savez(folder / "digits.npz", x=x, label=digits.target)
    (folder / "plaincnn.py").write_text(MODEL)
    spec = {
        "study": {"name": "plain"},
        "data": {"path": "digits.npz", "standardize": False, "test_fraction": 0.2},
        "model": {"import": "plaincnn:build", "kwargs": {"rate": rate}},
        "mlflow": {"enabled": False},
        "output": str(folder / "out"),
    }
    path = folder / f"spec-{rate}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def train(spec_path: Path, rate: float, schedule: str, seed: int) -> tuple[Path, torch.nn.Module]:
    """The cnn trained in plain PyTorch on the training split; its state_dict saved."""
    sys.path.insert(0, str(spec_path.parent))
    import plaincnn

    sys.path.remove(str(spec_path.parent))
    spec = load_spec(spec_path)
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    x, y = data.x_train, data.y_train
    torch.manual_seed(seed)
    model = plaincnn.build(rate=rate)
    optimizer = torch.optim.Adam(model.parameters(), LR)
    total = EPOCHS * -(-len(x) // BATCH)
    lr = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=total)
        if schedule == "settled"
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=total)
    )
    for _ in range(EPOCHS):
        for rows in torch.randperm(len(x)).split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr.step()
    path = spec_path.parent / f"w-{rate}-{schedule}-{seed}.pt"
    torch.save(model.state_dict(), path)
    return path, model


def closed_form(model: torch.nn.Module, batches, rate: float) -> float:
    """Dropout straight before BN: the channel mean of v / ((c² + v)/p − c²), c and v the
    moments of the dropout's input (eval mode) over the training split."""
    seen = []
    hook = model[4].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    hook.remove()
    inputs = torch.cat(seen).double().transpose(0, 1).flatten(1)
    c, v, p = inputs.mean(dim=1), inputs.var(dim=1), 1 - rate
    return float((v / ((c**2 + v) / p - c**2)).mean())


def run() -> list[dict]:
    quiet_lightning()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for rate in RATES:
            spec_path = write_task(Path(folder), rate)
            spec = load_spec(spec_path)
            data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
            for schedule in SCHEDULES:
                for seed in SEEDS:
                    weights, model = train(spec_path, rate, schedule, seed)
                    expected = closed_form(model, data.train_dataloader(), rate)
                    out = Path(folder) / "fixed.pt"
                    done = fix(spec, weights, None, out)
                    layer = next(x for x in done.diagnosis.layers if x.name == "5")
                    rows.append(
                        {
                            "rate": rate,
                            "schedule": schedule,
                            "seed": seed,
                            "delta": layer.delta,
                            "dropout": layer.dropout,
                            "lag": layer.lag,
                            "predicted": layer.predicted,
                            "closed_form": expected,
                            "val_before": done.diagnosis.before["val_acc"],
                            "val_after": done.diagnosis.after["val_acc"],
                            "test_before": done.test["before"]["acc"],
                            "test_after": done.test["after"]["acc"],
                            "written": bool(done.written),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def cell(values: list[float], scale: float = 100.0, signed: bool = True) -> str:
        mean, sd = statistics.mean(values), statistics.stdev(values)
        return f"{scale * mean:{'+' if signed else ''}.1f} ± {scale * sd:.1f}"

    lines = [
        "| rate | training | Δ | dropout factor | closed form | lag | test acc as trained "
        "| val gain | test gain | written |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rate in RATES:
        for schedule in SCHEDULES:
            group = [r for r in rows if r["rate"] == rate and r["schedule"] == schedule]
            mean = {k: statistics.mean(r[k] for r in group) for k in group[0] if k != "schedule"}
            lines.append(
                f"| {rate} | {schedule} | {mean['delta']:.3f} | {mean['dropout']:.3f} "
                f"| {mean['closed_form']:.3f} | {mean['lag']:.3f} "
                f"| {cell([r['test_before'] for r in group], signed=False)} "
                f"| {cell([r['val_after'] - r['val_before'] for r in group])} "
                f"| {cell([r['test_after'] - r['test_before'] for r in group])} "
                f"| {sum(r['written'] for r in group)}/{len(group)} |"
            )
    worst = max(abs(r["dropout"] / r["closed_form"] - 1) for r in rows)
    lines.append("")
    lines.append(f"Largest relative gap, dropout factor against closed form: {100 * worst:.1f} %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="the table of the saved results")
    args = parser.parse_args()
    if not args.report:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"machine": machine(), "rows": run()}, indent=1))
    saved = json.loads(RESULTS.read_text())
    print(saved["machine"])
    print(table(saved["rows"]))


if __name__ == "__main__":
    main()

"""Does the theory predict what training measures? The validation study of the variance shift.

Three questions, each answered with autotune's own code path (fitting.predict before training,
fitting.fit after it, which measures Δ the paper's way and recalibrates BN when asked):

1. Over randomly sampled configurations, how well do Δ's dropout factor and Δ itself (dropout
   factor × lag), predicted before training, rank those measured after it? Spearman's ρ over
   every BN layer that a regulariser reaches, and over the networks' worst layers; and whether
   the layers no regulariser reaches measure a dropout factor of 1. Twice: over the whole
   dropout_bn space (six regularisers), and over plain dropout alone (the paper's setting).
   Beside it, the same prediction made from the trained weights: the theory checked on the very
   network that is measured, which separates "the theory is wrong" from "training changes the
   network".
2. How much accuracy does dropout before BN cost against dropout after the activation, at drop
   rates 0.1, 0.3, 0.5 and 0.7 (every block the same), over several seeds?
3. How much of that does BN recalibration (dropout off, statistics re-estimated) win back?

Run from the repository root:

    .venv/bin/python benchmarks/variance_shift.py              # the numbers in docs/benchmarks.md
    .venv/bin/python benchmarks/variance_shift.py --quick      # a smoke run in about a minute
    .venv/bin/python benchmarks/variance_shift.py --first-seed 3 \
        --results benchmarks/results/variance_shift_heldout.json  # seeds no default saw

It prints markdown tables and writes the raw rows to benchmarks/results/variance_shift.json
(variance_shift_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna
import torch
from _report import machine, spread
from scipy.stats import spearmanr

from autotune.core.checks import quiet_lightning
from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import parse_spec
from autotune.nn.data import load_data
from autotune.nn.fitting import fit, predict
from autotune.nn.prediction import predict_shift
from autotune.nn.probe import probe_batch
from autotune.run.preflight import resolve_space

TEMPLATES = {
    # the quickstart's mlp and the cnn template's defaults, both on scikit-learn's digits
    "mlp": {"template": "mlp", "widths": [256, 256, 128]},
    "cnn": {"template": "cnn", "widths": [32, 64]},
}
RATES = (0.1, 0.3, 0.5, 0.7)
# the search spaces of question 1: the shipped one, and plain dropout alone
SPACES = {"dropout_bn": {}, "dropout only": {"regularizer": "dropout"}}
RESULTS = Path(__file__).parent / "results" / "variance_shift.json"


def make_spec(model: dict, epochs: int, seed: int, recalibrate: bool, params: dict | None = None):
    return parse_spec(
        {
            "study": {"name": "variance-shift", "pruner": "none"},
            "data": {"name": "digits", "batch_size": 64, "test_fraction": 0},
            "model": model,
            "train": {"max_epochs": epochs, "seed": seed, "accelerator": "auto"},
            "search_space": {"params": {"recalibrate_bn": recalibrate, **(params or {})}},
            "mlflow": {"enabled": False},
        }
    )


def correlation_rows(
    template: str, space_name: str, n_configs: int, epochs: int, seed: int
) -> list[dict]:
    """Predicted (at initialisation and from the trained weights) and measured Δ of every BN
    layer, and its dropout factor, for n_configs sampled configurations: the data split, the
    training and (seed + 1) the sampler seeded by `seed`."""
    spec = make_spec(TEMPLATES[template], epochs, seed, False, SPACES[space_name])
    space = resolve_space(spec)
    data = load_data(spec.data, seed=seed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + 1))
    rows = []
    for i in range(n_configs):
        trial = study.ask()
        config = space.sample(trial)
        predicted = predict(spec, config, data)
        result = fit(spec, config, data)
        trained = predict_shift(result.model, probe_batch(data.train_dataloader())).deltas()
        for layer in predicted.layers:
            measured = result.measured[layer.name]
            rows.append(
                {
                    "template": template,
                    "space": space_name,
                    "config": i,
                    "blocks": config.to_dicts(),
                    "layer": layer.name,
                    # reached by a regulariser's noise, straight or through BN layers above
                    "reached": layer.method != "none",
                    "method": layer.method,
                    "seed": seed,
                    "predicted": layer.exact,  # the dropout factor
                    "predicted_delta": layer.delta,  # dropout factor × lag
                    "paper": layer.paper,
                    "predicted_trained": trained[layer.name],  # the dropout factor
                    "measured": measured.delta,
                    "measured_dropout": measured.dropout,
                    "measured_lag": measured.lag,
                    "val_acc": result.value,
                }
            )
        study.tell(trial, result.value)
        print(
            f"  {template} / {space_name} config {i + 1}/{n_configs}: val_acc {result.value:.3f}",
            flush=True,
        )
    return rows


def placement_rows(template: str, seeds: range, epochs: int) -> list[dict]:
    """before_bn against after_act at each rate, plain dropout in every block, BN recalibrated."""
    rows = []
    n_blocks = len(TEMPLATES[template]["widths"])
    for seed in seeds:
        spec = make_spec(TEMPLATES[template], epochs, seed=seed, recalibrate=True)
        data = load_data(spec.data, seed=seed)
        for rate in RATES:
            for placement in ("before_bn", "after_act"):
                block = BlockConfig(placement, rate, "dropout", 0.1)
                config = TrialConfig((block,) * n_blocks, recalibrate_bn=True)
                predicted = predict(spec, config, data)
                result = fit(spec, config, data)
                rows.append(
                    {
                        "template": template,
                        "seed": seed,
                        "rate": rate,
                        "placement": placement,
                        "predicted_worst": predicted.summary.worst_delta,
                        "val_acc": result.final["val_acc_before_recalibration"],
                        "val_acc_recalibrated": result.final["val_acc"],
                    }
                )
                print(
                    f"  {template} seed {seed} rate {rate} {placement}: "
                    f"{rows[-1]['val_acc']:.3f} -> {rows[-1]['val_acc_recalibrated']:.3f}",
                    flush=True,
                )
    return rows


def spearman(xs: list[float], ys: list[float]) -> float:
    return float(spearmanr(xs, ys).statistic) if len(xs) > 2 else math.nan


def correlation_table(rows: list[dict]) -> str:
    """Spearman's ρ, over the BN layers a regulariser reaches, of each prediction against what
    it predicts: the dropout factor (at initialisation, in the paper's form, from the trained
    weights) against the measured dropout factor, and Δ (dropout factor × lag) against the
    measured Δ, per layer and for each network's worst layer. Unreached layers: how many
    measured a dropout factor within 1 ± 0.01."""
    lines = [
        "| template | space | BN layers reached | dropout factor, init vs measured "
        "| paper's form vs measured factor | factor from trained weights vs measured "
        "| Δ, init vs measured | worst Δ of each network, init vs measured "
        "| factor / Δ, networks without alpha dropout | unreached layers with factor 1 ± 0.01 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for template in TEMPLATES:
        for space in SPACES:
            mine = [r for r in rows if r["template"] == template and r["space"] == space]
            reached = [r for r in mine if r["reached"] and r["measured_dropout"] is not None]
            if not reached:
                continue
            factor = [r["measured_dropout"] for r in reached]
            exact = spearman([r["predicted"] for r in reached], factor)
            trained = spearman([r["predicted_trained"] for r in reached], factor)
            with_paper = [r for r in reached if r["paper"] is not None]
            paper = spearman(
                [r["paper"] for r in with_paper], [r["measured_dropout"] for r in with_paper]
            )
            delta = spearman(
                [r["predicted_delta"] for r in reached], [r["measured"] for r in reached]
            )
            worst_pred, worst_meas = [], []
            for key in sorted({(r["seed"], r["config"]) for r in mine}):
                layers = [r for r in mine if (r["seed"], r["config"]) == key]
                worst_pred.append(min(layers, key=_distance("predicted_delta"))["predicted_delta"])
                worst_meas.append(min(layers, key=_distance("measured"))["measured"])
            networks = spearman(worst_pred, worst_meas)
            plain = [r for r in reached if not any(_alpha(b) for b in r["blocks"])]
            plain_factor = spearman(
                [r["predicted"] for r in plain], [r["measured_dropout"] for r in plain]
            )
            plain_delta = spearman(
                [r["predicted_delta"] for r in plain], [r["measured"] for r in plain]
            )
            unreached = [r for r in mine if not r["reached"] and r["measured_dropout"] is not None]
            one = sum(1 for r in unreached if abs(r["measured_dropout"] - 1) <= 0.01)
            lines.append(
                f"| {template} | {space} | {len(reached)} | {exact:.2f} | {paper:.2f} "
                f"({len(with_paper)} layers) | {trained:.2f} | {delta:.2f} | {networks:.2f} "
                f"| {plain_factor:.2f} / {plain_delta:.2f} ({len(plain)} layers) "
                f"| {one}/{len(unreached)} |"
            )
    return "\n".join(lines)


def _alpha(block: dict) -> bool:
    return block["regularizer"] == "alpha_dropout"


def _distance(key: str):
    """Sort key: the most shifted first, Δ and 1/Δ alike (the summary's worst layer)."""
    return lambda row: -abs(math.log(row[key]))


def placement_table(rows: list[dict]) -> str:
    lines = [
        "| template | rate | predicted worst Δ, before_bn | val_acc before_bn | "
        "val_acc after_act | lost by before_bn | before_bn after recalibration | recovered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for template in TEMPLATES:
        for rate in RATES:
            pick = [r for r in rows if r["template"] == template and r["rate"] == rate]
            before = [r for r in pick if r["placement"] == "before_bn"]
            after = [r for r in pick if r["placement"] == "after_act"]
            if not before or not after:
                continue
            lost = [a["val_acc"] - b["val_acc"] for a, b in zip(after, before, strict=True)]
            gain = [b["val_acc_recalibrated"] - b["val_acc"] for b in before]
            predicted = statistics.mean(r["predicted_worst"] for r in before)
            lines.append(
                f"| {template} | {rate} | {predicted:.3f}"
                f" | {spread([r['val_acc'] for r in before], scale=100)}"
                f" | {spread([r['val_acc'] for r in after], scale=100)}"
                f" | {spread(lost, scale=100)} "
                f"| {spread([r['val_acc_recalibrated'] for r in before], scale=100)}"
                f" | {spread(gain, scale=100)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=30, help="sampled configs per template")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the placement study")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first-seed, ... of the placement study; the ranking's data, training and "
        "sampler seeded by it",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the rows go")
    parser.add_argument("--quick", action="store_true", help="3 configs, 1 seed, 3 epochs")
    parser.add_argument(
        "--report", action="store_true", help="print the tables from --results; run nothing"
    )
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.results.read_text())
        print(
            correlation_table(saved["correlation"]),
            placement_table(saved["placements"]),
            sep="\n\n",
        )
        return
    if args.quick:
        args.configs, args.seeds, args.epochs = 3, 1, 3
    torch.set_num_threads(1)
    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    start = time.time()
    correlation = [
        row
        for template in TEMPLATES
        for space in SPACES
        for row in correlation_rows(template, space, args.configs, args.epochs, args.first_seed)
    ]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    placements = [r for t in TEMPLATES for r in placement_rows(t, seeds, args.epochs)]
    elapsed = time.time() - start

    # a smoke run leaves the documented results alone
    results = args.results
    if args.quick and results == RESULTS:
        results = RESULTS.with_name("variance_shift_quick.json")
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"correlation": correlation, "placements": placements}, indent=1))
    print()
    print(
        f"Command: `.venv/bin/python benchmarks/variance_shift.py"
        f"{' --quick' if args.quick else ''}"
        f"{f' --first-seed {args.first_seed}' if args.first_seed else ''}"
        f"{f' --results {args.results}' if args.results != RESULTS else ''}` "
        f"({args.configs} configurations per template, "
        f"{args.seeds} seed(s), {args.epochs} epochs; {elapsed:.0f} s)"
    )
    print(machine())
    print()
    print(correlation_table(correlation))
    print()
    print(placement_table(placements))


if __name__ == "__main__":
    main()

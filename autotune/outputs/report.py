"""Pictures of a study, and one self-contained HTML report of it.

Every picture is drawn from the Optuna storage alone, so a study run on a cluster draws the same
anywhere:

    history.png         each trial's value by trial number, and the best so far
    importances.png     how much each parameter mattered to the value (Optuna's importances)
    shift.png           dropout's factor of Δ, predicted before training against measured after
                        it, a point per BN layer of each trial (Δ itself for trials stored
                        before the factors were measured)
    shift_lag.png       BN's lag, the other factor of Δ, per BN layer against its momentum
    shift_layers.png    the measured Δ of every BN layer in the top trials, as a heat map
    learning_curves.png the metric per epoch of the top trials

`write_figures` writes them as PNG to <output>/figures/; `write_report` embeds them, with the
recommendation and the top trials, in <output>/report.html, which needs nothing else to open.
Each file is written whole or not at all (autotune.core.writes); a disk that refuses is a
WriteError.
A picture that the study cannot draw yet (too few trials, no completed one) is a panel that says
why, never a missing file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.core.direction import better, maximizes
from autotune.core.names import (
    CONFIG_ATTR,
    FIGURES_DIR,
    HISTORY_ATTR,
    MEASURED_SHIFT_ATTR,
    PREDICTED_SHIFT_ATTR,
    REPORT,
    ROBUST_ATTR,
)
from autotune.core.space import block_line
from autotune.core.spec import Spec
from autotune.core.writes import write_atomic
from autotune.outputs.recommendation import folds_said, trust_lines
from autotune.search.endings import GATED, counts_line, ending, ending_counts
from autotune.search.queries import (
    recommended_config,
    recommended_trial,
    top_trials,
)

FIGURES = {
    "history": "Optimisation history",
    "importances": "Parameter importances",
    "shift": "Dropout's factor of Δ per BN layer, predicted against measured",
    "shift_lag": "BN's lag, the other factor of Δ, per BN layer against its momentum",
    "shift_layers": "Measured variance shift per BN layer, top trials",
    "learning_curves": "Learning curves, top trials",
}
# under each picture, how to read it (its title is in the picture)
READING = {
    "history": "A point per trial at its value (a pruned trial at its last epoch, a gated one "
    "marked on the axis: it never trained); the line is the best so far.",
    "importances": "How much of the value's variation each parameter explains (Optuna's "
    "fANOVA importances over the complete trials).",
    "shift": "A point per BN layer of each trial: the dropout factor the theory predicted "
    "before training against the one measured after it. On the diagonal, the theory was right.",
    "shift_lag": "A point per BN layer of each trial: how far BN's running variance lagged the "
    "weights (1: not at all), against the layer's momentum.",
    "shift_layers": "Each BN layer's measured Δ in the best trials; 1 is no shift.",
    "learning_curves": "The metric after each epoch of the best trials.",
}
TOP = 8  # trials in the heat map and the learning curves
NUMBERED_COLUMNS = 15  # the heat map prints each Δ up to this many BN layers
COLORS = {"COMPLETE": "#2b7bba", "PRUNED": "#e6a23c", "FAIL": "#d9534f"}
GATED_COLOR = "#6c757d"


class CannotDraw(Exception):
    """This study has nothing to draw for a picture yet; the message says why."""


def write_figures(study: optuna.Study, folder: Path, metric: str) -> list[Path]:
    """Every picture as <folder>/<name>.png; returns the paths in FIGURES' order."""
    # a Figure of its own, not pyplot: no global state, and the caller's backend untouched
    from matplotlib.figure import Figure

    painters: dict[str, Callable[[Any, optuna.Study, str], None]] = {
        "history": _history,
        "importances": _importances,
        "shift": _shift,
        "shift_lag": _shift_lag,
        "shift_layers": _shift_layers,
        "learning_curves": _learning_curves,
    }
    paths = []
    for name, title in FIGURES.items():
        figure = Figure(figsize=(7, 4.2), dpi=110)
        ax = figure.subplots()
        try:
            painters[name](ax, study, metric)
        except Exception as exc:  # nothing to draw yet, or a study this code did not expect
            reason = str(exc) if isinstance(exc, CannotDraw) else f"could not draw: {exc!r}"
            figure.clear()
            ax = figure.subplots()
            ax.axis("off")
            ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=11)
        ax.set_title(title)
        figure.tight_layout()
        png = io.BytesIO()
        figure.savefig(png, format="png")
        paths.append(write_atomic(folder / f"{name}.png", png.getvalue()))
    return paths


def _history(ax: Any, study: optuna.Study, metric: str) -> None:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if not trials:
        raise CannotDraw("no trial has finished yet")
    if all(_value(t) is None for t in trials):
        raise CannotDraw("no finished trial has a value yet: every one failed or stopped early")
    maximize = maximizes(study)
    for state, color in COLORS.items():
        shown = [t for t in trials if t.state.name == state and _value(t) is not None]
        if shown:
            label = "pruned in training" if state == "PRUNED" else state.lower()
            ax.scatter(
                [t.number for t in shown],
                [_value(t) for t in shown],
                s=18,
                color=color,
                label=label,
            )
    gated = [t.number for t in trials if ending(t) == GATED]
    if gated:  # no value to plot: a mark on the axis at the worst end, where it would have been
        low, high = ax.get_ylim()
        ax.scatter(
            gated,
            [low if maximize else high] * len(gated),
            s=22,
            marker="x",
            color=GATED_COLOR,
            clip_on=False,
            label="gated before training",
        )
    best, line = None, []
    for trial in sorted(trials, key=lambda t: t.number):
        value = trial.value if trial.state == TrialState.COMPLETE else None
        if value is not None and (best is None or better(value, best, maximize)):
            best = value
        line.append((trial.number, best))
    drawn = [(n, b) for n, b in line if b is not None]
    if drawn:
        ax.step(*zip(*drawn, strict=True), where="post", color="black", lw=1.2, label="best")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (pruned: at its last epoch)")
    ax.legend(loc="best", fontsize=8)


def _value(trial: FrozenTrial) -> float | None:
    """A complete trial's value; a pruned one's last reported value."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def _importances(ax: Any, study: optuna.Study, metric: str) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        raise CannotDraw(f"importances need 3 complete trials; there are {len(complete)}")
    try:
        with warnings.catch_warnings():  # "few trials in a regime": true early in any study
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # every parameter fixed, one value each, ...
        raise CannotDraw(f"no importances: {exc}") from None
    if not importances:
        raise CannotDraw("no parameter varied across the complete trials")
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color=COLORS["COMPLETE"])
    ax.set_xlabel(f"importance for {metric} (Optuna's default evaluator), summing to 1")
    ax.tick_params(axis="y", labelsize=8)


def _shift(ax: Any, study: optuna.Study, metric: str) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    both = [
        t
        for t in complete
        if PREDICTED_SHIFT_ATTR in t.user_attrs and MEASURED_SHIFT_ATTR in t.user_attrs
    ]
    if not both:
        raise CannotDraw("no complete trial has both a predicted and a measured Δ")
    # dropout's factor where the trials measured it; Δ itself from a study stored before that
    factored = any("dropout" in t.user_attrs[MEASURED_SHIFT_ATTR] for t in both)
    rows = []
    for trial in both:
        measured = trial.user_attrs[MEASURED_SHIFT_ATTR]
        measured = measured.get("dropout") if factored else measured
        if measured is None:
            continue
        predicted = trial.user_attrs[PREDICTED_SHIFT_ATTR]["layers"]
        rows.extend(
            (predicted[name]["exact"], value, trial.value)
            for name, value in measured["layers"].items()
            if name in predicted
        )
    if not rows:
        raise CannotDraw("no BN layer has both a predicted and a measured Δ")
    predicted, measured, values = zip(*rows, strict=True)
    points = ax.scatter(predicted, measured, c=values, cmap="viridis", s=18)
    ax.figure.colorbar(points, ax=ax, label=metric)
    low = min(min(predicted), min(measured), 0.9)
    high = max(max(predicted), max(measured), 1.1)
    ax.plot([low, high], [low, high], color="grey", lw=1, ls="--", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dropout's Δ predicted before training (a point per BN layer and trial)")
    if factored:
        ax.set_ylabel("dropout's factor of Δ measured after training")
    else:
        ax.set_ylabel("Δ measured after training (dropout × BN lag: not factored)")
    ax.legend(loc="best", fontsize=8)


def _shift_lag(ax: Any, study: optuna.Study, metric: str) -> None:
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        measured = trial.user_attrs.get(MEASURED_SHIFT_ATTR, {})
        if "lag" not in measured:
            continue
        rows.extend(
            (momentum, measured["lag"]["layers"][name], trial.value)
            for name, momentum in measured["momentum"].items()
            if momentum is not None  # a cumulative average has no momentum to draw against
        )
    if not rows:
        raise CannotDraw(
            "no complete trial measured BN's lag (trials stored before autotune split Δ have none)"
        )
    momenta, lags, values = zip(*rows, strict=True)
    points = ax.scatter(momenta, lags, c=values, cmap="viridis", s=18)
    ax.figure.colorbar(points, ax=ax, label=metric)
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="no lag")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("BN momentum (a point per BN layer and trial)")
    ax.set_ylabel("BN's lag measured after training")
    ax.legend(loc="best", fontsize=8)


def _shift_layers(ax: Any, study: optuna.Study, metric: str) -> None:
    top = [t for t in top_trials(study, TOP) if MEASURED_SHIFT_ATTR in t.user_attrs]
    if not top:
        raise CannotDraw("no complete trial has a measured Δ")
    layers = list(top[0].user_attrs[MEASURED_SHIFT_ATTR]["layers"])
    grid = [
        [t.user_attrs[MEASURED_SHIFT_ATTR]["layers"].get(name, math.nan) for name in layers]
        for t in top
    ]
    logs = [[math.log(v) if v and v > 0 else math.nan for v in row] for row in grid]
    reach = max((abs(v) for row in logs for v in row if not math.isnan(v)), default=0.0) or 0.1
    # a column a layer: deep networks get a wider picture, and numbers only while they fit
    ax.figure.set_size_inches(max(7.0, 3.0 + 0.4 * len(layers)), 4.2)
    image = ax.imshow(logs, cmap="coolwarm", vmin=-reach, vmax=reach, aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="log Δ (0: no shift)")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(top)), [f"trial {t.number} ({t.value:.3f})" for t in top], fontsize=8)
    if len(layers) <= NUMBERED_COLUMNS:
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)


def _learning_curves(ax: Any, study: optuna.Study, metric: str) -> None:
    top = top_trials(study, TOP)
    if not top:
        raise CannotDraw("no trial has completed yet")
    for trial in top:
        history = trial.user_attrs.get(HISTORY_ATTR) or [
            {"epoch": step, metric: value} for step, value in trial.intermediate_values.items()
        ]
        points = [(row["epoch"], row[metric]) for row in history if metric in row]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", lw=1, label=f"trial {trial.number}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(loc="best", fontsize=7, ncol=2)


def write_report(study: optuna.Study, spec: Spec) -> Path:
    """<output>/report.html: the study's pictures, embedded, with its recommendation and top
    trials. One file: it opens anywhere, offline."""
    out = spec.output_dir
    metric = spec.study.metric
    figures = write_figures(study, out / FIGURES_DIR, metric)
    best = recommended_trial(study, spec)
    chosen = recommended_config(study, spec)
    parts = [
        f"<h1>autotune study {_e(study.study_name)}</h1>",
        f"<p>trials: {_e(counts_line(ending_counts(study)))}</p>",
    ]
    if best is not None and chosen is not None:
        name, config = chosen
        value = f", {_e(metric)} = {best.value:.4f}" if name == f"trial {best.number}" else ""
        parts.append(
            f"<h2>Recommended: {_e(name)}{value}</h2>"
            + html_table(
                ["block", "placement", "rate", "regularizer", "BN momentum"],
                [
                    [
                        i,
                        b["placement"],
                        "-" if b["placement"] == "none" else f"{b['rate']:.3f}",
                        "-" if b["placement"] == "none" else b["regularizer"],
                        f"{b['bn_momentum']:.3g}",
                    ]
                    for i, b in enumerate(config.to_dicts())
                ],
            )
            + f"<p>recalibrate_bn: {str(config.recalibrate_bn).lower()}</p>"
        )
        parts += [f'<p class="trust">{_e(line.strip())}</p>' for line in trust_lines(study, spec)]
    robust = study.user_attrs.get(ROBUST_ATTR)
    if robust is not None and best is not None and robust.get("choice") == best.number:
        parts.append(
            f"<h2>Trained again over {_e(_over(robust))}, ranked by the {_e(robust['by'])}</h2>"
            + html_table(
                ["configuration", "trial", f"mean {metric}", "sd", "95 % bound", "values"],
                [
                    [
                        row["name"],
                        "-" if row["trial"] is None else row["trial"],
                        *(
                            [f"{row[k]:.4f}" for k in ("mean", "sd", "bound")]
                            if "failed" not in row
                            else ["failed", "-", row["failed"]]
                        ),
                        ", ".join(f"{v:.4f}" for v in row["values"]),
                    ]
                    for row in robust["rows"]
                ],
            )
        )
    parts.append(f"<h2>Top trials</h2>{_top_table(study, metric)}")
    for path, (name, title) in zip(figures, FIGURES.items(), strict=True):
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img id="{name}" alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(READING[name])}</figcaption></figure>"
        )
    page = TEMPLATE.format(title=_e(f"autotune: {study.study_name}"), body="\n".join(parts))
    return write_atomic(out / REPORT, page)


def _over(robust: dict) -> str:
    folds = robust.get("folds")
    return f"seeds {robust['seeds']}" if folds is None else folds_said(folds)


def _top_table(study: optuna.Study, metric: str) -> str:
    rows = []
    for trial in top_trials(study, TOP):
        blocks = trial.user_attrs.get(CONFIG_ATTR, [])
        measured = trial.user_attrs.get(MEASURED_SHIFT_ATTR) or {}
        rows.append(
            [
                trial.number,
                f"{trial.value:.4f}",
                "; ".join(block_line(i, b) for i, b in enumerate(blocks)),
                _worst(trial.user_attrs.get(PREDICTED_SHIFT_ATTR)),
                *(
                    _worst(part)
                    for part in (measured.get("dropout"), measured.get("lag"), measured)
                ),
            ]
        )
    columns = ["worst dropout factor", "worst BN lag", "worst Δ"]
    header = ["trial", metric, "blocks", "worst dropout factor predicted"]
    return html_table([*header, *(f"{c} measured" for c in columns)], rows)


def _worst(part: dict | None) -> str:
    """The worst layer's value of a measured shift or factor; - where the trial has none."""
    return f"{part['summary']['worst_delta']:.3f}" if part else "-"


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _e(value: Any) -> str:
    return html.escape(str(value))


# the script marks the page once every picture has loaded, for whoever checks it (a test)
TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
figure {{ margin: 2rem 0; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9rem; }}
</style>
</head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const images = [...document.images];
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0);
  document.body.dataset.images = `${{loaded.length}}/${{images.length}}`;
}});
</script>
</body>
</html>
"""

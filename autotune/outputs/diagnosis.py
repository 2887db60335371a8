"""A trained network's diagnosis (autotune.nn.diagnosis) in words: the lines `autotune diagnose`
prints, at most 80 columns wide, and the same as one HTML page in the report's style."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from autotune.outputs.report import TEMPLATE, html_table

if TYPE_CHECKING:
    from autotune.nn.diagnosis import Diagnosis, LayerDiagnosis

NAME_WIDTH = 20  # a longer layer name keeps its end, which tells layers apart
# a first BN layer off by more than this, with no regulariser before it: the data is not what
# the model trained on, rather than a shift that dropout made
ELSEWHERE = 0.25
COLUMNS = ("Δ", "dropout", "lag", "predicted", "after fix")
HEADER_NOTE = (
    "Δ = BN input variance at inference / running_var = dropout × lag; predicted: the theory's "
    "dropout factor from these weights; after fix: Δ once BN is recalibrated, dropout off"
)


def diagnosis_lines(diagnosis: Diagnosis) -> list[str]:
    """The table of layers, then what recalibration wins and what to do about it."""
    lines = [f"{'layer':<{NAME_WIDTH}}" + "".join(f"{c:>10}" for c in COLUMNS)]
    for layer in diagnosis.layers:
        lines.append(
            f"{_short(layer.name):<{NAME_WIDTH}}"
            + "".join(f"{v:>10.3f}" for v in _values(layer))
            + ("  shifted" if layer.shifted else "")
        )
    return [*lines, *verdict_lines(diagnosis)]


def verdict_lines(diagnosis: Diagnosis) -> list[str]:
    """What recalibration wins (score_lines), then what to do about it."""
    lines = score_lines(diagnosis)
    first = diagnosis.layers[0] if diagnosis.layers else None
    if first is not None and first.dropout == 1.0 and abs(first.delta - 1) > ELSEWHERE:
        lines += [
            f"{first.name}, which no regulariser reaches, has Δ {first.delta:.2f}:",
            "  is this the data the model trained on, scaled as it was (data.standardize)?",
        ]
    if not diagnosis.needs_fix:
        lines.append("no layer is shifted and recalibration wins nothing: nothing to fix")
    elif diagnosis.gain > 0:
        if not diagnosis.shifted:  # a layer's mean over its channels hides what each is off by
            lines.append("no layer's mean Δ is off, but some channels' statistics lag the weights")
        lines.append("`autotune fix` writes the recalibrated weights")
    else:
        lines += [
            "recalibration wins nothing here: the weights may have adapted to the shift;",
            "  retrain, or tune (autotune run)",
        ]
    return lines


def score_lines(diagnosis: Diagnosis) -> list[str]:
    """How many layers are shifted, and the validation accuracy before and after
    recalibration, with what one validation row is worth."""
    from autotune.nn.diagnosis import SHIFTED

    shifted, n = len(diagnosis.shifted), len(diagnosis.layers)
    before, after = diagnosis.before["val_acc"], diagnosis.after["val_acc"]
    return [
        f"{n} BN layer{'s' * (n != 1)}, {shifted} shifted (Δ off 1 by over "
        f"{100 * SHIFTED:.0f} %), measured on {diagnosis.train_rows} training rows",
        f"val_acc {before:.4f} as trained, {after:.4f} with BN recalibrated: "
        f"{100 * diagnosis.gain:+.2f} points",
        f"  over {diagnosis.val_rows} validation rows; one row is worth "
        f"{100 / diagnosis.val_rows:.2f} points",
    ]


def diagnosis_page(diagnosis: Diagnosis, title: str) -> str:
    """The diagnosis as one self-contained HTML page."""
    rows = [
        [
            layer.name,
            *(f"{v:.3f}" for v in _values(layer)),
            layer.method,
            "-" if layer.momentum is None else layer.momentum,
            "shifted" if layer.shifted else "",
        ]
        for layer in diagnosis.layers
    ]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(HEADER_NOTE)}</p>",
        html_table(
            ["layer", *COLUMNS, "predicted by", "BN momentum", ""],
            rows,
        ),
        *(f"<p>{html.escape(line.strip())}</p>" for line in verdict_lines(diagnosis)),
    ]
    return TEMPLATE.format(title=html.escape(title), body="\n".join(body))


def _short(name: str) -> str:
    return name if len(name) < NAME_WIDTH else "…" + name[-(NAME_WIDTH - 2) :]


def _values(layer: LayerDiagnosis) -> tuple[float, ...]:
    """A layer's figures in the order of COLUMNS."""
    return (layer.delta, layer.dropout, layer.lag, layer.predicted, layer.recalibrated)

"""What the end of a run prints: the top trials as a table that reads at 80 columns, how every
trial ended, how far to trust the recommendation, and where the outputs are. Also the table of
`autotune predict`.

No cell is ever cut: a block is a line of its own ("1 dropout after_bn 0.33 m=0.11"), numbers
are rounded for display, and a line too long for the terminal wraps at a space or folds,
never ends in "…". That holds piped (CI logs, `make demo | tee`) as well as in a terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from autotune.core.direction import maximizes
from autotune.core.names import (
    CONFIG_ATTR,
    FAIL_REASON_ATTR,
    FIGURES_DIR,
    INPUT_STATS,
    MEASURED_SHIFT_ATTR,
    PREDICTED_SHIFT_ATTR,
)
from autotune.core.redaction import redact
from autotune.core.space import block_line
from autotune.core.spec import Spec
from autotune.run.loop import MAX_FAILURES_IN_A_ROW
from autotune.run.session import StudyOutcome
from autotune.search.endings import (
    COMPLETE,
    FAILED,
    GATED,
    INTERRUPTED,
    PRUNED,
    counts_line,
    ending,
    ending_counts,
)
from autotune.search.mlflow_store import trials_link
from autotune.search.queries import recommended_config, recommended_weights, top_trials

if TYPE_CHECKING:  # no torch at import time: the CLI's start-up stays fast
    import optuna

    from autotune.core.space import TrialConfig
    from autotune.nn.prediction import NetworkPrediction

STYLES = {COMPLETE: "green", PRUNED: "yellow", GATED: "cyan", FAILED: "red", INTERRUPTED: "magenta"}
# Δ = dropout × lag (shift.factor_shift): the measured Δ of its worst layer is shown with that
# layer's two factors, beside the worst dropout factor predicted before training
SHIFT_CAPTION = (
    "blocks: a line each, regulariser, placement, drop rate, BN momentum m. "
    "dropout: the shift the regularisers cause; lag: BN's running statistics behind the weights"
)


def summary_table(study: optuna.Study, metric: str, finished: int, k: int = 5) -> Table:
    """The top k complete trials: trial, metric, the blocks a line each, the worst dropout
    factor predicted, and the measured Δ of the worst layer with its two factors."""
    table = Table(
        title=f"study {study.study_name!r}: top {k} of {finished} finished trials",
        caption=SHIFT_CAPTION,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    for name in ("trial", metric, "blocks", "dropout\npredicted", "Δ measured\n=dropout×lag"):
        table.add_column(name, justify="left" if name == "blocks" else "right", overflow="fold")
    for trial in top_trials(study, k):
        blocks = trial.user_attrs.get(CONFIG_ATTR, [])
        table.add_row(
            str(trial.number),
            f"{trial.value:.4f}",
            "\n".join(block_line(i, block) for i, block in enumerate(blocks)) or "-",
            _delta_cell(trial.user_attrs.get(PREDICTED_SHIFT_ATTR)),
            _factored_cell(trial.user_attrs.get(MEASURED_SHIFT_ATTR)),
        )
    return table


def print_summary(
    console: Console, spec: Spec, outcome: StudyOutcome, spec_file: Path | None = None
) -> None:
    """The top trials as a table, how the trials ended, the recommendation's trust, then
    where the outputs are and how to look at them."""
    study = outcome.study
    console.print(summary_table(study, spec.study.metric, outcome.finished))
    console.print("trials: " + styled_counts(ending_counts(study)), soft_wrap=True)
    from autotune.outputs.recommendation import trust_lines  # torch

    for line in trust_lines(study, spec):
        console.print(line)
    if outcome.stopped_by_failures:
        console.print(
            f"[red]stopped: {MAX_FAILURES_IN_A_ROW} trials failed in a row[/]; the last "
            f"reason: {_last_failure(study)}"
        )
    for line in output_lines(spec, outcome, spec_file):
        console.print(line, soft_wrap=True, highlight=False)
    for line in compare_lines(spec, outcome):
        console.print(line, soft_wrap=True, highlight=False)


def compare_lines(spec: Spec, outcome: StudyOutcome) -> list[str]:
    """Where to compare the trials in MLflow: the server's page of them, or the `mlflow ui`
    command and that page on it."""
    if not spec.mlflow.enabled:
        return []
    uri = redact(spec.tracking_uri)
    server = uri.startswith(("http://", "https://"))
    lines = [] if server else [f"compare trials: mlflow ui --backend-store-uri {uri}"]
    if outcome.experiment_id is None:  # MLflow did not answer at the end
        return lines or [f"compare trials: {uri}"]
    page = trials_link(
        uri if server else "http://127.0.0.1:5000",
        outcome.experiment_id,
        spec.study.name,
        spec.study.metric,
        maximizes(outcome.study),
    )
    return [*lines, f"{'compare trials' if server else 'then open'}: {page}"]


def styled_counts(counts: dict[str, int]) -> str:
    """The counts line with each ending in its colour: "8 complete, 2 pruned, ..."."""
    return ", ".join(
        f"[{STYLES[kind]}]{part}[/]" if kind in STYLES else part
        for kind, part in zip(counts, counts_line(counts).split(", "), strict=True)
    )


def output_lines(spec: Spec, outcome: StudyOutcome, spec_file: Path | None) -> list[str]:
    """Each output the study left, a line each, with what it is for."""
    lines = [f"wrote {path}" for path in outcome.outputs]
    out = spec.output_dir
    if outcome.outputs and recommended_config(outcome.study, spec) is not None:
        weights, _ = recommended_weights(outcome.study, spec)
        if weights.is_file():
            lines.append(f"weights: {weights} (best_model.py loads them)")
    if (out / INPUT_STATS).is_file():
        lines.append(f"inputs: {out / INPUT_STATS} (the standardisation they expect)")
    figures = sorted((out / FIGURES_DIR).glob("*.png"))
    if figures:
        lines.append(f"figures: {out / FIGURES_DIR}/, {len(figures)} PNG")
        lines.append(f"a page of it all: autotune report {spec_file or 'SPEC'}")
    return lines


def block_cell(block: dict) -> str:
    """A block as `predict` says it: "dropout@after_act 0.10, m=0.1"."""
    if block["placement"] == "none":
        return f"none, m={block['bn_momentum']:.3g}"
    return (
        f"{block['regularizer']}@{block['placement']} {block['rate']:.2f}, "
        f"m={block['bn_momentum']:.3g}"
    )


def print_prediction(console: Console, config: TrialConfig, prediction: NetworkPrediction) -> None:
    """`autotune predict`: the configuration, then Δ per BN layer and the network's summary."""
    for i, block in enumerate(config.to_dicts()):
        console.print(f"block{i}: {block_cell(block)}")
    console.print(f"recalibrate_bn: {str(config.recalibrate_bn).lower()}")
    table = Table(
        title="predicted variance shift Δ = Var_test / Var_train of each BN input",
        caption="Δ = dropout × lag: the shift the regularisers cause, and BN's running "
        "statistics behind the weights",
    )
    numbers = ("dropout", "lag", "Δ", "paper's form")
    for column in ("BN layer", "fed by", "dropout", "lag", "Δ", "method", "paper's form"):
        table.add_column(column, justify="right" if column in numbers else "left")
    for layer in prediction.layers:
        paper = "-" if layer.paper is None else f"{layer.paper:.3f}"
        sources = ", ".join(layer.sources) or "-"
        table.add_row(
            layer.name,
            sources,
            f"{layer.exact:.3f}",
            f"{layer.lag:.3f}",
            f"{layer.delta:.3f}",
            layer.method,
            paper,
        )
    console.print(table)
    summaries = (
        ("dropout", prediction.summary),
        ("Δ", prediction.delta_summary),
    )
    for what, summary in summaries:
        worst = "none" if summary.worst_layer is None else f"{summary.worst_layer}"
        console.print(
            f"worst layer by {what}: {worst} ({what} = {summary.worst_delta:.3f}); "
            f"product along the path: {summary.product:.3f}"
        )


def _delta_cell(shift: dict | None) -> str:
    """A trial's worst Δ from its predicted_shift or measured_shift attribute."""
    if not shift:
        return "-"
    return f"{shift['summary']['worst_delta']:.3f}"


def _factored_cell(measured: dict | None) -> str:
    """The measured Δ of the worst layer, over its two factors where the trial measured them
    (a study stored before the factors has Δ alone)."""
    if not measured:
        return "-"
    worst = measured["summary"]["worst_layer"]
    if "dropout" not in measured or worst is None:
        return _delta_cell(measured)
    dropout, lag = measured["dropout"]["layers"][worst], measured["lag"]["layers"][worst]
    return f"{measured['summary']['worst_delta']:.3f}\n={dropout:.3f}×{lag:.3f}"


def _last_failure(study: optuna.Study) -> str:
    failed = [t for t in study.get_trials(deepcopy=False) if ending(t) == FAILED]
    return failed[-1].user_attrs.get(FAIL_REASON_ATTR, "unknown") if failed else "unknown"

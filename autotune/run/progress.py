"""What the user sees while a study runs: a bar over trials with the best value so far, and the
running trial's epochs. Where stderr is not a terminal (CI, a log file), one line per trial."""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from autotune.core.names import (
    CONFIG_ATTR,
    FAIL_REASON_ATTR,
    MEASURED_SHIFT_ATTR,
    PREDICTED_SHIFT_ATTR,
)
from autotune.core.redaction import redact
from autotune.core.spec import Spec
from autotune.run.loop import MAX_FAILURES_IN_A_ROW, Observer
from autotune.run.session import StudyOutcome
from autotune.search.queries import (
    FINISHED,
    best_trial,
    state_counts,
    top_trials,
)

if TYPE_CHECKING:  # no torch at import time: the CLI's start-up stays fast
    from autotune.core.space import TrialConfig
    from autotune.nn.prediction import NetworkPrediction


class RichProgress(Observer):
    def __init__(self, console: Console, metric: str, max_epochs: int) -> None:
        self.console, self.metric, self.max_epochs = console, metric, max_epochs
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
        )
        self.trials = self.bar.add_task("trials", total=1, note="", visible=False)
        self.total = 1
        self.epochs = self.bar.add_task("", total=max_epochs, note="", visible=False)

    def start(self, study: optuna.Study, total: int) -> None:
        self.total = total
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        self.bar.update(
            self.trials,
            total=total,
            completed=min(done, total),
            note=self._best(study),
            visible=True,
        )
        if done:
            self.console.print(
                f"resuming study {study.study_name!r}: {done} of {total} trials done"
            )
        self.bar.start()

    def epoch(self, trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None:
        self.bar.update(
            self.epochs,
            description=f"trial {trial.number}",
            completed=epoch,
            note=f"{self.metric}={metrics[self.metric]:.4f}",
            visible=True,
        )

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # the whole study's count: other workers finish trials too
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        self.bar.update(self.trials, completed=min(done, self.total), note=self._best(study))
        self.bar.update(self.epochs, visible=False, completed=0)
        if not self.console.is_terminal:
            value = "" if trial.value is None else f" {self.metric}={trial.value:.4f}"
            reason = trial.user_attrs.get(FAIL_REASON_ATTR, "")
            self.console.print(
                f"trial {trial.number} {trial.state.name}{value} {reason}".rstrip()
                + f" | {self._best(study)}"
            )

    def waiting(self, study: optuna.Study, running: int) -> None:
        note = f"{self._best(study)} | waiting: {running} trials running take the rest"
        self.bar.update(self.trials, note=note)

    def note(self, message: str) -> None:
        self.console.print(message, soft_wrap=True)

    def close(self) -> None:
        self.bar.stop()

    def _best(self, study: optuna.Study) -> str:
        best = best_trial(study)
        if best is None:
            return "best: -"
        return f"best {self.metric}={best.value:.4f} (trial {best.number})"


def state_style(state: TrialState) -> str:
    return {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state.name, "")


# Δ = dropout × lag (shift.factor_shift): the measured Δ of its worst layer is shown with that
# layer's two factors, beside the worst dropout factor predicted before training
SHIFT_CAPTION = (
    "dropout: the shift the regularisers cause; lag: BN's running statistics behind the weights"
)


def print_summary(console: Console, spec: Spec, outcome: StudyOutcome, k: int = 5) -> None:
    """The top trials as a table, then where the outputs are and how to look at them."""
    study = outcome.study
    table = Table(
        title=f"study {study.study_name!r}: top {k} of {outcome.finished} finished trials"
    )
    table.add_column("trial", justify="right")
    table.add_column(spec.study.metric, justify="right")
    top = top_trials(study, k)
    for i in range(max((len(t.user_attrs.get(CONFIG_ATTR, [])) for t in top), default=0)):
        table.add_column(f"block{i}")
    table.add_column("dropout\npredicted", justify="right")
    table.add_column("Δ measured\n= dropout × lag", justify="right")
    table.caption = SHIFT_CAPTION
    for trial in top:
        blocks = [_block_cell(block) for block in trial.user_attrs.get(CONFIG_ATTR, [])]
        shifts = [
            _delta_cell(trial.user_attrs.get(PREDICTED_SHIFT_ATTR)),
            _factored_cell(trial.user_attrs.get(MEASURED_SHIFT_ATTR)),
        ]
        table.add_row(str(trial.number), f"{trial.value:.4f}", *blocks, *shifts)
    console.print(table)
    stored = state_counts(study)
    counts = {name: stored.get(name, 0) for name in ("COMPLETE", "PRUNED", "FAIL")}
    console.print(
        "trials: "
        + ", ".join(
            f"[{state_style(TrialState[name])}]{n} {name.lower()}[/]" for name, n in counts.items()
        )
    )
    from autotune.outputs.recommendation import trust_lines  # torch

    for line in trust_lines(study, spec):
        console.print(line, soft_wrap=True)
    if outcome.stopped_by_failures:
        console.print(
            f"[red]stopped: {MAX_FAILURES_IN_A_ROW} trials failed in a row[/]; the last "
            f"reason: {_last_failure(study)}"
        )
    for path in outcome.outputs:
        console.print(f"wrote {path}", soft_wrap=True)
    uri = redact(spec.tracking_uri)
    if spec.mlflow.enabled and uri.startswith(("http://", "https://")):
        console.print(f"compare trials: {uri}", soft_wrap=True)
    elif spec.mlflow.enabled:
        console.print(f"compare trials: mlflow ui --backend-store-uri {uri}", soft_wrap=True)


def print_prediction(console: Console, config: TrialConfig, prediction: NetworkPrediction) -> None:
    """`autotune predict`: the configuration, then Δ per BN layer and the network's summary."""
    for i, block in enumerate(config.to_dicts()):
        console.print(f"block{i}: {_block_cell(block)}")
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
    """The measured Δ of the worst layer, with that layer's two factors where the trial
    measured them (a study stored before the factors has Δ alone)."""
    if not measured:
        return "-"
    worst = measured["summary"]["worst_layer"]
    if "dropout" not in measured or worst is None:
        return _delta_cell(measured)
    dropout, lag = measured["dropout"]["layers"][worst], measured["lag"]["layers"][worst]
    return f"{measured['summary']['worst_delta']:.3f} = {dropout:.3f} × {lag:.3f}"


def _block_cell(block: dict) -> str:
    if block["placement"] == "none":
        return f"none, m={block['bn_momentum']:.3g}"
    return (
        f"{block['regularizer']}@{block['placement']} {block['rate']:.2f}, "
        f"m={block['bn_momentum']:.3g}"
    )


def _last_failure(study: optuna.Study) -> str:
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return failed[-1].user_attrs.get(FAIL_REASON_ATTR, "unknown") if failed else "unknown"

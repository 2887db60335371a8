"""What the user sees while a study runs: a bar over trials with the time left, the running
trial's epochs with its own clock, the best so far and live counts of how the trials ended; and a
line per finished trial saying how it ended and why (complete, pruned after epoch k by which
rule, gated before training by what it predicted, failed with the first line of the reason).
Where stderr is not a terminal (CI, a log file), the lines alone, each with the best so far."""

from __future__ import annotations

import time
from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from autotune.run.loop import Observer
from autotune.search.endings import counts_line, ending_counts, told
from autotune.search.queries import FINISHED, best_trial


class _Bars(Progress):
    """Rich's Progress with a status line under its bars: the best so far and the counts."""

    status = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.status:
            yield Text(self.status, overflow="fold")


class RichProgress(Observer):
    def __init__(self, console: Console, metric: str, max_epochs: int) -> None:
        self.console, self.metric, self.max_epochs = console, metric, max_epochs
        self.bar = _Bars(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
        )
        self.trials = self.bar.add_task("trials", total=1, note="", visible=False)
        self.total = 1
        self.epochs = self.bar.add_task("", total=max_epochs, note="", visible=False)
        # the time left: this run's pace since it started, over the trials left
        self.began, self.done_at_start = time.monotonic(), 0

    def start(self, study: optuna.Study, total: int) -> None:
        self.total = total
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        self.began, self.done_at_start = time.monotonic(), done
        self.bar.reset(self.trials, total=total, completed=min(done, total), visible=True)
        self.bar.status = self._status(study)
        if done:
            self.console.print(
                f"resuming study {study.study_name!r}: {done} of {total} trials done"
            )
        self.bar.start()

    def trial_start(self, trial: optuna.Trial) -> None:
        # a clock of its own: reset, not the last trial's task with its finished time
        self.bar.reset(
            self.epochs,
            total=self.max_epochs,
            description=f"trial {trial.number}",
            note="predicting Δ",
            visible=True,
        )

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
        self.bar.update(self.trials, completed=min(done, self.total), note=self._left(done))
        self.bar.update(self.epochs, visible=False, completed=0)
        best = best_trial(study)
        self.bar.status = self._status(study, best)
        line = f"trial {trial.number} {told(trial, self.metric)}{_took(trial)}"
        if not self.console.is_terminal and best is not None:  # no bar to read it from
            line += f" · best {best.value:.4f} (trial {best.number})"
        self.console.print(line, soft_wrap=True, highlight=False, markup=False)  # a line each

    def waiting(self, study: optuna.Study, running: int) -> None:
        self.bar.status = f"{self._status(study)} | waiting: {running} trials running take the rest"

    def note(self, message: str) -> None:  # whole, never cut: a terminal wraps it
        self.console.print(message, soft_wrap=True, highlight=False)

    def close(self) -> None:
        self.bar.stop()

    def _status(self, study: optuna.Study, best: FrozenTrial | None = None) -> str:
        """The line under the bars: the best so far (`best`, or read) and the counts."""
        best = best or best_trial(study)
        return f"{self._best(best)} · {counts_line(ending_counts(study))}"

    def _best(self, best: FrozenTrial | None) -> str:
        if best is None:
            return "best: none complete yet"
        return f"best {self.metric}={best.value:.4f} (trial {best.number})"

    def _left(self, done: int) -> str:
        """About how long the trials left take at this run's pace so far."""
        finished_here = done - self.done_at_start
        if finished_here <= 0 or done >= self.total:
            return ""
        seconds = (time.monotonic() - self.began) / finished_here * (self.total - done)
        return f"about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _took(trial: FrozenTrial) -> str:
    start, end = trial.datetime_start, trial.datetime_complete
    if start is None or end is None:
        return ""
    return f" ({_duration((end - start).total_seconds())})"

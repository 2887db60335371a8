"""The trial loop: trials run one after another until the budget is spent, failures in a row,
the timeout or a signal stop them (`run_trials`); the budget every worker shares (`Budget`); and
`run_study`, which opens a session, runs its trials and finishes the study.

`n_trials` is the budget of the whole study: the number of trials that finished (COMPLETE or
PRUNED), across reruns and across every worker that shares the study. Running the same spec again
loads the same study from its storage and runs only what is missing; a failed trial does not use
the budget, but five failures in a row stop the run, since something is wrong with more than one
configuration.

Several workers (processes, nodes) share a study through its storage. A worker starts a trial
only while the finished and running trials leave room in the budget; when they do not, it waits:
a running trial may still fail, or its worker die, and then its slot is free again. Two workers
that take the last slot at the same moment are told apart by trial number: the later trial ends
FAIL before anything runs, marked `surplus`.

The trial itself (autotune.run.objective) imports Lightning, which takes seconds: it is imported
when the loop starts, not with this module, which the progress bar imports.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.core.checks import quiet_lightning
from autotune.core.names import FAIL_REASON_ATTR, STARTED, SURPLUS_ATTR
from autotune.core.spec import Spec
from autotune.run.finish import finish_study
from autotune.run.session import Session, StudyOutcome, open_session
from autotune.search.optuna_private import fail_trial, heartbeats
from autotune.search.queries import FINISHED, count_finished
from autotune.search.storage import HEARTBEAT_GRACE, POLL_SECONDS, raise_if_disk
from autotune.search.sync import sync_study
from autotune.search.tracking import Tracker

if TYPE_CHECKING:
    from autotune.run.objective import Objective

MAX_FAILURES_IN_A_ROW = 5


class Observer:
    """What the trial loop tells whoever watches it (the progress bar: progress.RichProgress).
    This one watches nothing."""

    def start(self, study: optuna.Study, total: int) -> None: ...
    def trial_start(self, trial: optuna.Trial) -> None: ...
    def epoch(self, trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None: ...
    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None: ...
    def waiting(self, study: optuna.Study, running: int) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


class Budget:
    """The study's budget shared by every worker: who may start a trial, who must wait."""

    def __init__(
        self,
        study: optuna.Study,
        total: int,
        stop: threading.Event,
        progress: Observer,
        *,
        timeout: float | None = None,
        grace: float = HEARTBEAT_GRACE,
    ) -> None:
        self.study, self.total, self.stop, self.progress = study, total, stop, progress
        # the clock starts at the first look for room, not here: a short timeout still lets
        # the run start its first trial, as Optuna's own timeout does
        self.timeout, self.deadline = timeout, None
        self.grace = grace
        # without heartbeats (journal storages) a dead worker's trial looks alive forever, so a
        # running trial holds no slot there: workers may overshoot by a trial each, never hang
        self.heartbeats = heartbeats(study)

    def counts(self) -> tuple[int, int]:
        """Trials finished (COMPLETE, PRUNED), and running trials that hold a slot."""
        trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        return len(trials) - running, running if self.heartbeats else 0

    def wait_for_room(self) -> bool:
        """True when a trial may start; False when the budget is spent, a signal came, or the
        run's timeout has passed.

        While the running trials take the rest, wait: one may fail, or its worker may die and
        its trial be failed by the heartbeat check (and queued again) after the grace period."""
        if self.deadline is None and self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        while not self.stop.is_set():
            if self.deadline is not None and time.monotonic() > self.deadline:
                return False
            finished, running = self.counts()
            if finished >= self.total:
                return False
            if finished + running < self.total:
                return True
            self.progress.waiting(self.study, running)
            self.stop.wait(POLL_SECONDS)
            optuna.storages.fail_stale_trials(self.study)
            self._fail_unstarted()
        return False

    def _fail_unstarted(self) -> None:
        """Fail a RUNNING trial whose worker died after Optuna's ask but before the trial's
        first heartbeat: the heartbeat check cannot see it. Such a trial never reached the
        objective (which records `started`) though it began longer than the grace period ago.
        """
        now = datetime.now()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            begun = trial.datetime_start
            if trial.user_attrs.get(STARTED) == trial.number or begun is None:
                continue
            if (now - begun).total_seconds() > self.grace:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    fail_trial(
                        self.study, trial, FAIL_REASON_ATTR, "its worker stopped before it started"
                    )

    def admits(self, trial: optuna.Trial) -> bool:
        """Whether `trial` fits the budget: fewer than `total` trials that hold a slot (see
        `counts`) come before it."""
        states = (*FINISHED, TrialState.RUNNING) if self.heartbeats else FINISHED
        before = self.study.get_trials(deepcopy=False, states=states)
        return sum(1 for t in before if t.number < trial.number) < self.total


def run_study(
    spec: Spec,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: Observer | None = None,
    finish: bool = True,
    allow_changes: bool = False,
) -> StudyOutcome:
    """Run (or resume, or join) the study until its budget is spent; write the recommendation.

    finish=False: a worker among several, whose launcher writes the recommendation.
    allow_changes: a spec may change what the stored study's trials train with."""
    progress = progress or Observer()
    session = open_session(
        spec, n_trials=n_trials, notify=progress.note, allow_changes=allow_changes
    )
    try:
        outcome = run_trials(session, timeout=timeout, progress=progress)
    except BaseException:
        if finish:
            session.tracker.end_study({}, {}, [], status="FAILED")  # never leave it RUNNING
        raise
    if finish:
        finish_study(session, outcome)
    return outcome


def run_trials(
    session: Session, *, timeout: float | None = None, progress: Observer | None = None
) -> StudyOutcome:
    """The trial loop: stop at the budget, on repeated failure, on timeout or on a signal.

    A write the disk refuses (the trial's weights, the storage, a local MLflow store) fails or
    ends the trial it happens in, stops the loop, and is raised as a WriteError: every later
    trial would fail the same way."""
    from autotune.core.signals import stop_on_signals
    from autotune.run.objective import Objective  # Lightning: seconds to import

    spec, study, tracker = session.spec, session.study, session.tracker
    progress = progress or Observer()
    timeout = timeout if timeout is not None else spec.study.timeout
    quiet_lightning()
    outcome = StudyOutcome(study, count_finished(study), session.budget)
    tracker.on_return = lambda: _log_missed(tracker, study, spec.study.metric, progress)

    with stop_on_signals() as stop:
        budget = Budget(
            study,
            session.budget,
            stop,
            progress,
            timeout=timeout,
            grace=spec.study.heartbeat_grace,
        )
        objective = Objective(
            spec,
            session.space,
            session.datamodule,
            tracker,
            stop=stop,
            on_epoch=progress.epoch,
            on_start=progress.trial_start,
            admit=budget.admits,
        )
        after_trial = _after_trial(outcome, objective, tracker, budget, stop, progress)
        progress.start(study, session.budget)
        _optimize(
            study,
            objective,
            outcome,
            budget,
            after_trial,
            stop,
            progress,
            timeout=timeout,
            storage_url=spec.storage_url,
        )
    fault = objective.fault or tracker.fault
    if fault is not None:
        raise fault
    if tracker.missed:
        _log_missed(tracker, study, spec.study.metric, progress)
    return outcome


def _after_trial(
    outcome: StudyOutcome,
    objective: Objective,
    tracker: Tracker,
    budget: Budget,
    stop: threading.Event,
    progress: Observer,
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """The callback after each trial: counts failures in a row, and stops the study on a fault,
    on too many failures, or when the budget has no room left."""
    failures: list[int] = []

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(SURPLUS_ATTR):
            pass  # not a failure of the configuration: it never ran
        elif trial.state == TrialState.FAIL:
            failures.append(trial.number)
        else:
            failures.clear()
        outcome.finished = count_finished(study)
        progress.trial_done(study, trial)
        if objective.fault is not None or tracker.fault is not None:
            study.stop()
        elif len(failures) >= MAX_FAILURES_IN_A_ROW and not stop.is_set():
            outcome.stopped_by_failures = True
            study.stop()
        elif not budget.wait_for_room():
            outcome.interrupted = stop.is_set()  # a signal after the trial's last batch
            outcome.finished = count_finished(study)
            study.stop()

    return after_trial


def _optimize(
    study: optuna.Study,
    objective: Objective,
    outcome: StudyOutcome,
    budget: Budget,
    after_trial: Callable[[optuna.Study, FrozenTrial], None],
    stop: threading.Event,
    progress: Observer,
    *,
    timeout: float | None,
    storage_url: str,
) -> None:
    """Optuna's loop over the trials, once the budget has room; a storage error about the disk
    raised as a WriteError."""
    try:
        if budget.wait_for_room():
            study.optimize(objective, timeout=timeout, catch=(Exception,), callbacks=[after_trial])
        outcome.interrupted = outcome.interrupted or stop.is_set()
    except KeyboardInterrupt:
        outcome.interrupted = True
    except Exception as exc:  # the storage could not record a trial: Optuna's own error
        raise_if_disk(exc, storage_url)
        raise
    finally:
        outcome.cut_short = list(objective.cut_short)
        progress.close()


def _log_missed(tracker: Tracker, study: optuna.Study, metric: str, progress: Observer) -> None:
    """The trials this process could not log while MLflow was away, logged whole now."""
    missed = sorted(tracker.missed)
    try:
        logged = sync_study(tracker, study, metric, only=missed)
        tracker.answered()
    except Exception as exc:
        tracker.went_down(exc)
        return
    if logged:
        progress.note(f"MLflow answers again: logged {logged} trials it had missed")

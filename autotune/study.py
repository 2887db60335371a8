"""The study: storage, sampler, pruner, the trial loop, resume and the budget.

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
"""

from __future__ import annotations

import contextlib
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from optuna.trial import FrozenTrial, TrialState

from autotune.baselines import baselines
from autotune.checks import check_sampler
from autotune.errors import SpecError, WriteError, first_line
from autotune.names import (
    BEST_TRIAL_TAG,
    BLOCKS_AT,
    BUDGET_TAG,
    FAIL_REASON_ATTR,
    FIGURES_DIR,
    INPUT_SHAPE_ATTR,
    INPUT_STATS,
    METRIC_ATTR,
    N_CLASSES_ATTR,
    PARENT_ATTR,
    RECOMMENDED_TAG,
    SEARCH_SPACE_ATTR,
    STANDARDISED_ATTR,
    STARTED,
    SURPLUS_ATTR,
)
from autotune.preflight import check_runnable, resolve_space
from autotune.queries import (
    FINISHED,
    best_trial,
    count_finished,
    current_ranking,
    recommended_trial,
    trial_config,
)
from autotune.redaction import redact
from autotune.space import SearchSpace
from autotune.spec import PrunerSpec, Spec
from autotune.writes import check_writable, write_failure

# heartbeats, RetryHeartbeatStaleTrialCallback and TPE's `group` are marked experimental; we
# rely on them knowingly and the notice would greet every user on every run
warnings.filterwarnings("ignore", category=ExperimentalWarning)

MAX_FAILURES_IN_A_ROW = 5
# a worker that has not beaten its heart for grace_period seconds is taken for dead, and its trial
# is failed and run again (RetryHeartbeatStaleTrialCallback); the spec may set both
HEARTBEAT_INTERVAL, HEARTBEAT_GRACE, MAX_RETRIES = 30, 120, 2
# how often a worker waiting for room in the budget looks at the storage again
POLL_SECONDS = 1.0
# how long a worker that joins a new study waits for its creator to name the MLflow parent run
PARENT_WAIT_SECONDS = 30.0


class Progress:
    """What the trial loop tells whoever watches it. This one watches nothing."""

    def start(self, study: optuna.Study, total: int) -> None: ...
    def epoch(self, trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None: ...
    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None: ...
    def waiting(self, study: optuna.Study, running: int) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class StudyOutcome:
    study: optuna.Study
    finished: int
    budget: int
    interrupted: bool = False
    stopped_by_failures: bool = False
    outputs: list[Path] = field(default_factory=list)
    # the trials this process had sampled and was running when a signal stopped them
    cut_short: list[int] = field(default_factory=list)


JOURNAL = "journal:///"  # journal:///runs/x.journal is relative, journal:////abs/x.journal absolute


def spec_storage(spec: Spec) -> optuna.storages.BaseStorage:
    """The spec's storage, with its heartbeat settings."""
    return make_storage(
        spec.storage_url,
        heartbeat_interval=spec.study.heartbeat_interval,
        heartbeat_grace=spec.study.heartbeat_grace,
    )


def make_storage(
    url: str,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    heartbeat_grace: int = HEARTBEAT_GRACE,
) -> optuna.storages.BaseStorage:
    """The Optuna storage a URL names.

    - sqlite:///, postgresql://, mysql://: an RDB storage with heartbeats, so that a trial whose
      worker died is failed and run again (RetryHeartbeatStaleTrialCallback);
    - journal:///path: a journal file, for workers that share a filesystem but no database;
    - redis://host:port/db: a journal in Redis.
    Optuna keeps heartbeats for RDB storages only: with a journal, a dead worker's trial stays
    RUNNING and is not retried.
    """
    try:
        if url.startswith(JOURNAL):
            path = Path(url.removeprefix(JOURNAL))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if url.startswith(("redis://", "rediss://")):
            return optuna.storages.JournalStorage(_redis_backend(url))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, heartbeat_interval, heartbeat_grace)
    except SpecError:
        raise
    except Exception as exc:  # bad URL, missing driver, unreachable server, a full disk
        raise_if_disk(exc, url)
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise SpecError(  # the reason may quote the URL: SQLAlchemy's does
            redact(f"study.storage: cannot open {url!r}: {type(exc).__name__}: {reason}")
        ) from None


def _rdb_storage(url: str, interval: int, grace: int) -> optuna.storages.RDBStorage:
    def open_() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=interval,
            grace_period=grace,
            # a configuration whose worker dies twice is not tried a third time
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRIES
            ),
        )

    for _ in range(2):
        try:
            return open_()
        except Exception as exc:
            # workers that open a fresh database at once race to create its tables: the loser
            # finds them made on a second look. A server that is not there is not worth one.
            if "connect" in str(exc).lower():
                raise
            time.sleep(0.1 + secrets.randbelow(500) / 1000)
    return open_()


def _redis_backend(url: str) -> JournalRedisBackend:
    try:
        import redis
    except ImportError:
        raise SpecError(
            "study.storage: a redis:// storage needs the redis package: "
            "pip install 'autotune[redis]'"
        ) from None
    redis.Redis.from_url(url, socket_connect_timeout=5).ping()  # unreachable: said here, once
    return JournalRedisBackend(url)


def raise_if_disk(exc: Exception, url: str) -> None:
    """Raise a WriteError naming the store `url` (a storage, a tracking store) when `exc` is a
    write that its disk refused (writes.write_failure)."""
    failed = write_failure(exc)
    if failed is not None:
        raise WriteError(f"{storage_place(url)}: {failed}") from exc


def storage_place(url: str) -> str:
    """Where a storage keeps its data, for a message: a file's path, else the URL redacted."""
    for prefix in ("sqlite:///", JOURNAL):
        if url.startswith(prefix):
            return url.removeprefix(prefix)
    return redact(url)


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded. cmaes and gp need at least one numeric parameter to model."""
    check_sampler(name, space)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        )
    # multivariate + group: TPE models the parameters together, per conditional subspace
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def make_pruner(spec: PrunerSpec, max_epochs: int, seed: int = 0) -> optuna.pruners.BasePruner:
    """The spec's pruner; variance_shift wraps the pruner named by `base`."""
    if spec.name != "variance_shift":
        return _optuna_pruner(spec.name, spec, max_epochs)
    from autotune.pruners import VarianceShiftPruner

    return VarianceShiftPruner(
        _optuna_pruner(spec.base, spec, max_epochs),
        threshold=spec.threshold,
        exploration=spec.exploration,
        strictness=spec.strictness,
        patience=spec.patience,
        learn_threshold=spec.learn_threshold,
        learn_after=spec.learn_after,
        seed=seed,
    )


def _optuna_pruner(name: str, spec: PrunerSpec, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_epochs
        )
    if name == "percentile":
        return optuna.pruners.PercentilePruner(
            spec.percentile,
            n_startup_trials=spec.n_startup_trials,
            n_warmup_steps=spec.n_warmup_epochs,
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min(spec.min_epochs, max_epochs),
            max_resource=max_epochs,
            reduction_factor=spec.reduction_factor,
        )
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min(spec.min_epochs, max_epochs), reduction_factor=spec.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(
    spec: Spec, space: SearchSpace, datamodule: Any | None = None
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; refuse a spec that no longer fits it.

    Returns the study and whether this process created it. Of many workers starting at once
    exactly one does (the storage keeps study names unique); only it seeds trials and creates
    the MLflow parent run.
    """
    direction = spec.study.resolved_direction
    settings: dict[str, Any] = dict(
        study_name=spec.study.name,
        storage=spec_storage(spec),
        sampler=make_sampler(spec.study.sampler, spec.train.seed, space),
        pruner=make_pruner(spec.study.pruner, spec.train.max_epochs, spec.train.seed),
        direction=direction,
    )
    try:
        study, created = optuna.create_study(**settings), True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.create_study(**settings, load_if_exists=True), False
    if not created:
        # the creator draws from the spec's seed, reproducibly. Any other process, a resumed
        # run or one of several workers, draws from its own: workers that joined at the same
        # moment would otherwise try the same configurations side by side
        study.sampler = make_sampler(spec.study.sampler, secrets.randbits(31), space)
    if study.direction.name.lower() != direction:
        raise SpecError(
            f"study.direction: stored study {spec.study.name!r} is to "
            f"{study.direction.name.lower()}, the spec says {direction}; choose another study.name"
        )
    for key, value in check_stored(study, spec, datamodule).items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    return study, created


def check_stored(study: optuna.Study, spec: Spec, datamodule: Any | None = None) -> dict[str, Any]:
    """Raise SpecError where the spec's model, metric or data differ from what the study ran with.

    A study mixes no datasets: its trials and its exported snippet must fit the same inputs.
    """
    model = spec.model
    # a template study has no `import`, an imported model's study no `template`: either way
    # round, the stored value differs from the spec's
    identity: dict[str, Any] = (
        {"template": None, "import": model.import_, "kwargs": model.kwargs}
        if model.imported
        else {
            "template": model.template,
            "widths": model.resolved_widths,
            "activation": model.activation,
            "pool": model.pool,
            "import": None,
        }
    )
    identity[METRIC_ATTR] = spec.study.metric
    if datamodule is not None:
        identity[INPUT_SHAPE_ATTR] = list(datamodule.input_shape)
        identity[N_CLASSES_ATTR] = int(datamodule.n_classes)
    sections = {METRIC_ATTR: "study", INPUT_SHAPE_ATTR: "data", N_CLASSES_ATTR: "data"}
    for key, value in identity.items():
        stored = study.user_attrs.get(key)
        if stored is not None and stored != value:
            section = sections.get(key, "model")
            raise SpecError(
                f"{section}.{key}: stored study {spec.study.name!r} was run with {stored!r}, "
                f"the spec says {value!r}; choose another study.name"
            )
    return identity


def load_existing_study(spec: Spec) -> optuna.Study:
    """The spec's stored study, checked against the spec; SpecError when there is none."""
    url = spec.storage_url
    for prefix in ("sqlite:///", JOURNAL):
        if url.startswith(prefix) and not Path(url.removeprefix(prefix)).is_file():
            raise SpecError(f"study.name: no study {spec.study.name!r}: {url} does not exist")
    try:
        study = optuna.load_study(study_name=spec.study.name, storage=spec_storage(spec))
    except KeyError:
        raise SpecError(f"study.name: no study {spec.study.name!r} in {redact(url)}") from None
    check_stored(study, spec)
    return study


def enqueue_low_shift(
    study: optuna.Study, spec: Spec, space: SearchSpace, datamodule: Any, n: int
) -> list[dict[str, Any]]:
    """Enqueue the first n trials: the least shifted of 10·n random configurations, predicted
    (not trained). Returns the enqueued parameters, least shifted first.

    Meant for the one process that starts a study: workers that start an empty study at the same
    moment may each enqueue them."""
    from autotune.pruners import shift_distance
    from autotune.training import predict

    candidates = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.train.seed))
    scored = []
    for _ in range(10 * n):
        trial = candidates.ask()
        config = space.sample(trial)
        try:
            worst = predict(spec, config, datamodule).summary.worst_delta
        except Exception:  # a candidate that cannot be predicted is simply not chosen
            continue
        scored.append((shift_distance(worst), trial.number, trial.params))
    chosen = [params for _, _, params in sorted(scored, key=lambda row: row[:2])[:n]]
    for params in chosen:
        study.enqueue_trial(params, skip_if_exists=True)
    return chosen


def prepare_output(spec: Spec) -> None:
    """Create the output folder and write a file into it, or say in one line (WriteError) why
    it takes none: before the storage or any trial touches it."""
    check_writable(spec.output_dir)


@dataclass
class Session:
    """A process's hold on a study: the checked input, the opened study and its tracker."""

    spec: Spec
    space: SearchSpace
    datamodule: Any
    study: optuna.Study
    tracker: Any
    budget: int
    created: bool


def open_session(
    spec: Spec, *, n_trials: int | None = None, notify: Callable[[str], None] | None = None
) -> Session:
    """Check the input, open (or create) the study and find (or create) its MLflow parent run.

    Everything that can be wrong with the input fails here, before any training."""
    from autotune.data import load_data

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    datamodule = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    space = resolve_space(spec, datamodule)
    check_runnable(spec, space, datamodule)
    prepare_output(spec)
    if spec.recommend.current is not None:  # read now, not after the whole study
        baselines(spec, space)
    study, created = open_study(spec, space, datamodule)
    try:
        tracker = _start_parent_run(study, spec, space, datamodule, created, notify)
    except BaseException:
        # a creator that fails before its parent run is stored (a write fault, MLflow away)
        # says so: the rerun makes the parent at once instead of waiting for this process
        if created and PARENT_ATTR not in study.user_attrs:
            with contextlib.suppress(Exception):
                study.set_user_attr(PARENT_ATTR, None)
        raise
    pruner = spec.study.pruner
    if created and pruner.name == "variance_shift" and pruner.seed_trials:
        enqueue_low_shift(study, spec, space, datamodule, pruner.seed_trials)
    budget = n_trials if n_trials is not None else spec.study.n_trials
    return Session(spec, space, datamodule, study, tracker, budget, created)


def _start_parent_run(
    study: optuna.Study,
    spec: Spec,
    space: SearchSpace,
    datamodule: Any,
    created: bool,
    notify: Callable[[str], None] | None,
) -> Any:
    """The study's attrs for this run, the input statistics saved, and the MLflow parent run
    found or started (its id stored in the study by its creator): the Tracker."""
    from autotune.tracking import Tracker, flatten

    if study.user_attrs.get(SEARCH_SPACE_ATTR) != space.name:
        study.set_user_attr(SEARCH_SPACE_ATTR, space.name)
    blocks_at = [slot.label for slot in space.slots]
    if spec.model.imported and study.user_attrs.get(BLOCKS_AT) != blocks_at:
        study.set_user_attr(BLOCKS_AT, blocks_at)
    study.set_user_attr(STANDARDISED_ATTR, save_input_stats(datamodule, spec.output_dir))

    # the parent run before any trial exists: a joining worker that finds trials takes the
    # study for an older one and does not wait for the creator's parent run id
    try:
        tracker = Tracker(
            spec.tracking_uri,
            spec.experiment_name,
            spec.study.name,
            enabled=spec.mlflow.enabled,
            notify=notify,
        )
    except Exception as exc:  # MlflowException: a bad URI, a refused local store
        raise_if_disk(exc, spec.tracking_uri)
        where = f"mlflow.tracking_uri: {redact(spec.tracking_uri)}"
        raise SpecError(f"{where}: {redact(first_line(exc))}") from None
    known = None if created or not tracker.enabled else _parent_run_id(study)
    params = flatten(spec.model_dump(mode="json", by_alias=True))  # model.import, not import_
    for i, slot in enumerate(space.slots if spec.model.imported else ()):
        params[f"model.block{i}"] = slot.label  # which BN layer block i is, beside its params
    parent = tracker.start_study(params, known=known)
    if parent is not None and parent != known:
        study.set_user_attr(PARENT_ATTR, parent)
    return tracker


def _parent_run_id(study: optuna.Study) -> str | None:
    """The MLflow parent run id the study's creator stored. A worker that joins a study created a
    moment ago waits for it, so that all workers log under one parent; None where the creator
    made none (it failed first, or the study is older than MLflow logging)."""
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while PARENT_ATTR not in study.user_attrs:
        if study.get_trials(deepcopy=False) or time.monotonic() > deadline:
            return None  # an older study run without MLflow, or a creator that gave up
        time.sleep(POLL_SECONDS / 4)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
    return study.user_attrs[PARENT_ATTR]


class Budget:
    """The study's budget shared by every worker: who may start a trial, who must wait."""

    def __init__(
        self,
        study: optuna.Study,
        total: int,
        stop: Any,
        progress: Progress,
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
        self.heartbeats = optuna.storages._heartbeat.is_heartbeat_enabled(study._storage)

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
        storage, now = self.study._storage, datetime.now()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            begun = trial.datetime_start
            if trial.user_attrs.get(STARTED) == trial.number or begun is None:
                continue
            if (now - begun).total_seconds() > self.grace:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    storage.set_trial_user_attr(
                        trial._trial_id, FAIL_REASON_ATTR, "its worker stopped before it started"
                    )
                    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)

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
    progress: Progress | None = None,
    finish: bool = True,
) -> StudyOutcome:
    """Run (or resume, or join) the study until its budget is spent; write the recommendation.

    finish=False: a worker among several, whose launcher writes the recommendation."""
    progress = progress or Progress()
    session = open_session(spec, n_trials=n_trials, notify=progress.note)
    try:
        outcome = work(session, timeout=timeout, progress=progress)
    except BaseException:
        if finish:
            session.tracker.end_study({}, {}, [], status="FAILED")  # never leave it RUNNING
        raise
    if finish:
        finish_study(session, outcome)
    return outcome


def work(
    session: Session, *, timeout: float | None = None, progress: Progress | None = None
) -> StudyOutcome:
    """The trial loop: stop at the budget, on repeated failure, on timeout or on a signal.

    A write the disk refuses (the trial's weights, the storage, a local MLflow store) fails or
    ends the trial it happens in, stops the loop, and is raised as a WriteError: every later
    trial would fail the same way."""
    from autotune.checks import quiet_lightning
    from autotune.training import Objective, stop_on_signals

    spec, study, tracker = session.spec, session.study, session.tracker
    progress = progress or Progress()
    timeout = timeout if timeout is not None else spec.study.timeout
    quiet_lightning()
    outcome = StudyOutcome(study, count_finished(study), session.budget)
    failures: list[int] = []
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
            admit=budget.admits,
        )

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

        progress.start(study, session.budget)
        try:
            if budget.wait_for_room():
                study.optimize(
                    objective, timeout=timeout, catch=(Exception,), callbacks=[after_trial]
                )
            outcome.interrupted = outcome.interrupted or stop.is_set()
        except KeyboardInterrupt:
            outcome.interrupted = True
        except Exception as exc:  # the storage could not record a trial: Optuna's own error
            raise_if_disk(exc, spec.storage_url)
            raise
        finally:
            outcome.cut_short = list(objective.cut_short)
            progress.close()
    fault = objective.fault or tracker.fault
    if fault is not None:
        raise fault
    if tracker.missed:
        _log_missed(tracker, study, spec.study.metric, progress)
    return outcome


def _log_missed(tracker: Any, study: optuna.Study, metric: str, progress: Progress) -> None:
    """The trials this process could not log while MLflow was away, logged whole now."""
    from autotune.tracking import sync_study

    missed = sorted(tracker.missed)
    try:
        logged = sync_study(tracker, study, metric, only=missed)
        tracker.answered()
    except Exception as exc:
        tracker.went_down(exc)
        return
    if logged:
        progress.note(f"MLflow answers again: logged {logged} trials it had missed")


def finish_study(session: Session, outcome: StudyOutcome) -> None:
    """The end of a run: the robust recommendation when the study reached its budget, then the
    parent run ended (end_parent_run). The last worker standing also makes MLflow whole: a dead
    worker's trial, a trial that another worker could not log.

    A file that cannot be written (WriteError) ends the parent run FAILED and is raised: the
    same command, once the disk takes writes, writes the outputs again."""
    from autotune.robust import robust_recommendation

    tracker = session.tracker
    try:
        if not outcome.interrupted and outcome.finished >= outcome.budget:
            try:
                robust_recommendation(session)  # kept in the study, where the end finds it
            except WriteError:
                raise
            except (Exception, KeyboardInterrupt, SystemExit) as exc:  # the study is done
                tracker.notify(f"no robust recommendation ({exc!r}): the best trial is recommended")
        end_parent_run(session.study, session.spec, tracker, outcome)
    except WriteError:
        tracker.end_study({}, {}, [], status="FAILED")
        raise
    if tracker.fault is not None:  # the local MLflow store's disk, while the parent was ended
        raise tracker.fault
    if tracker.down_since is not None:
        tracker.notify(
            f"MLflow at {tracker.shown_uri} still does not answer: when it does, "
            "`autotune sync` with this spec logs what it missed"
        )


def end_parent_run(study: optuna.Study, spec: Spec, tracker: Any, outcome: StudyOutcome) -> None:
    """What the end of a study gives its parent run, at the end of a run (finish_study) or
    later by `autotune sync` (sync_parent_run): the recommendation written from the trials that
    completed (write_outputs: weights trained on another node are said to be absent), the
    pictures drawn, MLflow made whole from the storage when no trial is running, then on the
    parent run the best value, the robust ranking, the recommendation as tags, how far the study
    got, the files, the pictures, and its status (parent_status). `outcome.outputs` is set to
    the files written.

    Raises WriteError, before the parent run is touched, when a file cannot be written."""
    from autotune.export import Unverified, rewrite_if_run_moved, write_outputs
    from autotune.report import write_figures
    from autotune.tracking import sync_study

    def files_written(write: Callable[[], list[Path]]) -> list[Path]:
        """The files `write` wrote; what the user's factory left unverified is said, not
        raised."""
        try:
            return list(write())
        except Unverified as exc:
            tracker.notify(str(exc))
            return exc.written

    best = best_trial(study)
    if best is not None:
        outcome.outputs = files_written(lambda: write_outputs(study, spec))
    try:  # pictures are a courtesy: a run that finished must still end in MLflow
        figures = write_figures(study, spec.output_dir / FIGURES_DIR, spec.study.metric)
    except WriteError:
        raise
    except Exception as exc:
        tracker.notify(f"the study's pictures were not drawn: {exc!r}")
        figures = []
    if tracker.enabled and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            sync_study(tracker, study, spec.study.metric)
            tracker.answered()
        except Exception as exc:
            tracker.went_down(exc)
        if outcome.outputs:  # the recommended trial's run may be one sync just replaced
            outcome.outputs = (
                files_written(lambda: rewrite_if_run_moved(study, spec)) or outcome.outputs
            )
    metrics = {} if best is None else {f"best_{spec.study.metric}": best.value}
    for row in (current_ranking(study, spec) or {}).get("rows", []):  # baselines beside
        name = row["name"].replace(" ", "_")
        kept = [key for key in ("mean", "sd", "bound") if key in row]  # none: it failed
        metrics.update({f"robust.{name}.{key}": row[key] for key in kept})
    chosen = recommended_trial(study, spec)
    tags = {} if chosen is None else recommendation_tags(chosen)
    tags[BUDGET_TAG] = f"{outcome.finished}/{outcome.budget}"
    tracker.end_study(
        {**metrics, "finished_trials": outcome.finished},
        tags,
        outcome.outputs,
        status=parent_status(outcome),
        figures=figures,
    )


def sync_parent_run(study: optuna.Study, spec: Spec, tracker: Any) -> StudyOutcome | None:
    """`autotune sync`, after the trials: a parent run that its run left RUNNING (MLflow did not
    answer at its end) is ended as that run would have ended it (end_parent_run), against the
    spec's budget, when no trial is running. Returns the outcome it ended the parent with, or
    None when there was nothing to end."""
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return None  # a run is going on: its own end ends the parent
    if tracker.client.get_run(tracker.parent_run_id).info.status != "RUNNING":
        return None
    outcome = StudyOutcome(study, count_finished(study), spec.study.n_trials)
    end_parent_run(study, spec, tracker, outcome)
    return outcome


def parent_status(outcome: StudyOutcome) -> str:
    """The MLflow status the study's parent run ends with. FINISHED only for a study that has
    reached its budget; KILLED for one cut short (interrupted, a timeout, workers that were
    killed), which a rerun sets RUNNING again; FAILED for one that failures in a row stopped."""
    if outcome.interrupted:
        return "KILLED"
    if outcome.finished >= outcome.budget:
        return "FINISHED"
    return "FAILED" if outcome.stopped_by_failures else "KILLED"


def recommendation_tags(best: FrozenTrial) -> dict[str, Any]:
    """The recommendation on the parent run, under the names the child runs use for their
    params (`autotune.recommended.block0.placement`, ...): tags, since a resumed study may come
    to recommend another configuration and MLflow params cannot change."""
    config = trial_config(best)
    tags: dict[str, Any] = {BEST_TRIAL_TAG: best.number}
    tags.update({RECOMMENDED_TAG.format(k): v for k, v in config.to_params().items()})
    return tags


def save_input_stats(datamodule: Any, output_dir: Path) -> bool:
    """How raw inputs become model inputs ((x - mean) / std, label order), for production use.

    Returns whether autotune standardised the inputs (a user DataModule prepares its own).
    Raises WriteError when the file cannot be written.
    """
    from autotune.export import save_tensors

    stats = getattr(datamodule, "input_stats", None)
    if stats is not None:
        save_tensors(stats, output_dir / INPUT_STATS)
    return stats is not None

"""The study: storage, sampler, pruner, the trial loop, resume and the budget.

`n_trials` is the budget of the whole study: the number of trials that finished (COMPLETE or
PRUNED), across reruns. Running the same spec again loads the same study from its storage and
runs only what is missing; a failed trial does not use the budget, but five failures in a row stop
the run, since something is wrong with more than one configuration.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from optuna.trial import FrozenTrial, TrialState

from autotune.errors import SpecError
from autotune.space import SearchSpace, load_space
from autotune.spec import PrunerSpec, Spec

# heartbeats, RetryHeartbeatStaleTrialCallback and TPE's `group` are marked experimental; we
# rely on them knowingly and the notice would greet every user on every run
warnings.filterwarnings("ignore", category=ExperimentalWarning)

INPUT_STATS = "input_stats.pt"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 5
# a worker that has not beaten its heart for grace_period seconds is taken for dead, and its trial
# is failed and run again (RetryHeartbeatStaleTrialCallback)
HEARTBEAT_INTERVAL, HEARTBEAT_GRACE = 30, 120


class Progress:
    """What the trial loop tells whoever watches it. This one watches nothing."""

    def start(self, study: optuna.Study, total: int) -> None: ...
    def epoch(self, trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None: ...
    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None: ...
    def close(self) -> None: ...


@dataclass
class StudyOutcome:
    study: optuna.Study
    finished: int
    budget: int
    interrupted: bool = False
    stopped_by_failures: bool = False
    outputs: list[Path] = field(default_factory=list)


def resolve_space(spec: Spec) -> SearchSpace:
    """The spec's search space, overrides applied, for the model's blocks."""
    return load_space(
        spec.search_space.base,
        params=spec.search_space.params,
        blocks=spec.search_space.blocks,
        n_blocks=len(spec.model.resolved_widths),
        template=spec.model.template,
        base_dir=spec.base_dir,
    )


JOURNAL = "journal:///"  # journal:///runs/x.journal is relative, journal:////abs/x.journal absolute


def make_storage(url: str) -> optuna.storages.BaseStorage:
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
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            grace_period=HEARTBEAT_GRACE,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )
    except SpecError:
        raise
    except Exception as exc:  # bad URL, missing driver, unreachable server
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise SpecError(
            f"study.storage: cannot open {redact(url)!r}: {type(exc).__name__}: {reason}"
        ) from None


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


def redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db"""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded. cmaes and gp need at least one numeric parameter to model."""
    if name in ("cmaes", "gp") and not space.has_numeric():
        raise SpecError(f"study.sampler: {name} models numeric parameters; this space has none")
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


def open_study(spec: Spec, space: SearchSpace, datamodule: Any | None = None) -> optuna.Study:
    """Create the study, or load it when it exists; refuse a spec that no longer fits it."""
    direction = spec.study.resolved_direction
    study = optuna.create_study(
        study_name=spec.study.name,
        storage=make_storage(spec.storage_url),
        sampler=make_sampler(spec.study.sampler, spec.train.seed, space),
        pruner=make_pruner(spec.study.pruner, spec.train.max_epochs, spec.train.seed),
        direction=direction,
        load_if_exists=True,
    )
    # a resumed study must not replay the first run's random draws: offset the seed by the
    # trials already stored, so each run draws new configurations, reproducibly
    study.sampler = make_sampler(spec.study.sampler, spec.train.seed + len(study.trials), space)
    if study.direction.name.lower() != direction:
        raise SpecError(
            f"study.direction: stored study {spec.study.name!r} is to "
            f"{study.direction.name.lower()}, the spec says {direction}; choose another study.name"
        )
    for key, value in check_stored(study, spec, datamodule).items():
        study.set_user_attr(key, value)
    return study


def check_stored(study: optuna.Study, spec: Spec, datamodule: Any | None = None) -> dict[str, Any]:
    """Raise SpecError where the spec's model, metric or data differ from what the study ran with.

    A study mixes no datasets: its trials and its exported snippet must fit the same inputs.
    """
    identity: dict[str, Any] = {
        "template": spec.model.template,
        "widths": spec.model.resolved_widths,
        "activation": spec.model.activation,
        "pool": spec.model.pool,
        "metric": spec.study.metric,
    }
    if datamodule is not None:
        identity["input_shape"] = list(datamodule.input_shape)
        identity["n_classes"] = int(datamodule.n_classes)
    sections = {"metric": "study", "input_shape": "data", "n_classes": "data"}
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
        study = optuna.load_study(study_name=spec.study.name, storage=make_storage(url))
    except KeyError:
        raise SpecError(f"study.name: no study {spec.study.name!r} in {redact(url)}") from None
    check_stored(study, spec)
    return study


def check_runnable(spec: Spec, space: SearchSpace, datamodule: Any) -> None:
    """Fail on input before any training: the template must fit the data, the sampler the space."""
    import lightning.pytorch as pl

    from autotune.models import build_model
    from autotune.training import quiet_lightning

    quiet_lightning()
    make_sampler(spec.study.sampler, spec.train.seed, space)
    build_model(spec.model, space.defaults(), datamodule.input_shape, datamodule.n_classes)
    try:
        pl.Trainer(
            accelerator=spec.train.accelerator,
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except Exception as exc:  # MisconfigurationException: no such device here
        raise SpecError(f"train.accelerator: {spec.train.accelerator!r}: {exc}") from None
    loader = datamodule.train_dataloader()
    if hasattr(loader, "__len__") and len(loader) == 0:
        raise SpecError("data.val_fraction: the training split is too small for one batch")
    try:  # the metric needs validation batches; a DataModule without them fails every trial
        next(iter(datamodule.val_dataloader()))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"data: no validation batch: {reason}") from None


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
    """Create the output folder, or say in one line why it cannot be."""
    try:
        spec.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"output: cannot create {str(spec.output_dir)!r}: {exc.strerror}") from None


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(
    spec: Spec,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: Progress | None = None,
) -> StudyOutcome:
    """Run (or resume) the study until its budget is spent; write the recommendation."""
    from autotune.data import load_data
    from autotune.export import write_outputs
    from autotune.tracking import Tracker, flatten
    from autotune.training import Objective, quiet_lightning, stop_on_signals

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    progress = progress or Progress()
    budget = n_trials if n_trials is not None else spec.study.n_trials
    timeout = timeout if timeout is not None else spec.study.timeout

    # 1. everything that can be wrong with the input fails here, before any training
    space = resolve_space(spec)
    datamodule = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    check_runnable(spec, space, datamodule)
    prepare_output(spec)
    study = open_study(spec, space, datamodule)
    study.set_user_attr("search_space", space.name)
    pruner = spec.study.pruner
    if pruner.name == "variance_shift" and pruner.seed_trials and not study.trials:
        enqueue_low_shift(study, spec, space, datamodule, pruner.seed_trials)
    study.set_user_attr("standardised", save_input_stats(datamodule, spec.output_dir))

    # 2. MLflow: the study's parent run, found again on resume
    try:
        tracker = Tracker(
            spec.tracking_uri, spec.experiment_name, spec.study.name, enabled=spec.mlflow.enabled
        )
        parent = tracker.start_study(flatten(spec.model_dump(mode="json")))
    except Exception as exc:  # MlflowException: a bad URI, a refused store, no server
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"mlflow.tracking_uri: {spec.tracking_uri}: {message}") from None
    if parent is not None:
        study.set_user_attr("mlflow_parent_run_id", parent)

    # 3. the loop: stop at the budget, on repeated failure, on timeout or on a signal
    quiet_lightning()
    outcome = StudyOutcome(study, count_finished(study), budget)
    failures: list[int] = []

    with stop_on_signals() as stop:

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            if trial.state == TrialState.FAIL:
                failures.append(trial.number)
            else:
                failures.clear()
            outcome.finished = count_finished(study)
            progress.trial_done(study, trial)
            if stop.is_set():  # a signal that came after the trial's last batch
                outcome.interrupted = True
                study.stop()
            elif outcome.finished >= budget:
                study.stop()
            elif len(failures) >= MAX_FAILURES_IN_A_ROW:
                outcome.stopped_by_failures = True
                study.stop()

        progress.start(study, budget)
        try:
            if outcome.finished < budget:
                objective = Objective(
                    spec, space, datamodule, tracker, stop=stop, on_epoch=progress.epoch
                )
                study.optimize(
                    objective, timeout=timeout, catch=(Exception,), callbacks=[after_trial]
                )
        except KeyboardInterrupt:
            outcome.interrupted = True
        except BaseException:
            tracker.end_study({}, {}, [], status="FAILED")  # never leave the parent RUNNING
            raise
        finally:
            progress.close()

    # 4. the recommendation, from whatever has completed so far
    best = best_trial(study)
    if best is not None:
        outcome.outputs = list(write_outputs(study, spec))
    metrics = {} if best is None else {f"best_{spec.study.metric}": best.value}
    tags = {} if best is None else {"autotune.best_trial": best.number}
    tracker.end_study(
        {**metrics, "finished_trials": outcome.finished},
        tags,
        outcome.outputs,
        status="KILLED" if outcome.interrupted else "FINISHED",
    )
    return outcome


def save_input_stats(datamodule: Any, output_dir: Path) -> bool:
    """How raw inputs become model inputs ((x - mean) / std, label order), for production use.

    Returns whether autotune standardised the inputs (a user DataModule prepares its own).
    """
    import torch

    stats = getattr(datamodule, "input_stats", None)
    if stats is not None:
        torch.save(stats, output_dir / INPUT_STATS)
    return stats is not None


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial, or None when no trial has completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def state_counts(study: optuna.Study) -> dict[str, int]:
    """How many trials are in each state, by state name."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def top_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    """The k best COMPLETE trials, best first."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    sign: Callable[[FrozenTrial], Any] = (
        (lambda t: -t.value) if study.direction.name == "MAXIMIZE" else (lambda t: t.value)
    )
    return sorted(complete, key=sign)[:k]

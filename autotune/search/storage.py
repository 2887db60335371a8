"""Where a study lives: the Optuna storage a URL names, the sampler and the pruner the spec
names, and the study itself, created or loaded and checked against the spec.

The study is found by name in its storage, so running the same spec again resumes it. Only the
process that creates the study draws from `train.seed`; a rerun, like any joining worker, seeds
its sampler at random, so it draws new configurations instead of replaying the first run's. The
stored template, widths, activation, pooling, metric and data shape must match the spec
(`check_stored`). RDB storages keep heartbeats: the trial of a worker that died is failed and
run again (HEARTBEAT_GRACE, MAX_RETRIES); a journal (a file, or Redis) has none.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

from autotune.core.checks import check_sampler
from autotune.core.errors import SpecError, WriteError, first_line_with_type
from autotune.core.files import JOURNAL, url_file
from autotune.core.names import INPUT_SHAPE_ATTR, METRIC_ATTR, N_CLASSES_ATTR
from autotune.core.redaction import redact
from autotune.core.space import SearchSpace
from autotune.core.spec import Spec
from autotune.core.spec_study import PrunerSpec
from autotune.core.writes import write_failure
from autotune.search.pruners import VarianceShiftPruner
from autotune.search.settings import check_settings, settled

# heartbeats, RetryHeartbeatStaleTrialCallback and TPE's `group` are marked experimental; we
# rely on them knowingly and the notice would greet every user on every run
warnings.filterwarnings("ignore", category=ExperimentalWarning)

# a worker that has not beaten its heart for grace_period seconds is taken for dead, and its trial
# is failed and run again (RetryHeartbeatStaleTrialCallback); the spec may set both
HEARTBEAT_INTERVAL, HEARTBEAT_GRACE, MAX_RETRIES = 30, 120, 2
# how often a process waiting on the storage (for room in the budget, for the parent run's id,
# for its workers) looks again
POLL_SECONDS = 1.0


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
        if url.startswith(("redis://", "rediss://")):
            return optuna.storages.JournalStorage(_redis_backend(url))
        path = url_file(url)
        if path is not None:  # sqlite or a journal file: its folder first
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if url.startswith(JOURNAL):
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        return _rdb_storage(url, heartbeat_interval, heartbeat_grace)
    except SpecError:
        raise
    except Exception as exc:  # bad URL, missing driver, unreachable server, a full disk
        raise_if_disk(exc, url)
        raise SpecError(  # the reason may quote the URL: SQLAlchemy's does
            redact(f"study.storage: cannot open {url!r}: {first_line_with_type(exc)}")
        ) from None


def failed_to_connect(exc: BaseException) -> bool:
    """Whether opening an RDB storage failed before any statement ran: the server or file could
    not be reached, or refused the login. SQLAlchemy raises a DBAPIError whose `statement` is
    None only for an error while connecting (the driver's own, psycopg's with no sqlstate or
    class 08 or 28, MySQL's 2003, ...); a race to create the tables fails in a statement."""
    from sqlalchemy.exc import DBAPIError  # Optuna's RDB storage needs it: there when it raised

    return isinstance(exc, DBAPIError) and exc.statement is None


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
            if failed_to_connect(exc):
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
    return url_file(url) or redact(url)


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

    return VarianceShiftPruner(
        _optuna_pruner(spec.base, spec, max_epochs),
        gate=spec.gate,
        threshold=spec.threshold,
        exploration=spec.exploration,
        quantile=spec.quantile,
        optimism=spec.optimism,
        cost_steps=spec.cost_steps,
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
    spec: Spec,
    space: SearchSpace,
    datamodule: Any | None = None,
    *,
    allow_changes: bool = False,
    notify: Callable[[str], None] | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; refuse a spec that no longer fits it: another
    model, metric or data shape (check_stored), or, unless allow_changes, other settings for
    what its trials train (settings.check_settings, which says a change it allowed by `notify`).

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
    settings_of = settled(spec, study, created)  # data.test_fraction: null settled
    check_settings(study, settings_of, space, allow_changes=allow_changes, notify=notify)
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
    path = url_file(url)
    if path is not None and not Path(path).is_file():
        relative = "" if Path(path).is_absolute() else f" (from the working directory {Path.cwd()})"
        raise SpecError(f"study.name: no study {spec.study.name!r}: {url} does not exist{relative}")
    try:
        study = optuna.load_study(study_name=spec.study.name, storage=spec_storage(spec))
    except KeyError:
        raise SpecError(f"study.name: no study {spec.study.name!r} in {redact(url)}") from None
    check_stored(study, spec)
    return study

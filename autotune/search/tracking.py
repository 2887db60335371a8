"""MLflow: one parent run per study, one child run per trial nested under it.

The parent run's id is kept in the Optuna study (user attr `mlflow_parent_run_id`). The process
that creates the study creates the parent run; every other worker waits for the id and logs under
it, so N workers starting at once make one parent. Child runs carry the `mlflow.parentRunId` tag,
which is what nests them in the MLflow UI, flat params (`block0.placement`, ...), per-epoch metrics
with step = epoch, and the trial's final state as the tag `autotune.state`: COMPLETE, PRUNED, FAIL,
or INTERRUPTED for a trial stopped by Ctrl-C or SIGTERM (FAIL in Optuna, KILLED in MLflow).

MLflow is a record, not the source of truth: the Optuna storage is. When the tracking server does
not answer, trials go on, the user is told once, and calls are dropped; one is tried again every
RETRY_SECONDS. The trials whose logging was cut short are logged whole from the Optuna storage when
the server answers again, at the end of the run, or by `autotune sync` (`sync.sync_study`).

MlflowClient is used directly: it needs no global active run, so nothing leaks between trials.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from autotune.core.errors import WriteError, first_line_with_type
from autotune.core.names import (
    FIGURES_DIR,
    PARENT_ROLE,
    PARTIAL,
    ROLE_TAG,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_ROLE,
    TRIAL_TAG,
    WORKER_TAG,
)
from autotune.core.redaction import redact, redact_params
from autotune.core.writes import write_failure
from autotune.search.mlflow_store import (
    BATCH,
    HTTP_DEFAULTS,
    KIND,
    KIND_TAG,
    QUIET_URL,
    RETRY_SECONDS,
    RUN_NAME_TAG,
    RecommendedModel,
    artifact_location,
    log_recommended,
    make_sqlite_folder,
    run_name,
    shown,
    store_path,
)
from autotune.search.run_fields import RUN_STATUS, TrialRecord

T = TypeVar("T")


class Tracker:
    """Logs a study to MLflow. With enabled=False every method is a no-op returning None.

    A local store (sqlite) that cannot be opened raises at once: that is bad input. A server that
    does not answer only takes the tracker offline (see the module's docstring).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        study_name: str,
        *,
        enabled: bool = True,
        notify: Callable[[str], None] | None = None,
    ):
        self.enabled = enabled
        self.study_name = study_name
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        say = notify or logging.getLogger("autotune").warning
        # what the study says on the way, redacted: a note may quote an exception's repr
        self.notify: Callable[[str], None] = lambda message: say(redact(message))
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.down_since: float | None = None  # monotonic time the server stopped answering
        self.last_error: str | None = None
        self.last_try = 0.0
        self.missed: set[int] = set()  # trials whose logging was cut short in this process
        self.run_trial: dict[str, int] = {}  # child run id -> trial number
        self.on_return: Callable[[], None] | None = None
        # a local store (sqlite) whose disk refused a write: the run stops after its trial
        self.fault: WriteError | None = None
        if not enabled:
            return
        make_sqlite_folder(tracking_uri)
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.update(QUIET_URL)
        from mlflow.tracking import MlflowClient  # heavy: imported only when tracking

        for name in ("mlflow", "alembic"):  # after the import, which sets mlflow's own levels
            logging.getLogger(name).setLevel(logging.WARNING)
        # its sqlite store logs each failed query with a traceback before raising it: the error
        # is said here, once (went_down, or a WriteError for a full disk)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if self.remote:
            self._send(self._experiment)
        else:
            self._experiment()

    @property
    def remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def online(self) -> bool:
        return self.enabled and self.down_since is None and self.experiment_id is not None

    def _experiment(self) -> str:
        """Find or create the experiment; of two workers creating it at once, one finds the
        other's."""
        if self.experiment_id is not None:
            return self.experiment_id
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.tracking_uri)
                )
            except Exception:
                if self.client.get_experiment_by_name(self.experiment) is None:
                    raise  # not another worker that was first: a real failure
            found = self.client.get_experiment_by_name(self.experiment)
        if KIND_TAG not in found.tags:  # the UI then opens it on its runs, not on traces
            self.client.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
        self.experiment_id = found.experiment_id
        return self.experiment_id

    # --- the parent run -------------------------------------------------------------------------

    def start_study(self, params: Mapping[str, Any], *, known: str | None = None) -> str | None:
        """The study's parent run: `known` (the id the study stored) while MLflow still has it,
        else the oldest run tagged as this study's parent, else a new one with the spec as its
        params. Set RUNNING again on resume."""
        if not self.enabled:
            return None
        self.parent_run_id = self._send(lambda: self.find_parent(params, known))
        return self.parent_run_id

    def find_parent(
        self, params: Mapping[str, Any], known: str | None, *, resume: bool = True
    ) -> str:
        """The parent run's id (see start_study); resume=False leaves its status alone."""
        experiment_id = self._experiment()
        run_id = known if known is not None and self._is_live(known) else None
        if run_id is None:
            runs = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{STUDY_TAG}` = '{self.study_name}' "
                f"and tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            run_id = runs[0].info.run_id if runs else None
        if run_id is None:
            run = self.client.create_run(
                experiment_id,
                run_name=self.study_name,
                tags={STUDY_TAG: self.study_name, ROLE_TAG: PARENT_ROLE},
            )
            self._log(run.info.run_id, params=params)
            return run.info.run_id
        if resume:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _is_live(self, run_id: str) -> bool:
        """Whether this server has the run in this experiment, not deleted."""
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:  # no such run here; anything else is the server's trouble
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    def end_study(
        self,
        metrics: Mapping[str, float],
        tags: Mapping[str, Any],
        artifacts: list[Path],
        *,
        status: str = "FINISHED",
        figures: Iterable[Path] = (),
        model: RecommendedModel | None = None,
    ) -> None:
        """Best value, recommendation, files and pictures (under figures/) on the parent run, the
        recommendation as a logged model (`model`); then `status` (finish.parent_status:
        FINISHED only for a study that reached its budget; a rerun sets a KILLED one RUNNING)."""
        if not self.enabled:
            return

        def end() -> None:
            if self.parent_run_id is None:  # the server was away when the study started
                self.parent_run_id = self.find_parent({}, None, resume=False)
            parent = self.parent_run_id
            self._log(parent, metrics=metrics, tags=tags)
            for path in artifacts:
                if path.exists():
                    self.client.log_artifact(parent, str(path))
            for path in figures:
                self.client.log_artifact(parent, str(path), artifact_path=FIGURES_DIR)
            self.client.set_terminated(parent, status=status)
            if model is not None:  # the Models tab: a courtesy that never holds up the parent
                try:
                    log_recommended(self.client, self._experiment(), parent, self.study_name, model)
                except Exception as exc:
                    said = first_line_with_type(exc)
                    self.notify(f"the recommendation was not logged as a model: {said}")

        self._send(end, now=True)

    # --- one trial ------------------------------------------------------------------------------

    def start_trial(
        self, number: int, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None
    ) -> str | None:
        """A child run for trial `number`, nested under the parent run."""
        if not self.enabled:
            return None
        run_id = self._send(lambda: self._create_trial_run(number, params, tags))
        if run_id is None:
            self.missed.add(number)
        else:
            self.run_trial[run_id] = number
        return run_id

    def _create_trial_run(
        self,
        number: int,
        params: Mapping[str, Any],
        extra_tags: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> str:
        if self.parent_run_id is None:  # the server was down when the study started
            self.parent_run_id = self.find_parent({}, None)
        tags = {
            STUDY_TAG: self.study_name,
            ROLE_TAG: TRIAL_ROLE,
            TRIAL_TAG: str(number),
            STATE_TAG: "RUNNING",
            "mlflow.parentRunId": self.parent_run_id,
            **{key: str(value) for key, value in (extra_tags or {}).items()},
        }
        run = self.client.create_run(
            self._experiment(), run_name=f"trial-{number}", tags=tags, start_time=start_time
        )
        self._log(run.info.run_id, params={"trial": number, **params})
        return run.info.run_id

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        """One batch per call: all of an epoch's metrics in one request."""
        self._trial_call(run_id, lambda run: self._log(run, metrics=metrics, step=step))

    def log_values(
        self,
        run_id: str | None,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """What a trial's run gets once, not per epoch: params and tags in one request."""
        self._trial_call(run_id, lambda run: self._log(run, params=params, tags=tags))

    def end_trial(
        self, run_id: str | None, state: str, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Mark the child run with the trial's final state (COMPLETE, PRUNED, FAIL, INTERRUPTED)."""

        def end(run: str) -> None:
            # a run that missed some of its calls is not the trial's record: sync replaces it
            number = self.run_trial.get(run)
            partial = {PARTIAL: "true"} if number in self.missed else {}
            named = {} if number is None else {RUN_NAME_TAG: run_name(number, state, tags or {})}
            self._log(run, tags={STATE_TAG: state, **(tags or {}), **partial, **named})
            self.client.set_terminated(run, status=RUN_STATUS[state])

        self._trial_call(run_id, end)

    def _trial_call(self, run_id: str | None, call: Callable[[str], None]) -> None:
        if not self.enabled or run_id is None:
            return
        if self._send(lambda: call(run_id) or True) is None and run_id in self.run_trial:
            self.missed.add(self.run_trial[run_id])

    # --- when the server does not answer ---------------------------------------------------------

    def _send(self, call: Callable[[], T], *, now: bool = False) -> T | None:
        """One MLflow call. A failure takes the tracker offline, told once, instead of failing
        the trial; offline, calls are dropped and one is tried RETRY_SECONDS after the last
        failure (`now`: this one is tried in any case). The first that gets through runs
        `on_return`, which logs the trials that were missed."""
        if not self.enabled:
            return None
        waited = time.monotonic() - self.last_try
        if self.down_since is not None and waited < RETRY_SECONDS and not now:
            return None
        try:
            result = call()
        except Exception as exc:
            self.last_try = time.monotonic()  # a server that times out takes long to fail
            failed = None if self.remote else write_failure(exc)
            if failed is not None:  # the local store's disk: not a server that comes back
                self.fault = self.fault or WriteError(f"{store_path(self.tracking_uri)}: {failed}")
                self.down_since = self.down_since or time.monotonic()
                return None
            self.went_down(exc)
            return None
        if self.down_since is not None:
            self.down_since = None
            if self.on_return is not None:
                self.on_return()
        return result

    def answered(self) -> None:
        """A call made outside `_send` got through: the server is back."""
        self.down_since = None

    @property
    def shown_uri(self) -> str:
        """The tracking URI as messages show it: redacted."""
        return redact(self.tracking_uri)

    def went_down(self, exc: BaseException) -> None:
        self.last_error = redact(first_line_with_type(exc))
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.notify(
                f"MLflow at {self.shown_uri} did not answer ({self.last_error}); the study "
                "goes on, and what MLflow misses is logged when it answers again, or by "
                "`autotune sync` with this spec"
            )

    # --- a whole trial from the Optuna storage ----------------------------------------------------

    def trial_runs(self, number: int | None = None) -> dict[int, list[Any]]:
        """The study's child runs (or trial `number`'s) by trial number, oldest first; deleted
        runs left out."""
        runs: dict[int, list[Any]] = {}
        token = None
        one = "" if number is None else f" and tags.`{TRIAL_TAG}` = '{number}'"
        while True:
            page = self.client.search_runs(
                [self._experiment()],
                filter_string=f"tags.`{STUDY_TAG}` = '{self.study_name}' "
                f"and tags.`{ROLE_TAG}` = '{TRIAL_ROLE}'{one}",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
            for run in page:
                runs.setdefault(int(run.data.tags[TRIAL_TAG]), []).append(run)
            token = page.token
            if not token:
                return runs

    def log_trial(self, record: TrialRecord) -> str:
        """A child run holding all of a finished trial, as the trial itself would have logged
        it, with the trial's own start and end times."""
        run_id = self._create_trial_run(
            record.number, record.params, {WORKER_TAG: record.worker}, record.start_ms
        )
        for step, metrics in record.metrics:
            self._log(run_id, metrics=metrics, step=step, timestamp=record.end_ms)
        named = {RUN_NAME_TAG: run_name(record.number, record.state, record.tags)}
        self._log(run_id, tags={STATE_TAG: record.state, **record.tags, **named})
        self.client.set_terminated(run_id, status=RUN_STATUS[record.state], end_time=record.end_ms)
        return run_id

    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
        timestamp: int | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = timestamp or int(time.time() * 1000)
        metric = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        param = [Param(k, v) for k, v in redact_params(shown(params or {})).items()]
        tag = [RunTag(k, v) for k, v in redact_params(shown(tags or {})).items()]
        for i in range(0, max(len(metric), len(param), len(tag), 1), BATCH):  # MLflow's limit
            self.client.log_batch(  # what anyone who opens the MLflow UI reads: redacted
                run_id, metrics=metric[i : i + BATCH], params=param[i : i + BATCH],
                tags=tag[i : i + BATCH],
            )  # fmt: skip

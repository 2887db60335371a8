"""MLflow: one parent run per study, one child run per trial nested under it.

The parent run is found again by its tags (autotune.study, autotune.role=parent), so a resumed
study logs into the run it started. Child runs carry the `mlflow.parentRunId` tag, which is what
nests them in the MLflow UI, flat params (`block0.placement`, ...), per-epoch metrics with
step = epoch, and the trial's final state as the tag `autotune.state`: COMPLETE, PRUNED, FAIL, or
INTERRUPTED for a trial stopped by Ctrl-C or SIGTERM (FAIL in Optuna, KILLED in MLflow).

MlflowClient is used directly: it needs no global active run, so nothing leaks between trials.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PARENT_ROLE = "parent"
RUN_STATUS = {
    "COMPLETE": "FINISHED",
    "PRUNED": "FINISHED",
    "FAIL": "FAILED",
    "INTERRUPTED": "KILLED",
}


class Tracker:
    """Logs a study to MLflow. With enabled=False every method is a no-op returning None."""

    def __init__(
        self, tracking_uri: str, experiment: str, study_name: str, *, enabled: bool = True
    ):
        self.enabled = enabled
        self.study_name = study_name
        self.tracking_uri = tracking_uri
        self.parent_run_id: str | None = None
        if not enabled:
            return
        _make_sqlite_folder(tracking_uri)
        from mlflow.tracking import MlflowClient  # heavy: imported only when tracking

        for name in ("mlflow", "alembic"):  # after the import, which sets mlflow's own levels
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(
                experiment, artifact_location=_artifact_location(tracking_uri)
            )
        )

    def start_study(self, params: Mapping[str, Any]) -> str | None:
        """Find or create the study's parent run; log the spec as its params."""
        if not self.enabled:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`autotune.study` = '{self.study_name}' "
            f"and tags.`autotune.role` = '{PARENT_ROLE}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if runs:
            self.parent_run_id = runs[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.study_name,
                tags={"autotune.study": self.study_name, "autotune.role": PARENT_ROLE},
            )
            self.parent_run_id = run.info.run_id
            self._log(self.parent_run_id, params=params)
        return self.parent_run_id

    def start_trial(self, number: int, params: Mapping[str, Any]) -> str | None:
        """A child run for trial `number`, nested under the parent run."""
        if not self.enabled:
            return None
        tags = {
            "autotune.study": self.study_name,
            "autotune.role": "trial",
            "autotune.trial": str(number),
            "autotune.state": "RUNNING",
        }
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags=tags)
        self._log(run.info.run_id, params={"trial": number, **params})
        return run.info.run_id

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        """One batch per call: all of an epoch's metrics in one request."""
        if self.enabled and run_id is not None:
            self._log(run_id, metrics=metrics, step=step)

    def log_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if self.enabled and run_id is not None:
            self._log(run_id, tags=tags)

    def end_trial(
        self, run_id: str | None, state: str, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Mark the child run with the trial's final state (COMPLETE, PRUNED, FAIL, INTERRUPTED)."""
        if not self.enabled or run_id is None:
            return
        self._log(run_id, tags={"autotune.state": state, **(tags or {})})
        self.client.set_terminated(run_id, status=RUN_STATUS[state])

    def end_study(
        self,
        metrics: Mapping[str, float],
        tags: Mapping[str, Any],
        artifacts: list[Path],
        *,
        status: str = "FINISHED",
    ) -> None:
        """Best value, recommendation and files on the parent run; then FINISHED (or KILLED when
        interrupted: a rerun sets it RUNNING again)."""
        if not self.enabled or self.parent_run_id is None:
            return
        self._log(self.parent_run_id, metrics=metrics, tags=tags)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent_run_id, str(path))
        self.client.set_terminated(self.parent_run_id, status=status)

    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'name': 'digits'}} -> {'data.name': 'digits'}, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database; a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def _make_sqlite_folder(uri: str) -> None:
    """sqlite:///runs/x/mlflow.db needs runs/x/ to exist before MLflow opens it."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

"""What a run holds in MLflow, in the names a live trial logs: a finished trial read back from
the Optuna storage (`TrialRecord`), the metrics of a prediction and of a measurement, the spec
flattened into params, and MLflow's run ids and statuses. No MLflow import: the tracker
(tracking.py), the sync (sync.py), the objective, the session and the export share these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from autotune.core.names import (
    CONFIG_ATTR,
    EXPLORED_ATTR,
    EXPLORED_TAG,
    FAIL_REASON_ATTR,
    FAIL_REASON_TAG,
    FINAL_ATTR,
    HISTORY_ATTR,
    INTERRUPTED_ATTR,
    MEASURED_SHIFT_ATTR,
    PREDICTED_SHIFT_ATTR,
    PRUNED_EPOCH_ATTR,
    PRUNED_EPOCH_TAG,
    PRUNED_REASON_ATTR,
    PRUNED_REASON_TAG,
    RELOGGED_RUN,
    RUN_ID_ATTR,
    TRAINED_PREDICTION_ATTR,
    WORKER_ATTR,
)
from autotune.core.theory import summarize_shift
from autotune.search.endings import WORKER_DIED
from autotune.search.queries import trial_config

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

# what MLflow names a run: 32 hex digits (a uuid4). A stored value of any other form is not taken
# for one: sync copies run ids from the tracking server into the study, and export renders them
RUN_ID = re.compile(r"[0-9a-f]{32}")
RUN_STATUS = {
    "COMPLETE": "FINISHED",
    "PRUNED": "FINISHED",
    "FAIL": "FAILED",
    "INTERRUPTED": "KILLED",
}


class TrialRecord:
    """What a finished Optuna trial holds, in the names a live trial logs to MLflow."""

    def __init__(self, trial: FrozenTrial, metric: str) -> None:
        attrs = trial.user_attrs
        self.number = trial.number
        self.state = "INTERRUPTED" if attrs.get(INTERRUPTED_ATTR) else trial.state.name
        self.worker = attrs.get(WORKER_ATTR, "")
        self.params = {} if attrs.get(CONFIG_ATTR) is None else trial_config(trial).to_params()
        self.start_ms = _ms(trial.datetime_start)
        self.end_ms = _ms(trial.datetime_complete) or self.start_ms
        self.metrics: list[tuple[int, dict[str, float]]] = []  # per epoch, the curves
        self.tags: dict[str, Any] = {}
        one_off: dict[str, float] = {}  # the values a trial has once: params and tags
        if PREDICTED_SHIFT_ATTR in attrs:
            one_off.update(predicted_metrics(attrs[PREDICTED_SHIFT_ATTR]))
        if TRAINED_PREDICTION_ATTR in attrs:  # again from its weights, after the first epoch
            self.tags.update(after_epoch_1(predicted_metrics(attrs[TRAINED_PREDICTION_ATTR])))
        history = attrs.get(HISTORY_ATTR) or [
            {"epoch": step, metric: value} for step, value in trial.intermediate_values.items()
        ]
        for row in history:
            self.metrics.append((int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"}))
        if MEASURED_SHIFT_ATTR in attrs:
            one_off.update(measured_metrics(attrs[MEASURED_SHIFT_ATTR], attrs[FINAL_ATTR]))
        params, tags = split_one_off(one_off)
        self.params.update(params)
        self.tags.update(tags)
        if self.state == "PRUNED":
            self.tags[PRUNED_EPOCH_TAG] = attrs.get(PRUNED_EPOCH_ATTR, trial.last_step or 0)
            self.tags[PRUNED_REASON_TAG] = attrs.get(PRUNED_REASON_ATTR, "")
        if self.state == "FAIL":
            # the objective records every failure it sees: without a reason, the worker died
            self.tags[FAIL_REASON_TAG] = attrs.get(FAIL_REASON_ATTR, WORKER_DIED)
        if attrs.get(EXPLORED_ATTR):
            self.tags[EXPLORED_TAG] = True


def split_one_off(values: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Values a trial has once (its predicted and measured Δ, its final metrics) as MLflow
    params and tags, never single-point metric charts: the summaries (`*.worst`, `final.*`) as
    params, which the runs table sorts and the parallel-coordinates view plots; each BN layer's
    value and the products as tags, on the run's page. The metrics are the per-epoch curves."""
    params = {k: v for k, v in values.items() if k.endswith(".worst") or k.startswith("final.")}
    return params, {k: v for k, v in values.items() if k not in params}


def after_epoch_1(values: Mapping[str, float]) -> dict[str, float]:
    """The prediction made again after the first epoch, under names of its own, as tags:
    `after_epoch_1.predicted_delta.worst`, ..."""
    return {f"after_epoch_1.{key}": value for key, value in values.items()}


def predicted_metrics(prediction: Mapping[str, Any]) -> dict[str, float]:
    """`predicted_delta.<bn layer>`, `.worst`, `.product`, from a prediction's dict form, and
    the same for Δ's two factors, `predicted_delta_dropout.*` and `predicted_delta_lag.*`. A
    trial stored before the lag was predicted has the dropout factor alone, which was then its
    whole predicted Δ."""
    layers = prediction["layers"]
    if "delta_summary" not in prediction:  # stored before the lag was predicted
        whole = {name: layer["exact"] for name, layer in layers.items()}
        return _named("predicted_delta", whole, prediction["summary"])
    return {
        **_named("predicted_delta", _values(layers, "delta"), prediction["delta_summary"]),
        **_named("predicted_delta_dropout", _values(layers, "exact"), prediction["summary"]),
        **_named("predicted_delta_lag", _values(layers, "lag"), _summary(layers, "lag")),
    }


def _values(layers: Mapping[str, Any], key: str) -> dict[str, float]:
    return {name: layer[key] for name, layer in layers.items()}


def _summary(layers: Mapping[str, Any], key: str) -> dict[str, Any]:
    summary = summarize_shift(_values(layers, key))
    return {"worst_delta": summary.worst_delta, "product": summary.product}


def _named(
    prefix: str, values: Mapping[str, float], summary: Mapping[str, Any]
) -> dict[str, float]:
    metrics = {f"{prefix}.{name}": value for name, value in values.items()}
    metrics[f"{prefix}.worst"] = summary["worst_delta"]
    metrics[f"{prefix}.product"] = summary["product"]
    return metrics


def measured_metrics(measured: Mapping[str, Any], final: Mapping[str, float]) -> dict[str, float]:
    """`measured_delta.<bn layer>`, `.worst`, `.product`, the same for Δ's two factors
    (`measured_delta_dropout.*`, `measured_delta_lag.*`) where the trial measured them, and
    `final.<name>`."""
    metrics: dict[str, float] = {}
    for factor, prefix in (
        (None, "measured_delta"),
        ("dropout", "measured_delta_dropout"),
        ("lag", "measured_delta_lag"),
    ):
        part = measured if factor is None else measured.get(factor)
        if part is not None:  # None: a trial stored before Δ was factored
            metrics.update(_named(prefix, part["layers"], part["summary"]))
    metrics.update({f"final.{name}": value for name, value in final.items()})
    return metrics


def trial_run_id(study_attrs: Mapping[str, Any], trial: FrozenTrial) -> str | None:
    """The id of the MLflow run that holds `trial`, given the study's user attrs: the one sync
    logged, else the trial's own; None when neither is a run id."""
    return run_id_or_none(study_attrs.get(RELOGGED_RUN.format(trial.number))) or run_id_or_none(
        trial.user_attrs.get(RUN_ID_ATTR)
    )


def run_id_or_none(value: Any) -> str | None:
    """`value` when it is an MLflow run id (RUN_ID), else None."""
    return value if isinstance(value, str) and RUN_ID.fullmatch(value) else None


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


def _ms(moment: Any) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)

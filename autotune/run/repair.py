"""`autotune diagnose` and `autotune fix`: a spec's model with trained weights from a file, its
variance shift measured (autotune.nn.diagnosis), and BN recalibrated, verified and written.

The spec names the model and the data as it does for `run`: `model.import` (the user's own
nn.Module, as its factory builds it, or tuned by a configuration file), or a template with the
configuration its weights were trained with (a recommended.yaml). The weights file is a
state_dict, or a checkpoint that holds one under "state_dict" (Lightning's); its keys may carry a
prefix (Lightning's "model.", DDP's "module."), which the fixed file keeps. Files are read with
torch.load(weights_only=True): data only, no pickled code runs.

Bad input is a SpecError naming the flag or the field, one line: a file that is not there or not
a state_dict, weights that do not fit the model (the keys missing or unexpected, a shape), a
model without a BN layer that keeps running statistics.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from autotune.core.errors import SpecError, first_line
from autotune.core.writes import write_atomic
from autotune.nn.data import load_data, test_batches
from autotune.run.preflight import read_config, resolve_space

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autotune.core.spec import Spec
    from autotune.nn.diagnosis import Diagnosis

WEIGHTS_FLAG = "--weights"
SHOWN_KEYS = 3  # keys named in a line that says which do not fit


@dataclass
class Trained:
    """The spec's model with the file's weights loaded, its data, and how the file names its
    keys."""

    model: nn.Module
    datamodule: Any
    state: dict[str, torch.Tensor]  # the file's state_dict, as the file names its keys
    prefix: str  # what the file's keys carry before the model's own names
    source: Path
    digest: str


@dataclass(frozen=True)
class Fixed:
    """What `fix` did: the diagnosis, the scores on test where there is a test split, and the
    files written (none where it refused or there was nothing to fix)."""

    diagnosis: Diagnosis
    test: dict[str, dict[str, float]] | None  # {"before": ..., "after": ...}
    written: tuple[Path, ...]
    refused: str | None  # why nothing was written


def load_trained(spec: Spec, weights: Path, config_file: Path | None) -> Trained:
    """The model `spec` names with the state_dict in `weights` loaded, and its data."""
    import torch

    from autotune.nn.diagnosis import has_running_bn
    from autotune.nn.models import build_model
    from autotune.nn.surgery import build_imported

    state, digest = read_state_dict(weights)
    data = load_data(spec.data, seed=spec.train.seed, base_dir=spec.base_dir)
    config = None
    if config_file is not None:
        config = read_config(resolve_space(spec, data), config_file)
    shape, classes = data.input_shape, data.n_classes
    if spec.model.imported:
        model = build_imported(spec.model, config, shape, classes, base_dir=spec.base_dir)
    elif config is None:
        raise SpecError(
            f"--config: the template {spec.model.template!r} is built from the configuration its "
            "weights were trained with (the study's recommended.yaml): name that file"
        )
    else:
        model = build_model(spec.model, config, shape, classes, base_dir=spec.base_dir)
    if not has_running_bn(model):
        named = spec.model.import_ or spec.model.template
        raise SpecError(
            f"model: {named!r} has no BatchNorm layer with running statistics: "
            "it has no variance shift to diagnose"
        )
    own, prefix = fit_keys(state, model.state_dict(), weights)
    model.load_state_dict(own)
    cuda = spec.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    model.to("cuda" if cuda else "cpu")
    return Trained(model, data, state, prefix, weights, digest)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict in `path` (or under a checkpoint's "state_dict") and the file's sha256."""
    import torch

    where = f"{WEIGHTS_FLAG}: {path}"
    if not path.is_file():
        raise SpecError(f"{where}: no such file")
    data = path.read_bytes()
    try:  # data only: no pickled code runs
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # not torch's, cut short, a pickle of code, ...
        raise SpecError(
            f"{where}: torch.load(weights_only=True) cannot read it ({first_line(exc)}); "
            "save the weights with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # a checkpoint: Lightning's, or one of its kind
    if not (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise SpecError(f"{where}: holds no state_dict (a mapping of names to tensors)")
    return dict(loaded), hashlib.sha256(data).hexdigest()


def fit_keys(
    state: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of `state` under the model's own names (`wanted`'s), and the prefix the file
    put before them; SpecError naming what does not fit."""
    where = f"{WEIGHTS_FLAG}: {path}"
    prefix = _prefix(state, wanted)
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in wanted if k not in own]
    unexpected = [k for k in own if k not in wanted]
    if missing or unexpected:
        said = [
            f"{what} {_some(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise SpecError(f"{where}: does not fit the model: {'; '.join(said)}")
    for key, tensor in wanted.items():
        if own[key].shape != tensor.shape:
            raise SpecError(
                f"{where}: does not fit the model: {key} is {tuple(own[key].shape)} in the file, "
                f"{tuple(tensor.shape)} in the model"
            )
    return own, prefix


def diagnose_spec(
    spec: Spec, weights: Path, config_file: Path | None
) -> tuple[Diagnosis, nn.Module, Trained]:
    """The diagnosis of the weights in `weights`, the model recalibrated, and what was loaded."""
    from autotune.nn.diagnosis import diagnose

    trained = load_trained(spec, weights, config_file)
    datamodule = trained.datamodule
    diagnosis, fixed = diagnose(
        trained.model,
        datamodule.train_dataloader(),
        datamodule.val_dataloader(),
        traced=spec.model.imported,
        seed=spec.train.seed,
    )
    return diagnosis, fixed, trained


def fix(spec: Spec, weights: Path, config_file: Path | None, out: Path) -> Fixed:
    """Recalibrate BN in the weights of `weights` (dropout off, on the training split), verify
    on validation and on test where there is a test split, and write `out` with the file's own
    keys, and its record beside it (record_path). Nothing is written where there is nothing to
    fix (Diagnosis.needs_fix), or where the recalibrated weights score worse than the input on
    validation or on test."""
    from autotune.nn.fitting import evaluate
    from autotune.nn.weights import save_tensors

    diagnosis, fixed, trained = diagnose_spec(spec, weights, config_file)
    tests = test_batches(trained.datamodule)
    test = None
    if tests is not None:
        test = {
            "before": _scores(evaluate(trained.model, tests)),
            "after": _scores(evaluate(fixed, tests)),
        }
    refused = _refusal(diagnosis, test)
    if refused is not None:
        return Fixed(diagnosis, test, (), refused)
    state = dict(trained.state)  # the file's keys, those the model does not own kept as they are
    state.update({trained.prefix + k: v.cpu() for k, v in fixed.state_dict().items()})
    digest = save_tensors(state, out)
    record = {
        "fixed": {"path": out.name, "sha256": digest},
        "from": {"path": str(trained.source), "sha256": trained.digest},
        "how": "BN recalibrated with dropout off, weights unchanged (autotune fix)",
        "train_rows": diagnosis.train_rows,
        "val": {
            "rows": diagnosis.val_rows,
            "before": _scores(diagnosis.before),
            "after": _scores(diagnosis.after),
        },
        "test": test,
        "layers": {
            layer.name: {"delta": layer.delta, "recalibrated": layer.recalibrated}
            for layer in diagnosis.layers
        },
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    beside = write_atomic(record_path(out), yaml.safe_dump(record, sort_keys=False))
    return Fixed(diagnosis, test, (out, beside), None)


def record_path(out: Path) -> Path:
    """Where `fix` writes what it did beside the fixed weights: <out>.yaml."""
    return out.with_name(out.name + ".yaml")


def _refusal(diagnosis: Diagnosis, test: dict | None) -> str | None:
    from autotune.nn.diagnosis import SHIFTED

    if not diagnosis.needs_fix:
        return (
            f"no BN layer is shifted by more than {100 * SHIFTED:.0f} % and recalibration wins "
            "nothing: the weights are left as they are"
        )
    val = {"before": _scores(diagnosis.before), "after": _scores(diagnosis.after)}
    worse = [
        f"{split} acc {scores['before']['acc']:.4f} -> {scores['after']['acc']:.4f}"
        for split, scores in (
            ("validation", val),
            ("test", test),
        )
        if scores is not None and scores["after"]["acc"] < scores["before"]["acc"]
    ]
    if worse:
        return f"recalibrated, the weights score worse ({'; '.join(worse)})"
    return None


def _scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """evaluate's val_acc and val_loss, as the accuracy and loss of whichever split it scored."""
    return {"acc": metrics["val_acc"], "loss": metrics["val_loss"]}


def _prefix(state: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """The prefix before the model's names in the file's keys: "" where they are the model's;
    else the one that makes them so ("model.", "module."), found from the file's first key."""
    if set(state) == set(wanted):
        return ""
    first = next(iter(state))
    for key in wanted:
        if first.endswith("." + key):
            prefix = first[: -len(key)]
            if {k[len(prefix) :] for k in state if k.startswith(prefix)} == set(wanted):
                return prefix
    return ""


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def log_diagnosis(spec: Spec, diagnosis: Diagnosis, weights: Path, page: str | None) -> str:
    """The diagnosis as a run of its own in the spec's MLflow experiment, in no study (tagged
    DIAGNOSIS_ROLE): each layer's Δ, its factors, the prediction and Δ after recalibration as
    metrics under the names a trial uses, the accuracies, and the HTML page where given. Its run
    id; SpecError naming the tracking URI, redacted, where MLflow fails."""
    from mlflow.entities import Metric, Param

    from autotune.core.names import DIAGNOSIS_ROLE, ROLE_TAG
    from autotune.core.redaction import redact
    from autotune.search.storage import raise_if_disk
    from autotune.search.tracking import Tracker

    if not spec.mlflow.enabled:
        raise SpecError("mlflow.enabled: false: --mlflow has nowhere to log")
    where = f"mlflow.tracking_uri: {redact(spec.tracking_uri)}"
    values = {"val_acc": diagnosis.before["val_acc"], "val_loss": diagnosis.before["val_loss"]}
    values |= {"val_acc_recalibrated": diagnosis.after["val_acc"], "gain": diagnosis.gain}
    for layer in diagnosis.layers:
        values |= {
            f"measured_delta.{layer.name}": layer.delta,
            f"measured_delta_dropout.{layer.name}": layer.dropout,
            f"measured_delta_lag.{layer.name}": layer.lag,
            f"predicted_delta_dropout.{layer.name}": layer.predicted,
            f"measured_delta_recalibrated.{layer.name}": layer.recalibrated,
        }
    try:
        tracker = Tracker(
            spec.tracking_uri, spec.experiment_name, spec.study.name, notify=lambda _: None
        )
        if not tracker.online:
            raise SpecError(f"{where}: does not answer ({tracker.last_error})")
        client = tracker.client
        tags = {ROLE_TAG: DIAGNOSIS_ROLE, "mlflow.runName": f"diagnose {weights.name}"}
        run_id = client.create_run(tracker.experiment_id, tags=tags).info.run_id
        model = spec.model.import_ or spec.model.template
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), 0, 0) for key, value in values.items()],
            params=[Param("weights", weights.name), Param("model", model)],
        )
        if page is not None:
            client.log_text(run_id, page, "diagnosis.html")
        client.set_terminated(run_id)
    except SpecError:
        raise
    except Exception as exc:
        raise_if_disk(exc, spec.tracking_uri)
        raise SpecError(f"{where}: {first_line(exc)}") from None
    return run_id

"""Where a local MLflow store keeps its files, and what the MLflow UI shows of a study: the
experiment's kind, a child run's name, a parameter's value rounded for display, and the
recommendation as a logged model."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from autotune.core.files import SQLITE, url_file
from autotune.core.names import (
    ARTIFACTS_DIR,
    MODEL_DIGEST_TAG,
    PRUNED_EPOCH_TAG,
    RECOMMENDATION_TAG,
    ROLE_TAG,
    STUDY_TAG,
    TRIAL_ROLE,
)
from autotune.core.redaction import redact_params

# while the server does not answer, one call in this many seconds tries again
RETRY_SECONDS = 30.0
# MLflow's HTTP client retries a refused request 7 times over about four minutes by default; a
# trial should not wait that long for its record. The user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# MLflow prints "View run ... at: <tracking URI>" when a run on a server ends, with any password
# in the URI; autotune says where to compare trials itself, redacted (progress.print_summary)
QUIET_URL = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# MLflow's log_batch takes at most 100 params and 100 tags a request
BATCH = 100
# MLflow 3 opens an experiment of no kind on its GenAI overview (traces); this kind opens it on
# its runs, the trials
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
RUN_NAME_TAG = "mlflow.runName"
ENDED = {"COMPLETE": "complete", "FAIL": "failed", "INTERRUPTED": "interrupted"}
SHOWN_DIGITS = 4  # a float param's significant digits in the UI; the storage keeps them all


def run_name(number: int, state: str, tags: Mapping[str, Any]) -> str:
    """A child run's name once its trial ended, which MLflow's runs table shows with no set-up:
    "trial-7 complete", "trial-9 pruned@3" (after epoch 3), "trial-4 gated" (before training),
    "trial-12 failed", "trial-13 interrupted"."""
    if state == "PRUNED":
        epoch = int(tags.get(PRUNED_EPOCH_TAG) or 0)
        return f"trial-{number} {'gated' if epoch == 0 else f'pruned@{epoch}'}"
    return f"trial-{number} {ENDED.get(state, state.lower())}"


def shown(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params as MLflow shows them: each float to SHOWN_DIGITS significant digits (0.02243, not
    0.02243194262920546); the exact values stay in the Optuna storage and recommended.yaml."""
    return {k: f"{v:.{SHOWN_DIGITS}g}" if isinstance(v, float) else v for k, v in params.items()}


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database; a server chooses its own."""
    path = url_file(uri, (SQLITE,))
    return None if path is None else (Path(path).parent / ARTIFACTS_DIR).resolve().as_uri()


def store_path(uri: str) -> str:
    """A local store's file, for a message."""
    return url_file(uri, (SQLITE,)) or uri


def make_sqlite_folder(uri: str) -> None:
    """sqlite:///runs/x/mlflow.db needs runs/x/ to exist before MLflow opens it."""
    path = url_file(uri, (SQLITE,))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def log_recommended(
    client: Any,
    experiment_id: str,
    run_id: str,
    study: str,
    model: RecommendedModel,
) -> str | None:
    """The recommendation as an MLflow 3 logged model of the parent run, where the experiment's
    Models tab shows it: its files in the output folder's layout (so that a download of them
    loads with autotune.load), its configuration as params. Once per set of files, found again
    by their digest: a study ended again logs none twice. Returns the model's id."""
    present = [name for name in model.files if (model.folder / name).is_file()]
    if not present:
        return None
    digest = hashlib.sha256()
    for name in sorted(present):
        contents = hashlib.sha256((model.folder / name).read_bytes()).hexdigest()
        digest.update(f"{name}\0{contents}\0".encode())
    key = digest.hexdigest()
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{MODEL_DIGEST_TAG}` = '{key}'", max_results=1
    )
    if found:
        return found[0].model_id
    logged = client.create_logged_model(
        experiment_id,
        name=model_name(study, model.name),
        source_run_id=run_id,
        tags={STUDY_TAG: study, RECOMMENDATION_TAG: model.name},
        params={k: str(v) for k, v in redact_params(shown(model.params)).items()},
        model_type="pytorch",
    )
    with tempfile.TemporaryDirectory() as folder:
        for name in present:
            target = Path(folder) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model.folder / name, target)
        client.log_model_artifacts(logged.model_id, folder)
    client.finalize_logged_model(logged.model_id, "READY")
    # found again only once whole: a model whose upload failed is logged anew next time
    client.set_logged_model_tags(logged.model_id, {MODEL_DIGEST_TAG: key})
    return logged.model_id


def model_name(study: str, recommended: str) -> str:
    """A logged model's name, "<study>-trial-7": MLflow refuses / : . % " ' in one."""
    return re.sub(r"[/:.%\"'\s]+", "-", f"{study}-{recommended}").strip("-") or "recommended"


@dataclass(frozen=True)
class RecommendedModel:
    """What the end of a study logs as a model: its name ("trial 7", "bn_only"), the output
    folder, the files in it (relative paths), the configuration's params."""

    name: str
    folder: Path
    files: tuple[str, ...]
    params: Mapping[str, Any]


def trials_link(base: str, experiment_id: str, study: str, metric: str, maximize: bool) -> str:
    """The MLflow UI's page of a study's trials: the experiment's runs (not MLflow 3's GenAI
    overview), the parent filtered out so that the trials stand flat, sorted by `metric` at
    their last epoch, the best first.
    From there, comparing every trial takes two clicks (select all, Compare)."""
    where = f"tags.`{ROLE_TAG}` = '{TRIAL_ROLE}'"
    if "'" not in study:  # a name MLflow's filter can quote
        where = f"tags.`{STUDY_TAG}` = '{study}' and {where}"
    query = "&".join(
        (
            "workflowType=machine_learning",
            f"searchFilter={quote(where, safe='')}",
            f"orderByKey={quote(f'metrics.`{metric}`', safe='')}",
            f"orderByAsc={'false' if maximize else 'true'}",
        )
    )
    return f"{_without_userinfo(base).rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def _without_userinfo(url: str) -> str:
    """A server's URL without user and password: a link for a browser, which asks for them."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

"""What a study hands back: the recommendation as recommended.yaml (or .json), and best_model.py
(rendered by autotune.outputs.snippet).

Every file is verified as it is written: the network rebuilt from it (the snippet run, or the
recommendation's blocks built again) must have the tuned network's layers, names and parameter
count, load the trained best model's saved state_dict, and then give the same outputs
(autotune.nn.weights). Each file carries its provenance: study, trial, MLflow run ids, seed and
library versions. Run ids are taken only in MLflow's form (run_fields.RUN_ID).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial
from torch import nn

from autotune.core.errors import UserCodeError
from autotune.core.names import (
    BEST_MODEL,
    BLOCKS_AT,
    INPUT_SHAPE_ATTR,
    INPUT_STATS,
    MEASURED_SHIFT_ATTR,
    METRIC_ATTR,
    N_CLASSES_ATTR,
    PARENT_ATTR,
    PREDICTED_SHIFT_ATTR,
    RECOMMENDED_JSON,
    RECOMMENDED_YAML,
    STANDARDISED_ATTR,
    TRAINED_WITH_ATTR,
)
from autotune.core.redaction import redact
from autotune.core.space import TrialConfig
from autotune.core.spec import Spec
from autotune.core.user_code import USER_ERRORS, raised_in
from autotune.core.writes import write_atomic
from autotune.nn import surgery
from autotune.nn.models import build_model
from autotune.nn.weights import (
    CheckFailed,
    WeightsDoNotLoad,
    own_weights,
    verify_network,
    verify_weights,
)
from autotune.outputs.recommendation import (
    finite,
    inputs_section,
    library_versions,
    model_section,
    rebuild_recommendation,
    robust_section,
)
from autotune.outputs.snippet import (
    render_imported_snippet,
    render_snippet,
    run_snippet,
    verify_load,
)
from autotune.search.queries import (
    current_scores,
    recommended_config,
    recommended_trial,
    recommended_weights,
    state_counts,
)
from autotune.search.run_fields import run_id_or_none, trial_run_id

# what `export --format` writes, and the files' names
FORMATS = {"yaml": RECOMMENDED_YAML, "json": RECOMMENDED_JSON, "py": BEST_MODEL}
DEFAULT_FORMATS = ("yaml", "py")


class NothingToRecommend(RuntimeError):
    """The study has no completed trial: there is nothing to write. `autotune export` says it in
    one line about `study.name`, exit code 2."""


def rewrite_if_run_moved(study: optuna.Study, spec: Spec) -> list[Path]:
    """Write the outputs again when the MLflow run they name for the recommended trial is no
    longer its run (sync logged the trial again, after they were written); return the paths
    written, [] when nothing moved. Only the formats found in the output folder are written."""
    out = spec.output_dir
    present = tuple(f for f, name in FORMATS.items() if (out / name).exists())
    named = [_named_run(out / FORMATS[f]) for f in present if f != "py"]
    trial = recommended_trial(study, spec)
    if trial is None or not named:
        return []
    moved = any(
        number == trial.number and run_id != (trial_run_id(study.user_attrs, trial) or None)
        for number, run_id in named
    )
    return write_outputs(study, spec, present) if moved else []


def _named_run(path: Path) -> tuple[int | None, str | None]:
    """(trial, MLflow run id) of the best trial in recommended.yaml or .json."""
    text = path.read_text()
    best = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)).get("best", {})
    return best.get("trial"), best.get("mlflow_run_id") or None


class Unverified(UserCodeError):
    """The user's factory (`model.import`) failed while the outputs were written: what needs
    no network (recommended.yaml, .json) was written unverified, best_model.py, which is
    rendered from the network, was not (or not verified). The message says which; `written`
    holds the paths."""

    def __init__(self, message: str, written: list[Path]) -> None:
        super().__init__(message)
        self.written = written


def write_outputs(
    study: optuna.Study, spec: Spec, formats: tuple[str, ...] = DEFAULT_FORMATS
) -> list[Path]:
    """Write the study's best trial in each of `formats` (yaml, json, py), each file verified
    against the tuned network; return the paths. Raises NothingToRecommend when no trial has
    completed, CheckFailed (autotune.nn.weights) when a written file fails its check, and
    Unverified, after writing what it could, when the user's factory fails to build the
    network."""
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats: expected some of {', '.join(FORMATS)}, got {list(formats)}")
    trial = recommended_trial(study, spec)
    if trial is None:
        raise NothingToRecommend(f"study {study.study_name!r} has no completed trial to recommend")
    outputs = _Outputs.prepare(study, spec, trial)
    if "py" in formats:
        outputs.write_snippet()
    recommendation = outputs.recommendation()
    for kind in ("yaml", "json"):
        if kind in formats:
            outputs.write_document(kind, recommendation)
    outputs.raise_if_unverified(formats)
    return outputs.written


@dataclass
class _Outputs:
    """One writing of a study's outputs: the recommended trial, its tuned network (None when the
    user's factory fails: `failed`), its saved weights, and what has been written and verified."""

    study: optuna.Study
    spec: Spec
    trial: FrozenTrial  # the best trial, or the robust phase's choice
    name: str  # what is recommended: "trial 7", or a baseline that is as good ("bn_only")
    config: TrialConfig
    shape: tuple[int, ...]
    n_classes: int
    model: nn.Module | None
    blocks: tuple[surgery.FoundBlock, ...]
    failed: UserCodeError | None  # the user's factory, failing now
    weights: Path | None
    absent: str  # why `weights` is None
    written: list[Path] = field(default_factory=list)
    unverified: list[Path] = field(default_factory=list)
    verified: dict[str, str] = field(default_factory=dict)  # file name -> what its check showed
    versions: dict[str, str] = field(default_factory=library_versions)

    @classmethod
    def prepare(cls, study: optuna.Study, spec: Spec, trial: FrozenTrial) -> _Outputs:
        """The tuned network built again, the blocks of an imported model found, the trial's own
        weights looked for; a failing factory recorded, not raised."""
        attrs = study.user_attrs
        chosen = recommended_config(study, spec)
        assert chosen is not None, "a recommendation exists once a trial completed"
        name, config = chosen
        shape, n_classes = tuple(attrs[INPUT_SHAPE_ATTR]), attrs[N_CLASSES_ATTR]
        model: nn.Module | None = None
        blocks: tuple[surgery.FoundBlock, ...] = ()
        failed: UserCodeError | None = None
        try:
            model = build_model(spec.model, config, shape, n_classes, base_dir=spec.base_dir)
            if spec.model.imported:  # where each block is: found in the model its factory builds
                plain = surgery.make_user_model(
                    spec.model, shape, n_classes, base_dir=spec.base_dir
                )
                blocks = surgery.user_blocks(spec.model, plain, shape)
        except UserCodeError as exc:
            failed = exc
        weights, absent = own_weights(*recommended_weights(study, spec))
        built = (shape, n_classes, model, blocks, failed, weights, absent)
        return cls(study, spec, trial, name, config, *built)

    @property
    def out(self) -> Path:
        return self.spec.output_dir

    @property
    def metric(self) -> str:
        return self.study.user_attrs.get(METRIC_ATTR, self.spec.study.metric)

    def tuned(self) -> nn.Module:
        """A fresh copy of the tuned network each time: verification loads weights into it."""
        spec = self.spec
        return build_model(
            spec.model, self.config, self.shape, self.n_classes, base_dir=spec.base_dir
        )

    def provenance(self) -> dict[str, Any]:
        return {
            "study": self.study.study_name,
            "trial": self.trial.number,
            "mlflow_run_id": trial_run_id(self.study.user_attrs, self.trial),
            "seed": self.spec.train.seed,
            "versions": self.versions,
        }

    def check(self, rebuild: Callable[[], nn.Module], source: Path) -> str:
        """What verifying the network `rebuild` builds from `source` against the tuned network
        showed, in words; `not verified: ...` when the user's factory fails."""
        spec = self.spec
        try:
            if self.failed is None:
                rebuilt = rebuild()
                reference = None if self.weights is None else self.tuned()
        except USER_ERRORS as exc:
            if isinstance(exc, UserCodeError):
                self.failed = exc
            elif spec.model.import_ and raised_in(exc, spec.model.import_):
                self.failed = surgery.factory_failed(spec.model, exc)  # best_model.py called it
            else:  # a snippet that does not run: the check fails, loudly
                raise
        if self.failed is not None:
            self.unverified.append(source)
            return f"not verified: {self.failed}"
        assert self.model is not None
        verify_network(rebuilt, self.model, source)
        weights = self.weights
        if weights is None or reference is None:
            return f"same layers and parameter count; {self.absent}"
        try:
            diff = verify_weights(rebuilt, reference, weights, self.shape, source)
        except WeightsDoNotLoad:  # its layers are the tuned network's: the file is not its
            return f"same layers and parameter count; {weights.name} does not fit them, unused"
        return (
            f"same layers and parameter count; loads {weights.name} and then gives the tuned "
            f"network's outputs (largest difference {diff:.2g})"
        )

    def write_snippet(self) -> None:
        """best_model.py, rendered from the tuned network and checked; not written when there is
        no network to render."""
        if self.model is None:
            self.verified[BEST_MODEL] = f"not written: {self.failed}"
            return
        path = self.out / FORMATS["py"]
        header = self.snippet_header()
        code = self.snippet_code(header, self.weights_from_snippet())
        write_atomic(path, code)
        said = self.check(lambda: run_snippet(code, path, header), path)
        if (self.weights is not None and not said.startswith("same layers")) or "unused" in said:
            # weights that do not load: no load() that would fail on them
            code = self.snippet_code(header, None)
            write_atomic(path, code)
        elif self.weights is not None:
            stats = self.out / INPUT_STATS if self.standardised else None
            try:
                diff = verify_load(code, path, self.tuned(), self.weights, stats, self.shape)
                said += f"; its load() gives them from raw inputs (largest difference {diff:.2g})"
            except CheckFailed as exc:
                said += f"; its load() is not verified: {exc}"
        self.verified[BEST_MODEL] = said
        self.written.append(path)

    def snippet_code(self, header: str, weights: str | None) -> str:
        """best_model.py's code: a template's network, or the user's model with the surgery;
        `weights`: what its load() loads, None for no load()."""
        spec = self.spec
        assert self.model is not None
        if not spec.model.imported:
            return render_snippet(
                self.model,
                header,
                self.shape,
                self.training(),
                recalibrate=self.config.recalibrate_bn,
                standardised=self.standardised,
                weights=weights,
            )
        factory = surgery.load_factory(spec.model, base_dir=spec.base_dir)
        kwargs = surgery.factory_kwargs(spec.model, factory, self.shape, self.n_classes)
        return render_imported_snippet(
            spec.model,
            self.model,
            self.blocks,
            self.config,
            header,
            self.shape,
            kwargs,
            self.training(),
            standardised=self.standardised,
            weights=weights,
        )

    def weights_from_snippet(self) -> str | None:
        """The recommendation's weights as best_model.py's load() finds them."""
        return relative_to_output(self.weights, self.out)

    @property
    def standardised(self) -> bool:
        """Whether autotune standardised the inputs (input_stats.pt in the output folder)."""
        return bool(self.study.user_attrs.get(STANDARDISED_ATTR, False))

    @property
    def baseline(self) -> bool:
        """Whether a baseline is recommended instead of the tuned trial."""
        return self.name != f"trial {self.trial.number}"

    @property
    def own_settings(self) -> dict[str, Any]:
        """What the recommended trial recorded it trained with (search.settings); nothing for a
        baseline, which the robust phase trained with the spec's, or a trial from before such
        records."""
        return {} if self.baseline else self.trial.user_attrs.get(TRAINED_WITH_ATTR) or {}

    def train_section(self) -> dict[str, Any]:
        """The `train` settings the recommendation trained with: its own record (a rerun may
        have changed them), the spec's where there is none and for where and how fast it ran."""
        return {**self.spec.train.model_dump(mode="json"), **self.own_settings.get("train", {})}

    def training(self) -> dict[str, Any]:
        """How the recommended network was trained, for best_model.py: its `train` settings
        and its batch size (none for a user's DataModule, which batches itself)."""
        own = self.own_settings
        data = self.spec.data
        batch_size = own.get("data", {}).get("batch_size", data.batch_size)
        batch_size = None if data.datamodule is not None else batch_size
        return {**self.train_section(), "batch_size": batch_size}

    def snippet_header(self) -> str:
        """The first lines of best_model.py's docstring: the trial, its metric, its provenance."""
        provenance = self.provenance()
        where = [
            f"{k} {v}" for k, v in provenance.items() if k != "versions" and v not in (None, "")
        ]
        made_with = [f"{k} {v}" for k, v in provenance["versions"].items()]
        what = trial = f"trial {self.trial.number}, {self.metric} = {self.trial.value:.4f}"
        if self.baseline:
            what = f"the baseline {self.name}, as good as the best tuned one ({trial}) and simpler"
        return (
            f"The network autotune recommends for study {self.study.study_name!r}: {what}.\n\n"
            + textwrap.fill(f"Provenance: {', '.join(where)}; {', '.join(made_with)}.", 99)
        )

    def recommendation(self) -> dict[str, Any]:
        """recommended.yaml's content; its `verified` is this writing's, filled as files are
        written."""
        study, spec, trial, attrs = self.study, self.spec, self.trial, self.study.user_attrs
        blocks_at = [block.bn for block in self.blocks] if self.blocks else attrs.get(BLOCKS_AT)
        return {
            "study": {
                "name": study.study_name,
                "metric": self.metric,
                "direction": study.direction.name.lower(),
                "storage": redact(spec.storage_url),
                "trials": state_counts(study),
            },
            # "trial <n>", or the baseline that is as good as the best tuned one and simpler
            # (robust.verdict): then `blocks` and `best.weights` are the baseline's
            "recommended": self.name,
            "best": {
                "trial": trial.number,
                "value": float(trial.value),
                "mlflow_run_id": trial_run_id(attrs, trial),
                "mlflow_parent_run_id": run_id_or_none(attrs.get(PARENT_ATTR)),
                "weights": str(self.weights) if self.weights is not None else None,
            },
            "model": model_section(spec.model, self.model, self.shape, self.n_classes, blocks_at),
            "blocks": self.config.to_dicts(),
            # true: BN's statistics were re-estimated with dropout off after training; the saved
            # weights hold them, so a production model loads them as they are
            "recalibrate_bn": self.config.recalibrate_bn,
            "shift": None
            if self.baseline
            else {
                "predicted": trial.user_attrs.get(PREDICTED_SHIFT_ATTR),
                "measured": trial.user_attrs.get(MEASURED_SHIFT_ATTR),
            },
            # the settings the trial trained with, which a rerun may have changed since
            "train": self.train_section(),
            "inputs": inputs_section(self.out, self.standardised),
            "robust": robust_section(study, trial),
            # scored once on the test split that no trial, pruner or re-ranking saw
            "test": current_scores(study, spec),
            "versions": self.versions,
            "verified": self.verified,
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def write_document(self, kind: str, recommendation: dict[str, Any]) -> None:
        """recommended.yaml or .json, written, then rebuilt from the text written and checked."""
        path = self.out / FORMATS[kind]
        if self.failed is not None:  # known before it is written: it says so itself
            self.verified[FORMATS[kind]] = f"not verified: {self.failed}"
        if kind == "yaml":
            text = (
                "# autotune's recommendation: the best trial's per-block configuration.\n"
                "# rate is the drop probability; bn_momentum follows PyTorch's convention.\n"
                + yaml.safe_dump(recommendation, sort_keys=False)
            )
            document = yaml.safe_load(text)
        else:  # strict JSON: a number that is not finite is written as null
            text = json.dumps(finite(recommendation), indent=2, allow_nan=False) + "\n"
            document = json.loads(text)
        write_atomic(path, text)
        # rebuilt from the text written, not the file as found: it names the module to import
        self.check(partial(rebuild_recommendation, document, str(path), self.spec.base_dir), path)
        self.written.insert(0, path)

    def raise_if_unverified(self, formats: tuple[str, ...]) -> None:
        """Unverified, naming each file written unverified or not written, when the user's
        factory failed."""
        if self.failed is None:
            return
        said = [
            f"{path.name} {'written unverified' if path in self.written else 'not written'}"
            for path in (self.out / FORMATS[f] for f in formats)
            if path in self.unverified or path not in self.written
        ]
        raise Unverified(f"{self.failed}; {', '.join(said)}", self.written)


def relative_to_output(path: Path | None, out: Path) -> str | None:
    """`path` from the output folder `out`, as best_model.py (which lives there) and the logged
    model's layout name it: "weights/trial_7.pt"; None for no file."""
    return None if path is None else Path(os.path.relpath(path, out)).as_posix()

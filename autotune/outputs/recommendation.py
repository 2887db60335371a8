"""recommended.yaml's sections that describe the study's result (the model, the robust ranking,
the inputs, the library versions), and the network such a document describes, built again.
"""

from __future__ import annotations

import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from torch import nn

from autotune.core.names import INPUT_STATS, ROBUST_ATTR
from autotune.core.space_files import config_from_mapping
from autotune.core.spec import ModelSpec, Spec
from autotune.nn import surgery
from autotune.nn.models import build_model
from autotune.search.queries import best_trial, current_ranking, current_scores, held_out_key

# what recommended.yaml keeps of each row of the robust ranking
ROBUST_KEYS = ("name", "trial", "mean", "sd", "bound", "values", "blocks", "batchnorm", "failed")


def rebuild_recommendation(
    document: dict[str, Any], source: str, base_dir: Path = Path(".")
) -> nn.Module:
    """The network a recommended.yaml/.json describes: its `model` and its `blocks`."""
    described = document["model"]
    shape, n_classes = described["input_shape"], described["n_classes"]
    if "import" in described:
        model_spec = ModelSpec(**{"import": described["import"], "kwargs": described["kwargs"]})
        plain = surgery.make_user_model(model_spec, shape, n_classes, base_dir=base_dir)
        slots = [block.slot() for block in surgery.find_blocks(plain, shape)]
        config = config_from_mapping(document, n_blocks=len(slots), slots=slots, source=source)
    else:
        model_spec = ModelSpec(
            **{key: described[key] for key in ("template", "widths", "activation", "pool")}
        )
        config = config_from_mapping(
            document,
            n_blocks=len(model_spec.resolved_widths),
            template=model_spec.template,
            source=source,
        )
    return build_model(model_spec, config, shape, n_classes, base_dir=base_dir)


def model_section(
    spec: ModelSpec,
    model: nn.Module | None,
    shape: tuple[int, ...],
    n_classes: int,
    blocks_at: list[str] | None,
) -> dict[str, Any]:
    """recommended.yaml's `model`: what builds the network again, and its size (None when the
    network could not be built)."""
    if spec.imported:
        described: dict[str, Any] = {
            "import": spec.import_,
            "kwargs": spec.kwargs,
            # the BN layer of each block, in the order of `blocks`
            "blocks_at": blocks_at,
        }
    else:
        described = {
            **spec.model_dump(mode="json", exclude={"import_", "kwargs"}),
            "widths": spec.resolved_widths,
        }
    return {
        **described,
        "input_shape": list(shape),
        "n_classes": n_classes,
        "parameters": None if model is None else sum(p.numel() for p in model.parameters()),
    }


def robust_section(study: optuna.Study, chosen: FrozenTrial) -> dict[str, Any] | None:
    """The robust ranking (recommend.top_k), baselines beside it; None when there is none that
    answers today's top trials."""
    robust = study.user_attrs.get(ROBUST_ATTR)
    if robust is None or robust.get("choice") != chosen.number:
        return None
    best = best_trial(study)
    return {
        "by": robust["by"],
        "seeds": robust["seeds"],
        "chosen_trial": chosen.number,
        "best_single_trial": None if best is None else best.number,
        "rows": [{k: row[k] for k in ROBUST_KEYS if k in row} for row in robust["rows"]],
        # the pick against the best baseline, by a paired t test over the seeds (run.robust)
        "verdict": robust.get("verdict"),
    }


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def inputs_section(out: Path, standardised: bool) -> dict[str, Any]:
    """Where the input standardisation lives, when autotune standardised the data itself."""
    if not standardised:
        return {"standardised": False}
    stats = out / INPUT_STATS
    return {
        "standardised": True,
        "stats": str(stats),
        "how": "x = (raw - stats['mean']) / stats['std']; stats['classes'][i] is class i",
    }


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("autotune", "torch", "lightning", "optuna", "mlflow", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def trust_lines(study: optuna.Study, spec: Spec) -> list[str]:
    """What the end of a run says of how far to trust its recommendation: the verdict against
    the baselines, then the test split (summary_lines)."""
    said = verdict_line(current_ranking(study, spec), spec.study.metric)
    return [*([said] if said else []), *summary_lines(study, spec)]


def summary_lines(study: optuna.Study, spec: Spec) -> list[str]:
    """What the end of a run says of the test split: the recommendation's score on it, what one
    validation row is worth, and each configuration trained again, on test."""
    stored = current_scores(study, spec)
    if stored is None:
        return []
    name, metric = stored["recommended"], spec.study.metric
    if not stored.get("scored"):
        return [f"test split: {name} not scored ({stored.get('why')})"]
    key = held_out_key(metric)
    low, high = stored[f"{key}_interval"]
    lines = [
        f"test split ({stored['rows']} rows no trial saw): {name} "
        f"{key} {stored[key]:.4f} (95 % {low:.4f} to {high:.4f})"
    ]
    if stored.get("val_rows") and metric == "val_acc":
        lines.append(f"one validation row is worth {1 / stored['val_rows']:.4f} of val_acc")
    for row in stored.get("robust", []):
        low, high = row["interval"]
        lines.append(
            f"  {row['name']}: test {key} {row['mean']:.4f} (95 % {low:.4f} to {high:.4f}) "
            f"over {len(row['values'])} fits"
        )
    return lines


def resampled_by(ranking: dict[str, Any]) -> str:
    """How the robust ranking's configurations were trained again, and tested, in words."""
    folds = ranking.get("folds")
    if folds is None:
        return f"paired t over {len(ranking['seeds'])} seeds"
    return f"corrected paired t over {folds_said(folds)}"


def folds_said(folds: dict[str, Any]) -> str:
    """5 folds × 2 repeats."""
    repeats = folds["repeats"]
    return f"{folds['folds']} folds × {repeats} repeat{'s' if repeats > 1 else ''}"


def verdict_line(ranking: dict[str, Any] | None, metric: str) -> str | None:
    """The robust ranking's verdict in words: whether the tuned choice beats the best baseline
    beyond the noise (robust.against_baselines), and if not, which baseline is as good."""
    verdict = (ranking or {}).get("verdict")
    if verdict is None:
        return None
    scale, unit = (100, "points") if metric == "val_acc" else (1, "")
    gap = f"{scale * verdict['difference']:+.2f} ± {scale * verdict['margin']:.2f} {unit}".rstrip()
    test = f"{resampled_by(ranking)}, one-sided 95 %"
    trial = f"trial {ranking['choice']}"
    if verdict["beats"]:
        return f"{trial} beats the best baseline, {verdict['against']}, by {gap} ({test})"
    lead = "no regulariser needed: " if verdict["as_good"] == "bn_only" else ""
    said = f"{trial}, the best tuned configuration, is {gap} over {verdict['against']} ({test})"
    if verdict.get("recommend") is None:  # the network without BN: not written
        return f"{verdict['as_good']} (without BN) is as good: {said}; {trial} is recommended"
    return f"{lead}{verdict['recommend']} is recommended, as good and simpler: {said}"

"""What a trial of a study means: the settings its trials train with, kept fixed across reruns.

A study stores what its trials train with (`study_settings`: the `train` section but for where
and how fast it runs, the data, the search space, the pruner) when it is created, and a rerun
whose spec changes any of it is refused in one line naming the first change (`check_settings`),
unless the user asks for the change (`autotune run --allow-changes`): then the study takes the
new settings and goes on. Whatever a rerun did, every trial records the `train` and `data`
settings it ran with (`trial_settings`, in its TRAINED_WITH attr), which recommended.yaml gives.

A study stored before these settings were kept has none: it is given today's spec's and
resumes unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from autotune.core.errors import SpecError
from autotune.core.names import TRAINED_WITH_ATTR
from autotune.core.redaction import redact
from autotune.core.space import SearchSpace
from autotune.core.spec import DEFAULT_TEST_FRACTION, Spec

# train fields that change where or how fast a trial runs, not what it learns
HOW_FAST = {"accelerator", "compile", "channels_last"}


# data fields added after studies began to store their settings, each with the value that means
# what trials did before it: left out of the settings there, so such a study resumes unchanged
ADDED_DATA_FIELDS = {"standardize": True}


def settled(spec: Spec, study: optuna.Study, created: bool = False) -> Spec:
    """`spec` with data.test_fraction settled where it says null: the stored study's own, none
    for a study stored before test splits (it resumes as it ran), the default for a new one."""
    if spec.data.test_fraction is not None:
        return spec
    stored = study.user_attrs.get(TRAINED_WITH_ATTR)
    if stored is not None:
        fraction = stored["data"].get("test_fraction") or 0.0
    else:
        fraction = DEFAULT_TEST_FRACTION if created else 0.0
    data = spec.data.model_copy(update={"test_fraction": fraction})
    return spec.model_copy(update={"data": data})


def trial_settings(spec: Spec) -> dict[str, Any]:
    """The `train` and `data` settings a trial trains with (a data file by its content)."""
    data = spec.data.model_dump(mode="json")
    for key, before in ADDED_DATA_FIELDS.items():  # what every study stored before them did
        if data.get(key) == before:
            del data[key]
    if spec.data.path is not None:  # the same rows wherever the file has moved to
        data["path"] = f"sha256:{_digest(spec.data.path)}"
    return {"train": spec.train.model_dump(mode="json", exclude=HOW_FAST), "data": data}


def study_settings(spec: Spec, space: SearchSpace) -> dict[str, Any]:
    """What a study's trials mean: what they train with, what they are drawn from, what stops
    them."""
    return {
        **trial_settings(spec),
        "search_space": {
            **{f"block{i}": _params(block) for i, block in enumerate(space.blocks)},
            "network": _params(space.network),
        },
        "study.pruner": spec.study.pruner.model_dump(mode="json"),
    }


def check_settings(
    study: optuna.Study,
    spec: Spec,
    space: SearchSpace,
    *,
    allow_changes: bool = False,
    notify: Any = None,
) -> None:
    """Store the study's settings where it has none (new, or stored before they were kept);
    where the spec changes them, raise SpecError naming the first change, or, with
    allow_changes, store the new ones and say so through `notify`."""
    now = study_settings(spec, space)
    stored = study.user_attrs.get(TRAINED_WITH_ATTR)
    if stored == now:
        return
    change = None if stored is None else first_change(stored, now)
    if change is None:
        study.set_user_attr(TRAINED_WITH_ATTR, now)
        return
    field, before, after = change
    said = f"{field}: stored study {spec.study.name!r} ran its trials with {before}"
    if not allow_changes:
        raise SpecError(
            f"{said}, the spec says {after}; rerun with --allow-changes to mix them (each trial "
            "keeps its own settings), or choose another study.name"
        )
    study.set_user_attr(TRAINED_WITH_ATTR, now)
    if notify is not None:
        notify(f"{said}, from now on {after} (--allow-changes); each trial records its own")


def first_change(stored: Any, now: Any, path: str = "") -> tuple[str, str, str] | None:
    """(field, stored value, the spec's value) for the first field that differs, by dotted
    path (train.max_epochs, search_space.block0.rate.high); None when none does."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for key in [*stored, *(k for k in now if k not in stored)]:
            inner = f"{path}.{key}" if path else str(key)
            if key not in stored or key not in now:
                return inner, _shown(stored.get(key, "unset")), _shown(now.get(key, "unset"))
            found = first_change(stored[key], now[key], inner)
            if found is not None:
                return found
        return None
    return None if stored == now else (path, _shown(stored), _shown(now))


def _shown(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """A block's parameter domains as plain data: kind and fields (Choice, Range, Fixed)."""
    return {
        name: {"kind": type(domain).__name__, **_plain(asdict(domain))}
        for name, domain in params.items()
    }


def _plain(value: Any) -> Any:
    """Tuples as lists, as the storage gives them back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

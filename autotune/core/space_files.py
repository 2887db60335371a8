"""Search-space files: found in search_spaces/ or by path, read, overridden by the spec and
resolved into a SearchSpace; a hand-written configuration read into a TrialConfig.

No torch here: `validate` imports this module.

A search-space file has `params`, one entry per block parameter. Each entry is one of
- a choice:  {choices: [a, b], default: a}
- a range:   {low: 0.05, high: 0.5, log: false, step: null, default: 0.1}
- a fixed value: {value: 0.1}
A spec overrides an entry for all blocks (search_space.params) or one block (search_space.blocks):
a list replaces the choices, a scalar fixes the value, a mapping is merged into the entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from autotune.core.errors import SpecError, abbreviate, quote_path, shorten
from autotune.core.files import file_problem, read_yaml
from autotune.core.space import (
    NETWORK_PARAMS,
    PARAM_NAMES,
    PLACEMENTS,
    REGULARIZERS,
    BlockConfig,
    Choice,
    Fixed,
    Param,
    Range,
    SearchSpace,
    Slot,
    TrialConfig,
    block_slots,
)


def spaces_dir() -> Path:
    """search_spaces/: inside the installed package, or beside it in a source checkout."""
    package = Path(__file__).resolve().parents[1]  # autotune/, this file being in autotune/core/
    for candidate in (package / "search_spaces", package.parent / "search_spaces"):
        if candidate.is_dir():
            return candidate
    raise SpecError("search_spaces/: folder not found beside the autotune package")


def find_space_file(base: str, base_dir: Path = Path(".")) -> Path:
    """A search space by name (search_spaces/<name>.yaml) or by path (relative to base_dir)."""
    as_path = Path(base) if Path(base).is_absolute() else base_dir / base
    if as_path.suffix in (".yaml", ".yml"):
        problem = file_problem(as_path)
        if problem is not None:
            raise SpecError(f"search_space.base: file {problem}: {quote_path(as_path)}")
        return as_path
    named = spaces_dir() / f"{base}.yaml"
    if "/" in base or file_problem(named) is not None:
        known = ", ".join(name for name, _, _ in list_spaces())
        raise SpecError(
            f"search_space.base: unknown search space {abbreviate(base)}; expected one of: {known}"
        )
    return named


def list_spaces() -> list[tuple[str, Path, str]]:
    """(name, file, description) of every search space shipped in search_spaces/."""
    rows = []
    for path in sorted(spaces_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        rows.append((path.stem, path, str(raw.get("description", ""))))
    return rows


def load_space(
    base: str,
    *,
    params: Mapping[str, Any] | None = None,
    blocks: Mapping[int, Mapping[str, Any]] | None = None,
    n_blocks: int,
    template: str = "",
    slots: Sequence[Slot] | None = None,
    base_dir: Path = Path("."),
) -> SearchSpace:
    """Read a search space, apply the spec's overrides, and resolve it for n_blocks blocks, each
    with what `slots` says it has room for (by default the template's)."""
    room = block_slots(template, n_blocks, slots)
    path = find_space_file(base, base_dir)
    raw = read_yaml(path, what="search space file")
    base_params = raw.get("params") if isinstance(raw, dict) else None
    if not isinstance(base_params, dict):
        raise SpecError(f"{path}: params: expected a mapping of {', '.join(PARAM_NAMES)}")
    _check_names(base_params, f"{path}: params", NETWORK_PARAMS)
    _check_names(params or {}, "search_space.params", NETWORK_PARAMS)
    for index in blocks or {}:
        if not 0 <= index < n_blocks:
            raise SpecError(
                f"search_space.blocks.{index}: the model has {n_blocks} blocks (0..{n_blocks - 1})"
            )
        where = f"search_space.blocks.{index}"
        for name in NETWORK_PARAMS:
            if name in blocks[index]:  # type: ignore[index]
                raise SpecError(
                    f"{where}.{name}: set for the whole network (search_space.params), "
                    "not per block"
                )
        _check_names(blocks[index], where)  # type: ignore[index]

    resolved = []
    for i in range(n_blocks):
        block: dict[str, Param] = {}
        for name in PARAM_NAMES:
            if name not in base_params:
                raise SpecError(f"{path}: params.{name}: missing")
            entry = _as_entry(base_params[name])
            where = f"{path}: params.{name}"
            for layer, section in (
                ((params or {}), "search_space.params"),
                (((blocks or {}).get(i) or {}), f"search_space.blocks.{i}"),
            ):
                if name in layer:
                    entry = _merge(entry, layer[name])
                    where = f"{section}.{name}"
            block[name] = _build(name, entry, where, room[i])
        resolved.append(block)
    network: dict[str, Param] = {}
    for name in NETWORK_PARAMS:  # optional in a file: absent means off
        entry, where = _as_entry(base_params.get(name, False)), f"{path}: params.{name}"
        if name in (params or {}):
            entry, where = _merge(entry, params[name]), f"search_space.params.{name}"  # type: ignore[index]
        network[name] = _build(name, entry, where, None)
    description = str(raw.get("description", ""))
    return SearchSpace(path.stem, description, tuple(resolved), network, tuple(room))


def _check_names(mapping: Mapping[str, Any], where: str, extra: Sequence[str] = ()) -> None:
    known = (*PARAM_NAMES, *extra)
    for name in mapping:
        if name not in known:
            raise SpecError(
                f"{where}.{shorten(str(name), 40)}: unknown parameter; "
                f"expected one of: {', '.join(known)}"
            )


def _as_entry(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list):
        return {"choices": value}
    return {"value": value}


def _merge(entry: dict[str, Any], override: Any) -> dict[str, Any]:
    """A list replaces the choices, a scalar fixes the value, a mapping merges into the entry.

    An inherited default that no longer fits the new choices or range is dropped, so that the
    usual rule applies (the first choice, the middle of the range).
    """
    if isinstance(override, list):
        override = {"choices": override}
    if not isinstance(override, Mapping):
        return _as_entry(override)
    if "value" in override:
        return dict(override)
    if "choices" in override:
        inherited = {"default": entry["default"]} if "default" in entry else {}
        merged = {**inherited, **override}
    else:  # range keys replace a choice; a lone default keeps whatever the entry is
        drop = ("value", "choices") if {"low", "high", "log", "step"} & set(override) else ()
        merged = {**{k: v for k, v in entry.items() if k not in drop}, **override}
    if "default" in merged and "default" not in override and not _default_fits(merged):
        del merged["default"]
    return merged


def _default_fits(entry: dict[str, Any]) -> bool:
    default = entry["default"]
    if "choices" in entry:
        return isinstance(entry["choices"], list) and default in entry["choices"]
    low, high = entry.get("low"), entry.get("high")
    numbers = all(isinstance(v, (int, float)) for v in (low, high, default))
    return not numbers or low <= default <= high  # type: ignore[operator]


def _build(name: str, entry: dict[str, Any], where: str, slot: Slot | None) -> Param:
    """Turn an entry into a Param, checking every value against the parameter's domain."""
    allowed = (
        {"value"}
        if "value" in entry
        else (
            {"choices", "default"}
            if "choices" in entry
            else {"low", "high", "log", "step", "default"}
        )
    )
    extra = sorted(set(entry) - allowed)
    if extra:
        raise SpecError(
            f"{where}.{shorten(str(extra[0]), 40)}: unknown key; "
            f"expected one of: {', '.join(sorted(allowed))}"
        )
    if "value" in entry:
        return Fixed(_check_value(name, entry["value"], f"{where}", slot, fixed=True))
    if "choices" in entry:
        return _build_choice(name, entry, where, slot)
    return _build_range(name, entry, where)


def _build_choice(name: str, entry: dict[str, Any], where: str, slot: Slot | None) -> Param:
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        raise SpecError(f"{where}.choices: expected a non-empty list, got {abbreviate(choices)}")
    for value in choices:
        _check_value(name, value, f"{where}.choices", slot, fixed=False)
    if name in ("regularizer", "placement") and slot is not None:  # leave out what the block
        choices = [c for c in choices if _applies(name, c, slot)]  # has no room for
        if not choices:
            raise SpecError(
                f"{where}.choices: none of {abbreviate(entry['choices'])} applies to {slot.label}"
            )
    default = entry.get("default", choices[0])
    if default not in entry["choices"]:
        raise SpecError(
            f"{where}.default: {abbreviate(default)} is not one of {abbreviate(entry['choices'])}"
        )
    if default not in choices:  # the template left it out
        default = choices[0]
    if len(choices) == 1:
        return Fixed(choices[0])
    return Choice(tuple(choices), default)


def _build_range(name: str, entry: dict[str, Any], where: str) -> Param:
    if name not in ("rate", "bn_momentum"):
        raise SpecError(f"{where}: {name} takes choices or a value, not a range")
    for key in ("low", "high"):
        if key not in entry:
            raise SpecError(f"{where}.{key}: missing")
        if not _is_number(entry[key]):
            raise SpecError(f"{where}.{key}: expected a number, got {abbreviate(entry[key])}")
    low = _check_value(name, entry["low"], f"{where}.low", None, fixed=False)
    high = _check_value(name, entry["high"], f"{where}.high", None, fixed=False)
    log, step = entry.get("log", False), entry.get("step")
    if not isinstance(log, bool):
        raise SpecError(f"{where}.log: expected true or false, got {abbreviate(log)}")
    if low > high:
        raise SpecError(f"{where}: low must not exceed high, got low={low} high={high}")
    if log and low <= 0:
        raise SpecError(f"{where}.low: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise SpecError(f"{where}.step: a log range cannot have a step")
    if step is not None and not (_is_number(step) and 0 < step < math.inf):
        raise SpecError(f"{where}.step: expected a positive number, got {abbreviate(step)}")
    if low == high:
        return Fixed(low)
    mid = math.sqrt(low * high) if log else (low + high) / 2
    default = entry.get("default", mid)
    if not _is_number(default):
        raise SpecError(f"{where}.default: expected a number, got {abbreviate(default)}")
    if not low <= default <= high:  # NaN too
        raise SpecError(f"{where}.default: {abbreviate(default)} is outside [{low}, {high}]")
    default = float(default)
    return Range(low, high, default, log, None if step is None else float(step))


def _is_number(value: Any) -> bool:
    """An int or a float; YAML's true and false are bools, which Python counts as ints."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _applies(name: str, value: str, slot: Slot) -> bool:
    """Whether a placement or regularizer fits the block."""
    if name == "placement":
        return value in slot.placements
    return slot.kind in REGULARIZERS[value]


def _check_value(name: str, value: Any, where: str, slot: Slot | None, *, fixed: bool) -> Any:
    """Raise SpecError unless value lies in the domain of parameter `name`."""
    if name in ("placement", "regularizer") and not isinstance(value, str):
        raise SpecError(f"{where}: expected a name, got {abbreviate(value)}")
    if name == "recalibrate_bn" and not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false, got {abbreviate(value)}")
    if name == "placement" and value not in PLACEMENTS:
        raise SpecError(
            f"{where}: unknown placement {abbreviate(value)}; "
            f"expected one of: {', '.join(PLACEMENTS)}"
        )
    if name == "regularizer":
        choosable = [r for r in REGULARIZERS if r != "stochastic_depth"]
        if value == "stochastic_depth":
            raise SpecError(
                f"{where}: stochastic_depth drops a whole residual branch; "
                "choose it with placement: residual (resnet template)"
            )
        if value not in REGULARIZERS:
            raise SpecError(
                f"{where}: unknown regularizer {abbreviate(value)}; "
                f"expected one of: {', '.join(choosable)}"
            )
    placed = name in ("placement", "regularizer") and fixed and slot is not None
    if placed and not _applies(name, value, slot):  # type: ignore[arg-type]
        raise SpecError(f"{where}: {value} does not apply to {slot.label}")  # type: ignore[union-attr]
    if name in ("rate", "bn_momentum"):
        if not _is_number(value):
            raise SpecError(f"{where}: expected a number, got {abbreviate(value)}")
        if name == "rate" and not 0 <= value < 1:
            raise SpecError(f"{where}: a drop rate must lie in [0, 1), got {abbreviate(value)}")
        if name == "bn_momentum" and not 0 < value <= 1:
            raise SpecError(f"{where}: BN momentum must lie in (0, 1], got {abbreviate(value)}")
        return float(value)
    return value


def describe_space(space: SearchSpace) -> Iterator[tuple[str, str, str]]:
    """(block, parameter, what is searched) rows, for `autotune spaces` and the README."""
    for i, block in enumerate(space.blocks):
        for name, param in block.items():
            yield f"block{i}", name, _describe(param)
    for name, param in space.network.items():
        yield "network", name, _describe(param)


def _describe(param: Param) -> str:
    if isinstance(param, Fixed):
        return f"fixed at {param.value}"
    if isinstance(param, Choice):
        return " | ".join(str(c) for c in param.choices)
    return f"[{param.low}, {param.high}]" + (" log" if param.log else "")


def config_from_mapping(
    raw: Any,
    *,
    n_blocks: int,
    template: str = "",
    slots: Sequence[Slot] | None = None,
    source: str = "config",
) -> TrialConfig:
    """A configuration written by hand or by `export` (recommended.yaml): `blocks`, a list of
    {placement, rate, regularizer, bn_momentum} per block, and optionally `recalibrate_bn`."""
    blocks = raw.get("blocks") if isinstance(raw, Mapping) else None
    if not isinstance(blocks, list):
        raise SpecError(f"{source}: blocks: expected a list with one mapping per block")
    if len(blocks) != n_blocks:
        raise SpecError(f"{source}: blocks: the model has {n_blocks} blocks, got {len(blocks)}")
    room = block_slots(template, n_blocks, slots)
    parsed = []
    for i, block in enumerate(blocks):
        where = f"{source}: blocks[{i}]"
        if not isinstance(block, Mapping):
            raise SpecError(f"{where}: expected a mapping, got {abbreviate(block)}")
        _check_names(block, where)
        # what a block leaves out: plain dropout at PyTorch's BN momentum
        values = {**asdict(BlockConfig()), "regularizer": "dropout", **block}
        for name in PARAM_NAMES:
            if name == "regularizer" and values["placement"] in ("none", "residual"):
                continue  # none has no regulariser; residual means stochastic_depth
            values[name] = _check_value(name, values[name], f"{where}.{name}", room[i], fixed=True)
        if values["placement"] == "none":
            values.update(rate=0.0, regularizer="none")
        elif values["placement"] == "residual":
            values["regularizer"] = "stochastic_depth"
        parsed.append(BlockConfig(**values))
    recalibrate = raw.get("recalibrate_bn", False)
    _check_value("recalibrate_bn", recalibrate, f"{source}: recalibrate_bn", None, fixed=True)
    return TrialConfig(tuple(parsed), recalibrate)

"""Hostile and mutated specs: `autotune validate` says ok or refuses in one line, and `run` does
not fail where validate passed.

Each case is drawn from its own seed, so `pytest tests/test_fuzz.py -k "case_137"` replays it: a
spec (the shipped examples and small ones) with seeded mutations: wrong types, huge, negative,
NaN and infinite numbers, bools for ints, long strings, unknown keys, deep nesting, aliases,
duplicate keys, binary junk, YAML tags and scalars that do not construct, huge files, paths that
are too long, folders or missing, bad data files, bad import paths, unicode. `validate` runs
in-process (CliRunner) with the case's own folder as the working directory, and must end with
exit code 0 or 2; exit 2 prints exactly one `error:` line on stderr, without a traceback; nothing
is written anywhere, the case's folder and the repository included.
An alarm turns a hang into a failure.

Import paths are always of modules that do not exist: `validate` imports the module a spec
names, as any Python import would run it.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from pydantic import BaseModel

from autotune.cli import main
from autotune.core.errors import MAX_LINE
from autotune.core.spec import Spec

ROOT = Path(__file__).resolve().parents[1]
SEED = 14
CASES = 240
# what a one-line error may be at most: "error: ", then the capped line with its note of what it
# left out (errors.one_line)
ERROR_LINE_LIMIT = MAX_LINE + 60
# a case that takes longer has hung (the first import of torch, for user code, included)
CASE_SECONDS = 60
# valid mutants trained for real: 1 trial of 1 epoch each, about a second after the first
RUNS = 5
# folders Python and the tools write into on their own
NOT_OURS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}

Mutation = Callable[[random.Random, dict[str, Any], Path], "str | bytes | dict[str, Any]"]


# --- the specs mutated ---------------------------------------------------------------------------


@functools.cache
def example_text(name: str) -> str:
    return (ROOT / "examples" / name).read_text()


def example(name: str) -> dict[str, Any]:
    spec = yaml.safe_load(example_text(name))
    # their user code is replaced by modules that do not exist: nothing is ever imported
    if "datamodule" in spec.get("data", {}):
        spec["data"]["datamodule"] = "fuzz_absent_data:DataModule"
    if "import" in spec.get("model", {}):
        spec["model"]["import"] = "fuzz_absent_model:build"
    return spec


def bases(data: Path) -> list[dict[str, Any]]:
    small = {"n_samples": 60}
    return [
        example("quickstart.yaml"),
        example("cnn_digits.yaml"),
        example("custom_datamodule/spec.yaml"),
        example("own_model/spec.yaml"),
        tiny_spec(),
        tiny_spec(data={"name": "wine"}, model={"template": "mlp", "widths": [8]}),
        tiny_spec(data={"name": None, "path": str(data / "good.csv")}),
        tiny_spec(data={"name": None, "path": str(data / "good.npz")}),
        tiny_spec(data={"name": "synthetic_tabular", "synthetic": small}),
        tiny_spec(
            data={"name": "synthetic_images", "synthetic": {**small, "image_size": 8}},
            model={"template": "resnet", "widths": [4, 4]},
        ),
        tiny_spec(recommend={"top_k": 1, "current": str(data / "current.yaml")}),
        {},
    ]


def write_data(folder: Path) -> None:
    """Data files, good and bad, that specs may name."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = "\n".join(f"{i},{i % 5},{i % 2}" for i in range(40))
    (folder / "good.csv").write_text("a,b,label\n" + rows + "\n")
    np.savez(folder / "good.npz", x=rng.normal(size=(40, 3)), label=np.arange(40) % 2)
    (folder / "current.yaml").write_text("blocks:\n  - {placement: none}\n  - {placement: none}\n")
    (folder / "dup.csv").write_text("f0,f0,label,label\n" + "1,2,0,0\n3,4,1,1\n" * 5)
    (folder / "header.csv").write_text("f0,f1,label\n")
    (folder / "empty.csv").write_text("")
    (folder / "junk.csv").write_bytes(bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    np.savez(folder / "complex.npz", x=np.ones((10, 2)) + 1j, label=np.arange(10) % 2)
    np.savez(folder / "inf.npz", x=np.ones((10, 2)), label=np.r_[np.arange(9) % 2, np.inf])
    np.save(folder / "single.npy", np.ones(3))
    os.rename(folder / "single.npy", folder / "single.npz")
    (folder / "space.yaml").write_text("params: {rate: [0.1]}\n")
    (folder / "folder.csv").mkdir()
    os.mkfifo(folder / "fifo.yaml")
    (folder / "loop.csv").symlink_to(folder / "loop.csv")


# --- hostile values and where they go ------------------------------------------------------------

HUGE = 10**400
VALUES: list[Any] = [
    *(-1, 0, 1, 2, 3, 7, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 10**20, HUGE, -(10**30)),
    *(0.5, -0.0, 1e-300, 1e300, 0.999999, math.nan, math.inf, -math.inf),
    *(True, False, None, "", "1e-3", "many", "0x10", "auto", "digits", "mlp", "none"),
    *("x" * 10_000, "é" * 300, "☃ ünïcødé ‮", "\x00", "a\nb", "\t", "..", "/", "~"),
    *([], [1, 2], [True], [[[]]], {}, {"a": 1}, {1: 2}),
]
WIDTHS: list[Any] = [
    [1],
    [65_536],
    [65_537],
    [60_000, 60_000],
    [100_000_000_000, 2],
    [True, True],
    [0.5],
    [-3],
    list(range(1, 300)),
    [],
    [8] * 2000,
]
RANGES: list[Any] = [
    {"low": 0.1, "high": 0.4, "step": math.nan},
    {"low": 0.1, "high": 0.4, "step": math.inf},
    {"low": 0.1, "high": 0.4, "step": 0.2},
    {"low": 0.1, "high": 0.4, "log": "no"},
    {"low": 0.4, "high": 0.1},
    {"low": 0.0, "high": 0.99, "log": True},
    {"low": math.nan, "high": 0.4},
    {"low": 0.1, "high": HUGE},
    {"low": True, "high": 0.4},
    {"low": 0.1, "high": 0.4, "default": math.nan},
    {"value": 0.2},
    {"choices": [0.1, 0.2], "default": 0.3},
    {"choices": []},
    {"bogus": 1},
    [0.1, math.nan],
    [0.1, 0.2],
    0.3,
    1.5,
    "dropout",
]


def fields(model: type[BaseModel] = Spec, prefix: str = "") -> Iterator[str]:
    """Every field of the spec, dotted, from the pydantic models themselves."""
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        dotted = prefix + (field.alias or name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from fields(annotation, dotted + ".")
        else:
            yield dotted


FIELDS = sorted(fields())


def put(spec: dict[str, Any], dotted: str, value: Any) -> None:
    node = spec
    *parents, last = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[last] = value


# --- mutations -----------------------------------------------------------------------------------


def a_value(rng: random.Random, spec: dict, folder: Path) -> dict:
    field = rng.choice(FIELDS)
    value = rng.choice(WIDTHS if field == "model.widths" and rng.random() < 0.7 else VALUES)
    put(spec, field, value)
    return spec


def unknown_key(rng: random.Random, spec: dict, folder: Path) -> dict:
    section = rng.choice(["", "study.", "study.pruner.", "data.", "model.", "train.", "mlflow."])
    put(spec, section + rng.choice(["batch_sise", "k" * 5000, "ключ", "1", "base_dir"]), 1)
    return spec


def a_section(rng: random.Random, spec: dict, folder: Path) -> dict:
    section = rng.choice([*Spec.model_fields, "search_space"])
    if rng.random() < 0.3:
        spec.pop(section, None)
    else:
        spec[section] = rng.choice(VALUES)
    return spec


def search_space(rng: random.Random, spec: dict, folder: Path) -> dict:
    where = rng.choice(["params", "blocks"])
    name = rng.choice(["rate", "bn_momentum", "placement", "regularizer", "recalibrate_bn"])
    value = rng.choice(RANGES + VALUES[:20])
    if where == "params":
        put(spec, f"search_space.params.{name}", value)
    else:
        index = rng.choice([0, 1, 5, -1, 10**20, True, "x", None])
        spec.setdefault("search_space", {})
        if not isinstance(spec["search_space"], dict):
            spec["search_space"] = {"base": str(spec["search_space"])}
        spec["search_space"]["blocks"] = {index: {name: value}}
    return spec


def deep(rng: random.Random, spec: dict, folder: Path) -> str:
    depth = rng.choice([30, 47, 48, 60, 200, 999, 1200, 5000])
    opening, closing = rng.choice([("[", "]"), ("{a: ", "}")])
    where = rng.choice(["data:\n  kwargs:\n    x: ", "model:\n  kwargs:\n    x: ", "study: "])
    return where + opening * depth + "1" + closing * depth + "\n"


def aliases(rng: random.Random, spec: dict, folder: Path) -> str:
    kind = rng.choice(["laughs", "many", "cycle", "few", "deep"])
    head = yaml.safe_dump({k: v for k, v in spec.items() if k != "data"})
    if kind == "laughs":
        levels = rng.choice([4, 6, 9])
        body = "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        for i in range(1, levels + 1):
            body += f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    elif kind == "many":
        body = (
            "    a: &a 1\n    b: [" + ", ".join(["*a"] * rng.choice([10, 999, 1001, 5000])) + "]\n"
        )
    elif kind == "cycle":
        body = "    a: &a [1, *a]\n"
    elif kind == "deep":
        body = f"    a: &a {'[' * 30}{']' * 30}\n    b: {'[' * 25}*a{']' * 25}\n"
    else:
        body = "    a: &a {x: 1}\n    b: *a\n    c: *a\n"
    return head + "data:\n  name: digits\n  kwargs:\n" + body


def duplicate(rng: random.Random, spec: dict, folder: Path) -> str:
    lines = yaml.safe_dump(spec).splitlines() or ["study: {}"]
    line = rng.choice(lines)
    lines.insert(rng.randrange(len(lines) + 1), line)
    return "\n".join(lines) + "\n"


def junk(rng: random.Random, spec: dict, folder: Path) -> bytes:
    text = yaml.safe_dump(spec).encode()
    kind = rng.choice(["random", "inserted", "utf16", "bom", "nul", "latin1"])
    if kind == "random":
        return rng.randbytes(rng.choice([1, 100, 5000]))
    if kind == "inserted":
        at = rng.randrange(len(text) + 1)
        return text[:at] + rng.randbytes(rng.choice([1, 8, 64])) + text[at:]
    if kind == "utf16":
        return text.decode().encode("utf-16")
    if kind == "bom":
        return b"\xef\xbb\xbf" + text
    if kind == "nul":
        return text + b"\x00\x00"
    return "study: {name: caf\xe9}\n".encode("latin-1")


def huge_file(rng: random.Random, spec: dict, folder: Path) -> str:
    return "data:\n  kwargs:\n    x: [" + "1, " * rng.choice([360_000, 400_000]) + "1]\n"


def paths(rng: random.Random, spec: dict, folder: Path) -> dict:
    data = folder.parent / "data"
    field = rng.choice(["data.path", "search_space.base", "recommend.current", "output"])
    long_name = "a" * rng.choice([255, 256, 300, 5000])
    choices = [
        f"{long_name}.csv",
        f"{long_name}.yaml",
        "/".join(["d" * 200] * 25) + ".csv",
        "nowhere.csv",
        "nowhere.yaml",
        str(data),
        str(data / "folder.csv"),
        str(data / "fifo.yaml"),
        str(data / "loop.csv"),
        str(data / "good.csv" / "below.csv"),
        "nul\x00.csv",
        *(str(data / name) for name in ("dup.csv", "header.csv", "empty.csv", "junk.csv")),
        *(str(data / name) for name in ("complex.npz", "inf.npz", "single.npz", "space.yaml")),
        str(data / "good.npz"),
    ]
    value = rng.choice(choices)
    if field == "data.path":
        spec["data"] = {"path": value, **({"label": "b"} if rng.random() < 0.2 else {})}
    else:
        put(spec, field, value)
    return spec


def imports(rng: random.Random, spec: dict, folder: Path) -> dict:
    target = rng.choice(
        [
            f"fuzz_absent_{rng.randrange(1000)}:Thing",
            f"fuzz_absent.{'pkg.' * rng.choice([1, 50])}mod:build",
            "not a path",
            "1abc:x",
            ":x",
            "fuzz_absent:",
            "fuzz_ünïcødé:X",
            "fuzz_absent:" + "x" * 10_000,
        ]
    )
    if rng.random() < 0.5:
        spec["data"] = {"datamodule": target, "kwargs": {"n": rng.choice(VALUES)}}
    else:
        spec["model"] = {"import": target, "kwargs": {"k": rng.choice(VALUES)}}
    return spec


def characters(rng: random.Random, spec: dict, folder: Path) -> str:
    text = list(yaml.safe_dump(spec))
    for _ in range(rng.choice([1, 2, 5])):
        at = rng.randrange(len(text) + 1)
        kind = rng.random()
        if kind < 0.4 and at < len(text):
            del text[at]
        elif kind < 0.8:
            text.insert(at, rng.choice(list(":-[]{}&*!|>'\"#%@`, \n\t?0")))
        elif at + 1 < len(text):
            text[at], text[at + 1] = text[at + 1], text[at]
    return "".join(text)


# scalars as written in YAML that PyYAML's constructors choke on, or tags it has no constructor for
RAW_SCALARS = [
    "2020-13-45",
    "2001-02-30 10:00:00",
    "!!timestamp x",
    "!!int abc",
    "!!float x",
    "!!bool maybe",
    "!!binary a",
    "!!null x",
    "!!set [1]",
    "!!omap {a: 1}",
    "!!python/object/apply:os.system [touch pwned]",
    "!custom 3",
    "0o99",
    "1_000",
]


def tags(rng: random.Random, spec: dict, folder: Path) -> str:
    lines = yaml.safe_dump(spec).splitlines()
    values = [i for i, line in enumerate(lines) if ": " in line and not line.endswith(":")]
    at = rng.choice(values)
    lines[at] = lines[at].split(": ", 1)[0] + ": " + rng.choice(RAW_SCALARS)
    return "\n".join(lines) + "\n"


def unicode(rng: random.Random, spec: dict, folder: Path) -> dict:
    field = rng.choice(["study.name", "mlflow.experiment", "data.label", "study.storage"])
    put(spec, field, rng.choice(["日本語", "Ω≈ç√", "\u200b", "\U0001f600" * 50, "a\u2028b"]))
    return spec


def several(rng: random.Random, spec: dict, folder: Path) -> dict:
    for _ in range(rng.choice([2, 3])):
        spec = rng.choice([a_value, unknown_key, search_space, a_value])(rng, spec, folder)
    return spec


# (mutation, weight): values and the search space most, everything at least a few times
MUTATIONS: list[tuple[Mutation, int]] = [
    (a_value, 30),
    (unknown_key, 4),
    (a_section, 5),
    (search_space, 10),
    (deep, 4),
    (aliases, 5),
    (duplicate, 4),
    (junk, 4),
    (huge_file, 1),
    (paths, 12),
    (imports, 5),
    (characters, 8),
    (tags, 5),
    (unicode, 3),
    (several, 10),
]


def draw(index: int, data: Path) -> tuple[random.Random, dict[str, Any], Mutation]:
    """Case `index`'s generator, base spec and mutation, all from its own seed."""
    rng = random.Random(f"{SEED}-{index}")
    spec = {"output": "out", **rng.choice(bases(data))}
    mutations, weights = zip(*MUTATIONS, strict=True)
    return rng, spec, rng.choices(mutations, weights)[0]


def case_text(index: int, folder: Path) -> str | bytes:
    """The spec file of case `index`: a base spec, mutated."""
    rng, spec, mutation = draw(index, folder.parent / "data")
    mutated = mutation(rng, spec, folder)
    if isinstance(mutated, dict):
        return yaml.safe_dump(mutated, allow_unicode=rng.random() < 0.5)
    return mutated


# --- the checks ----------------------------------------------------------------------------------


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root (what Python and the tools keep for themselves aside), with its
    size and modification time."""
    found = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in NOT_OURS]
        for name in files:
            path = Path(folder, name)
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return found


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """A TimeoutError raised in the main thread after `seconds`: a hang fails, it does not wait."""

    def ring(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_data(root / "data")
    return root


@pytest.fixture(scope="module")
def repository() -> Iterator[None]:
    before = listing(ROOT)
    yield
    # nothing written into the repository by any case
    assert listing(ROOT) == before


def validate(folder: Path, text: str | bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`autotune validate spec.yaml` in folder, with folder as the working directory."""
    folder.mkdir()
    spec = folder / "spec.yaml"
    spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.chdir(folder)
    with alarm(CASE_SECONDS):
        return CliRunner().invoke(main, ["validate", "spec.yaml"])


@pytest.mark.parametrize("index", range(CASES), ids=lambda i: f"case_{i}")
def test_validate_says_ok_or_one_line(
    index: int, fuzz_root: Path, repository: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fuzz_root / f"case_{index}"
    text = case_text(index, folder)
    data_before = listing(fuzz_root / "data")
    result = validate(folder, text, monkeypatch)
    shown = text[:300] if isinstance(text, str) else repr(text[:300])
    # no exception escaped the command (a hang ends here as the alarm's TimeoutError)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{result.exception!r} for\n{shown}"
    )
    assert result.exit_code in (0, 2), (result.exit_code, result.output, shown)
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        # exactly one line, an error's, bounded, and no traceback
        assert len(lines) == 1 and lines[0].startswith("error: "), (result.stderr, shown)
        assert len(lines[0]) <= ERROR_LINE_LIMIT, (len(lines[0]), lines[0][:300])
        assert "Traceback" not in result.output
    else:
        assert ": ok: " in result.stdout, result.output
    # validate writes nothing: the case's folder holds its spec alone, the data is untouched
    assert sorted(p.name for p in folder.iterdir()) == ["spec.yaml"]
    assert listing(fuzz_root / "data") == data_before


def test_the_cases_cover_every_mutation(tmp_path: Path) -> None:
    drawn = {draw(index, tmp_path)[2] for index in range(CASES)}
    # at least 200 cases, and every kind of mutation among them
    assert CASES >= 200
    assert drawn == {mutation for mutation, _ in MUTATIONS}


# --- run where validate passed -------------------------------------------------------------------

# the fields a tiny run can take any valid value of: not the budget, epochs or time (the run
# must stay short), nor the learning rate (one that makes training diverge fails the trials, as
# documented, exit code 1), nor torch.compile (tens of seconds)
RUN_FIELDS = [
    f
    for f in FIELDS
    if f.split(".")[0] in ("train", "data", "model", "study", "search_space")
    and f not in ("study.n_trials", "study.timeout", "train.max_epochs", "train.compile")
    and f not in ("train.lr", "data.synthetic.n_samples")
]
RUN_VALUES = [0, 1, 2, 3, 2**32 - 1, 1e-300, 0.5, 0.999999, 10**6, True, "none", [1], [2, 2]]
# the bounds of item 4's ranges, each of which validate takes
EDGES = {
    "largest seed": {"train": {"seed": 2**32 - 1}},
    "narrowest blocks": {"model": {"template": "mlp", "widths": [1, 1]}},
    "decay at its bound": {"train": {"lr": 1e-3, "weight_decay": 2000}},
    "tiny lr, no decay": {"train": {"lr": 1e-300, "weight_decay": 0}},
    "one batch": {"data": {"name": "digits", "batch_size": 10**6}},
    "a day of grace": {"study": {"heartbeat_interval": 86_399, "heartbeat_grace": 86_400}},
}


def tiny_run_spec(name: str, **sections: Any) -> dict[str, Any]:
    """tiny_spec for 1 trial of 1 epoch, nothing logged to MLflow."""
    spec = tiny_spec(
        study={"name": name, "n_trials": 1}, train={"max_epochs": 1}, mlflow={"enabled": False}
    )
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def valid_mutants(folder: Path, count: int, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The first `count` seeded value mutations of a tiny spec that validate."""
    rng, found = random.Random(SEED), []
    for attempt in range(50 * count):
        if len(found) == count:
            break
        spec = tiny_run_spec(f"mutant-{attempt}")
        put(spec, rng.choice(RUN_FIELDS), rng.choice(RUN_VALUES))
        case = folder / f"mutant_{attempt}"
        if validate(case, yaml.safe_dump({**spec, "output": "out"}), monkeypatch).exit_code == 0:
            found.append(case / "spec.yaml")
    return found


def run(spec: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(spec.parent)
    with alarm(CASE_SECONDS):
        return CliRunner().invoke(main, ["run", "spec.yaml"])


def test_run_does_not_fail_where_validate_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mutants = valid_mutants(tmp_path, RUNS, monkeypatch)
    assert len(mutants) == RUNS
    for spec in mutants:
        result = run(spec, monkeypatch)
        # one trial of one epoch trains and is recommended
        assert result.exit_code == 0, (spec.read_text(), result.output[-2000:])
        assert (spec.parent / "out" / "recommended.yaml").is_file()


@pytest.mark.parametrize("case", list(EDGES))
def test_run_takes_the_bounds_validate_takes(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**tiny_run_spec("edge", **EDGES[case]), "output": "out"}))
    # validate takes it, and run trains it
    assert validate(tmp_path / "validate", spec.read_text(), monkeypatch).exit_code == 0
    result = run(spec, monkeypatch)
    assert result.exit_code == 0, result.output[-2000:]
    assert (tmp_path / "out" / "recommended.yaml").is_file()

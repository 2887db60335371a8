"""autotune.core.files: hostile YAML and paths are refused in one line, in well under a second.

The findings are tested through `load_spec` (the spec file) and `autotune validate`, the way a
user meets them; the bounds themselves come from autotune.core.files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from autotune.cli import main
from autotune.core.errors import SpecError
from autotune.core.spec import load_spec

# what "in well under a second" allows on a slow shared machine
FAST = 1.0


def refusal(path: Path) -> tuple[str, float]:
    """The SpecError load_spec raises for path, and the seconds it took."""
    start = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return str(caught.value), time.perf_counter() - start


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def laughs(levels: int, fan: int = 9) -> str:
    """A "billion laughs" under data.kwargs: each level is `fan` aliases of the one before."""
    lines = ["data:", "  kwargs:", f"    l0: &l0 [{', '.join(['lol'] * fan)}]"]
    for i in range(1, levels + 1):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]")
    return "\n".join(lines) + "\n"


# --- duplicate keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        # a whole section twice: PyYAML would keep the second silently
        ("study: {name: a}\nstudy: {name: b}\n", "'study'", 2),
        # a field twice inside a section
        ("train:\n  lr: 0.1\n  max_epochs: 2\n  lr: 0.01\n", "'lr'", 4),
        # 1 and 0x1 are the same int key once read
        ("search_space:\n  blocks:\n    1: {placement: none}\n    0x1: {}\n", "1", 4),
    ],
)
def test_a_duplicate_key_is_refused_naming_it_and_its_line(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    message, seconds = refusal(write(tmp_path, text))
    # the file, the key as written, the line of its second appearance
    assert message == f"{tmp_path / 'spec.yaml'}: duplicate key {key} (line {line})"
    assert seconds < FAST


def test_a_merged_key_may_be_overridden(tmp_path: Path) -> None:
    text = "x: &base {lr: 0.1, max_epochs: 3}\ntrain: {<<: *base, lr: 0.5}\n"
    # YAML's merge key brings the anchor's keys in, and a key beside it overrides one of them:
    # not a duplicate (x itself is an unknown section, so only the reading is checked here)
    from autotune.core.files import read_yaml

    assert read_yaml(write(tmp_path, text))["train"] == {"lr": 0.5, "max_epochs": 3}


# --- aliases -------------------------------------------------------------------------------------


def test_a_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    # 9 ** 9 lists of laughs: validate took it in 0.5 s, and `run` hung expanding it for MLflow
    message, seconds = refusal(write(tmp_path, laughs(8)))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}: too many aliases: ")
    assert "at most 100,000" in message
    assert seconds < FAST


def test_many_aliases_are_refused(tmp_path: Path) -> None:
    # 1,001 uses of one small anchor: each is cheap, but a thousand is past any reuse
    text = "data:\n  kwargs:\n    a: &a 1\n    b: [" + ", ".join(["*a"] * 1001) + "]\n"
    message, seconds = refusal(write(tmp_path, text))
    assert message == f"{tmp_path / 'spec.yaml'}: too many aliases: more than 1,000"
    assert seconds < FAST


def test_a_few_aliases_load(tmp_path: Path) -> None:
    text = laughs(2, fan=3) + "study: {name: reuse}\n"
    spec = load_spec(write(tmp_path, text))
    # three lists of three: the aliases are expanded as YAML says
    assert spec.data.kwargs["l2"] == [[["lol"] * 3] * 3] * 3


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    message, seconds = refusal(write(tmp_path, "data:\n  kwargs:\n    a: &a [1, *a]\n"))
    # a cycle: every walk over it would never end
    assert message == f"{tmp_path / 'spec.yaml'}: an alias refers to the node it is in (line 3)"
    assert seconds < FAST


# --- nesting -------------------------------------------------------------------------------------


def nested(depth: int) -> str:
    """data.kwargs.x holding lists nested so that the document is `depth` levels deep."""
    inner = depth - 3  # the top mapping, data and kwargs
    return "data:\n  kwargs:\n    x: " + "[" * inner + "]" * inner + "\n"


@pytest.mark.parametrize("depth", [51, 999, 5000])
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path: Path, depth: int) -> None:
    # '[' * 5000 ended in a RecursionError traceback
    message, seconds = refusal(write(tmp_path, nested(depth)))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}: ")
    # ours past 50 levels; libyaml's own past 1000
    assert "nested deeper than 50 levels" in message or "nesting depth" in message
    assert seconds < FAST


def test_nesting_at_the_bound_loads(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, nested(50)))
    # 47 lists deep under kwargs: allowed, and walked by pydantic without trouble
    value, levels = spec.data.kwargs["x"], 0
    while value:
        value, levels = value[0], levels + 1
    assert levels == 46


def test_aliases_that_nest_past_the_bound_are_refused(tmp_path: Path) -> None:
    # each anchor is 30 levels deep; used inside another 30, it is 60 deep once expanded
    deep = "[" * 30 + "]" * 30
    text = f"data:\n  kwargs:\n    a: &a {deep}\n    b: {'[' * 30}*a{']' * 30}\n"
    message, seconds = refusal(write(tmp_path, text))
    # the line is the anchor's: an alias is the anchored node itself, met again
    assert message == (
        f"{tmp_path / 'spec.yaml'}: nested deeper than 50 levels once aliases are expanded "
        "(the anchor on line 3)"
    )
    assert seconds < FAST


# --- size and kind of file -----------------------------------------------------------------------


def test_a_file_over_the_size_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # 20 MB of valid YAML: 137 s to validate before
    path = tmp_path / "big.yaml"
    with path.open("w") as file:
        file.write("data:\n  kwargs:\n    x: [")
        file.write("1, " * 7_000_000)
        file.write("1]\n")
    message, seconds = refusal(path)
    size = path.stat().st_size
    assert message == f"{path}: spec file is {size:,} bytes; at most 1,048,576 are read"
    assert seconds < FAST


def test_a_folder_or_a_fifo_is_not_a_spec(tmp_path: Path) -> None:
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert refusal(folder)[0] == f"{folder}: spec file is a folder, not a file"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    # opening a FIFO would wait for a writer forever: it is refused by its kind
    message, seconds = refusal(fifo)
    assert message == f"{fifo}: spec file is not a regular file"
    assert seconds < FAST


def test_a_huge_integer_is_refused_with_its_line(tmp_path: Path) -> None:
    # Python refuses to read more than 4300 digits: a ValueError traceback before
    message, _ = refusal(write(tmp_path, "train:\n  seed: " + "9" * 5000 + "\n"))
    assert (
        message == f"{tmp_path / 'spec.yaml'}: an integer of 5,000 digits (line 2); at most 4,300"
    )


# --- paths too long, and other OS errors ---------------------------------------------------------


LONG = "a" * 300  # one name longer than the 255 bytes a file system holds


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"data": {"path": f"{LONG}.csv"}}, "data.path"),
        ({"recommend": {"current": f"{LONG}.yaml"}}, "recommend.current"),
        ({"output": f"runs/{LONG}"}, "output"),
        # a storage or tracking file: validate said ok, and run failed opening it
        ({"study": {"storage": f"sqlite:///runs/{LONG}.db"}}, "study.storage"),
        ({"study": {"storage": f"journal:///runs/{LONG}.journal"}}, "study.storage"),
        ({"mlflow": {"tracking_uri": f"sqlite:///{LONG}/mlflow.db"}}, "mlflow.tracking_uri"),
    ],
)
def test_a_path_too_long_names_its_field(tmp_path: Path, section: dict, field: str) -> None:
    # OSError: File name too long, a traceback, before
    message, seconds = refusal(write(tmp_path, yaml.safe_dump(section)))
    assert message.startswith(f"{tmp_path / 'spec.yaml'}: {field}: ")
    assert "path too long for the file system" in message
    # the path is echoed by its start only
    assert "…" in message and len(message) < 400
    assert seconds < FAST


def test_a_storage_path_too_long_in_the_environment_is_refused_at_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOTUNE_STORAGE", f"sqlite:///{LONG}.db")
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, "study: {name: x}\n"))])
    assert result.exit_code == 2, result.output
    assert "study.storage: path too long for the file system" in result.stderr


def test_a_search_space_path_too_long_names_its_field(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["validate", str(write(tmp_path, f"search_space: {LONG}.yaml\n"))]
    )
    # refused when the space is resolved, in one line that names the field
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: search_space.base: file path too long")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_spec_path_too_long_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(tmp_path / f"{LONG}.yaml")])
    assert result.exit_code == 2, result.output
    assert "spec file path too long for the file system" in result.stderr
    assert "Traceback" not in result.output


def test_a_link_loop_names_the_field(tmp_path: Path) -> None:
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    message, _ = refusal(write(tmp_path, "data: {path: loop.csv}\n"))
    # ELOOP is an OSError of its own: said in the field's words
    assert message.startswith(f"{tmp_path / 'spec.yaml'}: data.path: file cannot be read: ")
    assert "symbolic links" in message


# --- the helpers ---------------------------------------------------------------------------------


def test_file_problem_says_what_keeps_a_path_from_being_read(tmp_path: Path) -> None:
    from autotune.core.files import file_problem

    (tmp_path / "file").write_text("x")
    # a regular file is fine
    assert file_problem(tmp_path / "file") is None
    assert file_problem(tmp_path / "gone") == "not found"
    # a path through a file (ENOTDIR) does not exist either
    assert file_problem(tmp_path / "file" / "below") == "not found"
    assert file_problem(tmp_path) == "is a folder, not a file"
    # a name of 256 bytes, or a path of more than 4096, cannot exist
    assert file_problem(tmp_path / ("b" * 256)) == "path too long for the file system"
    deep = Path(*(["c" * 200] * 21))
    assert file_problem(deep) == "path too long for the file system"
    # a NUL byte cannot be in a path
    assert file_problem(Path("a\0b")).startswith("not found")


def test_abbreviate_keeps_error_lines_short() -> None:
    from autotune.core.errors import abbreviate, shorten

    # a long value: its start, then "…", 80 characters in all
    text = abbreviate("x" * 1_000_000)
    assert len(text) == 80 and text.startswith("'xxx") and text.endswith("…")
    # a short one as repr gives it
    assert abbreviate("lr") == "'lr'" and abbreviate(0.5) == "0.5"
    # a list of a million items is not rendered whole
    assert abbreviate(list(range(1_000_000))) == "[0, 1, 2, 3, 4, 5, ...]"
    # an int too long for Python to print
    assert abbreviate(10**5000) == "an integer of 16,610 bits"
    # line breaks in a name are escaped: an error stays one line
    assert shorten("a\nb\u2028c") == "a\\nb\\u2028c"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("2020-13-45", "'2020-13-45' cannot be read as timestamp: month must be in 1..12"),
        ("!!timestamp 2020-02-30", "cannot be read as timestamp: day is out of range"),
        ("!!int abc", "'abc' cannot be read as int"),
        ("!!float xyz", "'xyz' cannot be read as float"),
        ("!!timestamp x", "'x' cannot be read as timestamp"),
        ('!!binary "a"', "failed to decode base64 data"),  # PyYAML says this one itself
    ],
)
def test_a_value_yaml_cannot_construct_is_one_line_with_its_line(
    tmp_path: Path, value: str, said: str
) -> None:
    # PyYAML raises a bare ValueError for these, which was a traceback
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"study:\n  name: x\ndata:\n  name: {value}\n")
    message, _ = refusal(spec)
    assert "not valid YAML (line 4)" in message and said in message

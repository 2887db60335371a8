"""Files the user names: looked at before they are opened, and YAML read within bounds.

A spec, a search-space file, a `predict --config` file and `recommend.current` are YAML that
anyone may have written. `read_yaml` refuses, in one line and before any of it is used:
- a file larger than MAX_BYTES, by its size on disk, before reading it (YAML is parsed at a few
  hundred kilobytes a second: a 20 MB file would take minutes);
- anything but a regular file (a folder, a FIFO that would block, /dev/zero that never ends);
- a duplicate key in a mapping (PyYAML keeps the last one silently), naming the key and its line;
- aliases that multiply the document ("billion laughs": nine aliases of nine aliases of ...
  load as a few shared lists, and every walk over them, pydantic's, the MLflow params', visits
  each copy): more than MAX_ALIASES aliases, or more than MAX_ALIAS_NODES nodes added by them;
  an alias inside its own anchor (a cycle) too;
- nesting deeper than MAX_DEPTH, aliases expanded, so that neither the constructor nor anything
  that walks the result recursively (pydantic, run_fields.flatten) reaches Python's recursion
  limit. libyaml itself refuses nesting past 1000 levels.

`file_problem` says what is wrong with a path that should name a readable file, for any OSError
(a name too long for the file system, a loop of links, a folder without permission), so that
each caller can put it after its own field.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from autotune.core.errors import PATH_LIMIT, SpecError, abbreviate, first_line, shorten

# a spec is a few kilobytes; 1 MiB leaves room for long inline kwargs and still parses in
# about a second on a slow machine
MAX_BYTES = 1024 * 1024
# the spec's own sections nest 6 deep (search_space.blocks.1.rate.choices); kwargs get the rest
MAX_DEPTH = 50
# a hand-written spec uses a handful of aliases; a thousand is far past any reuse
MAX_ALIASES = 1000
MAX_ALIAS_NODES = 100_000
# Linux and macOS: the longest name of one folder or file, and of a whole path, in bytes
NAME_MAX = 255
PATH_MAX = 4096

# Python converts no longer decimal text to an int (sys.get_int_max_str_digits, 3.11 on)
MAX_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300

_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
# libyaml's parser (fast) where PyYAML was built with it, PyYAML's own otherwise
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """The safe loader, whose constructors' own errors are YAML errors at the value's line: a
    date that is not one (`2020-13-45`), `!!int abc`, `!!float x`, `!!timestamp x` raise a bare
    ValueError, TypeError or AttributeError in PyYAML."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # ValueError, TypeError, even AttributeError (!!timestamp x)
            what = (
                f"the value {abbreviate(node.value)}" if isinstance(node.value, str) else "a value"
            )
            problem = f"{what} cannot be read as {node.tag.rsplit(':', 1)[-1]}: {first_line(exc)}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def file_problem(path: Path) -> str | None:
    """What keeps `path` from being read as a file, as words to follow "file" or a file's
    name ("not found", "is a folder", ...); None when it is a regular file."""
    if path_too_long(path):
        return "path too long for the file system"
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "not found"
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return "path too long for the file system"
        return f"cannot be read: {exc.strerror or type(exc).__name__}"
    except ValueError:  # a NUL byte in the path
        return "not found: the path holds a NUL character"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


# the URL schemes whose rest is a file's path: sqlite:///runs/x.db, journal:///runs/x.journal
# (three slashes: a relative path; four: journal:////abs/x.journal, an absolute one)
SQLITE = "sqlite:///"
JOURNAL = "journal:///"


def url_file(url: str, schemes: tuple[str, ...] = (SQLITE, JOURNAL)) -> str | None:
    """The file a storage or tracking URL of one of `schemes` keeps its data in, as written
    after the scheme; None for any other URL (a server's)."""
    for scheme in schemes:
        if url.startswith(scheme):
            return url.removeprefix(scheme)
    return None


def path_too_long(path: Path) -> bool:
    """Whether a path has a name (one folder or the file) or a whole length the file system
    cannot hold: opening it would fail with ENAMETOOLONG."""
    text = os.fsencode(path)
    return len(text) > PATH_MAX or any(len(part) > NAME_MAX for part in text.split(b"/"))


def read_yaml(path: Path, *, what: str = "file") -> Any:
    """A YAML file's content ({} when empty); SpecError naming the file when it cannot be read
    or breaks one of the bounds above."""
    shown = shorten(str(path), PATH_LIMIT)
    problem = file_problem(path)
    if problem is not None:
        raise SpecError(f"{shown}: {what} {problem}")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SpecError(f"{shown}: {what} is {size:,} bytes; at most {MAX_BYTES:,} are read")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)  # a file that grew since the stat is cut here
    except OSError as exc:
        raise SpecError(f"{shown}: {what} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise SpecError(f"{shown}: {what} is over {MAX_BYTES:,} bytes; at most that are read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{shown}: not UTF-8 text") from None
    try:
        return _load(text, shown) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None)
        said = f": {shorten(problem, 200)}" if problem else ""
        raise SpecError(f"{shown}: not valid YAML{where}{said}") from None


def _load(text: str, shown: str) -> Any:
    """Compose the document, check its node graph, then construct Python objects from it."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML's own composer recurses once per level
            raise SpecError(f"{shown}: nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        check_nodes(node, loader, shown)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_nodes(root: yaml.Node, loader: Any, shown: str) -> None:
    """Refuse duplicate keys, cycles, too many aliases and too deep a nesting, walking the
    composed nodes once without recursion. An alias is the same node object met again."""
    height: dict[int, int] = {}  # id(node) -> levels below and including it, aliases expanded
    size: dict[int, int] = {}  # id(node) -> nodes, aliases expanded
    open_nodes: set[int] = set()
    aliases = 0
    # (node, its depth, whether its children are done)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode) and key not in size:
            if node.tag == _INT_TAG and len(node.value) > MAX_INT_DIGITS:
                line = node.start_mark.line + 1
                raise SpecError(
                    f"{shown}: an integer of {len(node.value):,} digits (line {line}); "
                    f"at most {MAX_INT_DIGITS:,}"
                )
            height[key] = size[key] = 1
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            height[key] = 1 + max((height[id(c)] for c in children), default=0)
            size[key] = 1 + sum(size[id(c)] for c in children)
            continue
        line = node.start_mark.line + 1
        if key in open_nodes:
            raise SpecError(f"{shown}: an alias refers to the node it is in (line {line})")
        if key in size:  # an alias of a node already walked
            aliases += 1
            if aliases > MAX_ALIASES:
                raise SpecError(f"{shown}: too many aliases: more than {MAX_ALIASES:,}")
            if depth + height[key] - 1 > MAX_DEPTH:
                raise SpecError(
                    f"{shown}: nested deeper than {MAX_DEPTH} levels once aliases are expanded "
                    f"(the anchor on line {line})"
                )
            continue
        if depth > MAX_DEPTH:
            raise SpecError(f"{shown}: nested deeper than {MAX_DEPTH} levels (line {line})")
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, loader, shown)
        open_nodes.add(key)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in reversed(children))
    added = size[id(root)] - len(size)
    if added > MAX_ALIAS_NODES:
        raise SpecError(
            f"{shown}: too many aliases: they expand the document by {added:,} nodes; "
            f"at most {MAX_ALIAS_NODES:,}"
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_keys(node: yaml.MappingNode, loader: Any, shown: str) -> None:
    """A key written twice in one mapping (merged keys, `<<: *base`, may be overridden)."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise SpecError(f"{shown}: duplicate key {abbreviate(key)} (line {line})")
        seen.add(key)

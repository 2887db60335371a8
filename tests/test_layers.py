"""The module graph of autotune/ is layered and acyclic. Each layer is a folder of the package
(autotune/core/, autotune/nn/, ...), lowest first in LAYERS; every import of an autotune module,
at the top of a file or inside a function, points to a lower layer, or to a module of the same
layer that imports nothing back. The core layer imports no heavy library at import time.

A module outside the layer folders must be in TOP_LEVEL, with the layer its imports allow.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autotune"

# lowest first, each a folder autotune/<layer>/ (cli is autotune/cli.py): a module may import
# only from lower layers, and from its own layer without a cycle
LAYERS: dict[str, str] = {
    "core": "no torch, optuna, lightning or mlflow at import: validate and --help stay fast",
    "nn": "the network, its regularisers, the data and the fit (torch)",
    "search": "where a study lives and how it is read and logged (optuna, mlflow)",
    "outputs": "what a study hands back",
    "run": "running a study",
    "cli": "the command line, on top",
}
# the modules at the top of the package, and the layer each sits in
TOP_LEVEL: dict[str, str] = {
    "__init__": "outputs",  # the version, and autotune.load (outputs.loading, when called)
    "pruners": "search",  # the pruner's public path: autotune.pruners.VarianceShiftPruner
    "cli": "cli",
    "cli_common": "cli",  # how every command fails and prints
    "cli_repair": "cli",  # diagnose and fix
    "cli_study": "cli",  # trials and init
}
HEAVY = ("torch", "optuna", "lightning", "mlflow")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module, line, at the top level) for every import in `tree`, those under
    `if TYPE_CHECKING:` left out. Autotune's modules are named in full (`autotune.core.names`;
    `from autotune.core import names` names `autotune.core.names`); any other import by its
    top-level package."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for part in child.orelse:  # the else branch runs
                    visit_one(part, top)
                continue
            visit_one(child, top)

    def visit_one(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((_named(alias.name), node.lineno, top))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _ours(node.module) and node.module.count(".") < 2:  # from autotune.core import x
                found.extend((f"{node.module}.{a.name}", node.lineno, top) for a in node.names)
            else:
                found.append((_named(node.module), node.lineno, top))
        inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        visit(node, top and not inner)

    visit(tree, True)
    return found


def _ours(module: str) -> bool:
    return module == "autotune" or module.startswith("autotune.")


def _named(module: str) -> str:
    return module if _ours(module) else module.split(".")[0]


def module_name(path: Path, package: Path) -> str:
    """autotune/core/names.py -> core.names; a folder's __init__.py -> the folder (core);
    autotune/__init__.py -> __init__."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    head = module.split(".")[0]
    if "." not in module and module in TOP_LEVEL:
        return TOP_LEVEL[module]
    is_folder = "." in module or (PACKAGE / head).is_dir()
    return head if is_folder and head in LAYERS and head != "cli" else None


def edges(package: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    """module -> [(autotune module it imports, line)], every import counted. An import of a name
    that is no module (`from autotune.core import x`, x defined in core/__init__.py) counts as
    one of the package that defines it."""
    paths = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p, package): p for p in paths}
    graph: dict[str, list[tuple[str, int]]] = {}
    for module, path in modules.items():
        graph[module] = []
        for name, line, _ in imports(ast.parse(path.read_text(), str(path))):
            if not _ours(name) or name == "autotune":
                continue
            target = name.removeprefix("autotune.")
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            graph[module].append((target, line))
    return graph


def problems(package: Path = PACKAGE) -> list[str]:
    """Every breach of the layering, each naming the edge `a -> b (line N)`."""
    graph = edges(package)
    order = list(LAYERS)
    found = []
    for module in sorted(m for m in graph if layer_of(m) is None):
        found.append(
            f"autotune/{module.replace('.', '/')}.py is in no layer: move it into a layer's "
            "folder, or add it to TOP_LEVEL in tests/test_layers.py"
        )
    for module in sorted(set(TOP_LEVEL) - set(graph)):
        found.append(f"{module} is in TOP_LEVEL but there is no autotune/{module}.py")
    for module, targets in graph.items():
        for target, line in targets:
            if target not in graph:
                found.append(f"{module} -> {target} (line {line}): no such autotune module")
                continue
            here, there = layer_of(module), layer_of(target)
            if here and there and order.index(there) > order.index(here):
                found.append(
                    f"{module} -> {target} (line {line}): {module} is in layer {here!r}, "
                    f"{target} in the higher {there!r}"
                )
    for first, cycle in cycles(graph):
        found.append(f"cycle in layer {layer_of(first)!r}: {cycle}")
    return found


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str]]:
    """Each cycle among modules of one layer: its first module, and the cycle as
    `a -> b (line N) -> ... -> a (line M)`, each line that of the import in the module before
    its arrow."""
    found: list[tuple[str, str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[tuple[str, int]] = []  # (module, line of its import of the next one)

    def visit(module: str) -> None:
        state[module] = "open"
        for target, line in graph.get(module, []):
            if target not in graph or layer_of(target) != layer_of(module):
                continue
            if state.get(target) == "open":
                chain = [*path, (module, line)]
                start = next(i for i, (m, _) in enumerate(chain) if m == target)
                loop = chain[start:]
                steps = [
                    f" -> {loop[(i + 1) % len(loop)][0]} (line {at})"
                    for i, (_, at) in enumerate(loop)
                ]
                found.append((target, target + "".join(steps)))
            elif target not in state:
                path.append((module, line))
                visit(target)
                path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_every_module_has_one_layer_and_imports_only_downward() -> None:
    found = problems()
    assert not found, "the module layers are broken:\n" + "\n".join(found)


def test_every_layer_is_a_folder_of_the_package() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) - {"cli"}
    assert (PACKAGE / "cli.py").is_file()


def test_the_core_layer_imports_no_heavy_library_at_import_time() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path, PACKAGE)
        if layer_of(module) != "core":
            continue
        for name, line, top in imports(ast.parse(path.read_text(), str(path))):
            if top and name in HEAVY:
                found.append(f"{module} -> {name} (line {line}) at import time")
    assert found == [], "core must import none of " + ", ".join(HEAVY) + ":\n" + "\n".join(found)


def test_an_upward_import_or_a_cycle_is_caught(tmp_path: Path) -> None:
    # a copy of the real package, with one edge up and one cycle in core added to it
    copy = tmp_path / "autotune"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    spaces = copy / "core" / "space.py"
    spaces.write_text(
        spaces.read_text() + "\n\ndef _up():\n    from autotune.run.loop import run_study\n"
    )
    names = copy / "core" / "names.py"
    names.write_text(names.read_text() + "\nimport autotune.core.redaction\n")
    redaction = copy / "core" / "redaction.py"
    redaction.write_text(redaction.read_text() + "\nfrom autotune.core import names\n")
    (copy / "stray.py").write_text("")
    found = problems(copy)
    line = len(spaces.read_text().splitlines())
    assert (
        f"core.space -> run.loop (line {line}): core.space is in layer 'core', "
        "run.loop in the higher 'run'"
    ) in found
    names_line = len(names.read_text().splitlines())
    redaction_line = len(redaction.read_text().splitlines())
    assert (
        f"cycle in layer 'core': core.redaction -> core.names (line {redaction_line}) "
        f"-> core.redaction (line {names_line})"
    ) in found
    assert any(f.startswith("autotune/stray.py is in no layer") for f in found)
    assert len(set(found) - set(problems())) == 3, found


@pytest.mark.parametrize(
    ("code", "seen"),
    [
        ("import torch\n", [("torch", 1, True)]),
        ("def f():\n    import torch\n", [("torch", 2, False)]),
        ("from autotune.core.spec import x\n", [("autotune.core.spec", 1, True)]),
        ("import autotune.run.loop as loop\n", [("autotune.run.loop", 1, True)]),
        (
            "from autotune.core import names, theory\n",
            [("autotune.core.names", 1, True), ("autotune.core.theory", 1, True)],
        ),
        ("from autotune import cli\n", [("autotune.cli", 1, True)]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
            [("typing", 1, True)],
        ),
        ("if TYPE_CHECKING:\n    import torch\nelse:\n    import numpy\n", [("numpy", 4, True)]),
        ("try:\n    import torch\nexcept ImportError:\n    pass\n", [("torch", 2, True)]),
        (
            "class A:\n    def f(self):\n        from autotune.nn import x\n",
            [("autotune.nn.x", 3, False)],
        ),
    ],
)
def test_imports_are_found_wherever_they_are(code: str, seen: list) -> None:
    assert imports(ast.parse(code)) == seen

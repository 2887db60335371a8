"""The module graph of autotune/ is layered and acyclic: every import of an autotune module, at
the top of a file or inside a function, points to a lower layer, or to a module of the same
layer that imports nothing back. The core layer imports no heavy library at import time.

A module that is not in LAYERS fails the test: add it to the layer its imports allow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autotune"

# lowest first; a module may import only from lower layers, and from its own layer without a
# cycle. Within a layer the order is only for reading: the graph decides.
LAYERS: dict[str, tuple[str, ...]] = {
    # no torch, optuna, lightning or mlflow at import: validate and --help stay fast
    "core": (
        "__init__",
        "names",
        "redaction",
        "errors",
        "files",
        "writes",
        "theory",
        "spec_fields",
        "spec_errors",
        "spec_study",
        "spec",
        "space",
        "space_files",
        "user_code",
        "baselines",
        "checks",
        "signals",
        "direction",
    ),
    # the network, its regularisers, the data and the fit (torch; sources is numpy only)
    "nn": (
        "regularizers",
        "surgery",
        "models",
        "shift",
        "feeds",
        "probe",
        "estimates",
        "prediction",
        "sources",
        "data",
        "fitting",
        "weights",
    ),
    # where a study lives and how it is read and logged (optuna, mlflow)
    "search": (
        "optuna_private",
        "pruners",
        "storage",
        "queries",
        "run_fields",
        "tracking",
        "sync",
    ),
    # what a study hands back
    "outputs": ("snippet", "recommendation", "export", "report"),
    # running a study
    "run": (
        "objective",
        "preflight",
        "session",
        "robust",
        "finish",
        "loop",
        "progress",
        "workers",
    ),
    "cli": ("cli",),
}
HEAVY = ("torch", "optuna", "lightning", "mlflow")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module's top-level name or autotune's module, line, at the top level) for every
    import in `tree`, those under `if TYPE_CHECKING:` left out. Autotune's modules are named
    `autotune.<module>`; any other import by its top-level package."""
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
            if node.module == "autotune":  # from autotune import surgery, theory
                found.extend((f"autotune.{a.name}", node.lineno, top) for a in node.names)
            else:
                found.append((_named(node.module), node.lineno, top))
        inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        visit(node, top and not inner)

    visit(tree, True)
    return found


def _named(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "autotune" and len(parts) > 1 else parts[0]


def layer_of() -> dict[str, int]:
    return {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}


def edges(package: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    """module -> [(autotune module it imports, line)], every import counted."""
    graph: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        graph[path.stem] = [
            (name.removeprefix("autotune."), line)
            for name, line, _ in imports(tree)
            if name.startswith("autotune.")
        ]
    return graph


def problems(package: Path = PACKAGE) -> list[str]:
    """Every breach of the layering, each naming the edge `a -> b (line N)`."""
    graph = edges(package)
    layers = layer_of()
    names = list(LAYERS)
    found = []
    listed = [m for modules in LAYERS.values() for m in modules]
    for module in sorted({m for m in listed if listed.count(m) > 1}):
        found.append(f"{module} is in more than one layer of LAYERS")
    for module in sorted(set(graph) - set(layers)):
        found.append(
            f"autotune/{module}.py is in no layer: add it to LAYERS in tests/test_layers.py, "
            "in the lowest layer its imports allow"
        )
    for module in sorted(set(layers) - set(graph)):
        found.append(f"{module} is in LAYERS but there is no autotune/{module}.py")
    for module, targets in graph.items():
        for target, line in targets:
            if target not in graph:
                found.append(f"{module} -> {target} (line {line}): no autotune/{target}.py")
            elif module in layers and target in layers and layers[target] > layers[module]:
                found.append(
                    f"{module} -> {target} (line {line}): {module} is in layer "
                    f"{names[layers[module]]!r}, {target} in the higher {names[layers[target]]!r}"
                )
    for first, cycle in cycles(graph, layers):
        found.append(f"cycle in layer {names[layers[first]]!r}: {cycle}")
    return found


def cycles(
    graph: dict[str, list[tuple[str, int]]], layers: dict[str, int]
) -> list[tuple[str, str]]:
    """Each cycle among modules of one layer: its first module, and the cycle as
    `a -> b (line N) -> ... -> a (line M)`, each line that of the import in the module before
    its arrow."""
    found: list[tuple[str, str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[tuple[str, int]] = []  # (module, line of its import of the next one)

    def visit(module: str) -> None:
        state[module] = "open"
        for target, line in graph.get(module, []):
            if target not in layers or layers.get(target) != layers.get(module):
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


def test_the_core_layer_imports_no_heavy_library_at_import_time() -> None:
    found = []
    for module in LAYERS["core"]:
        path = PACKAGE / f"{module}.py"
        for name, line, top in imports(ast.parse(path.read_text(), str(path))):
            if top and name in HEAVY:
                found.append(f"{module} -> {name} (line {line}) at import time")
    assert not found, "core must import none of " + ", ".join(HEAVY) + ":\n" + "\n".join(found)


def test_an_upward_import_or_a_cycle_is_caught(tmp_path: Path) -> None:
    # the real package, and one edge up and one cycle in core added to a copy of it
    for path in PACKAGE.glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    spaces = tmp_path / "space.py"
    spaces.write_text(
        spaces.read_text() + "\n\ndef _up():\n    from autotune.loop import run_study\n"
    )
    names = tmp_path / "names.py"
    names.write_text(names.read_text() + "\nimport autotune.redaction\n")
    redaction = tmp_path / "redaction.py"
    redaction.write_text(redaction.read_text() + "\nfrom autotune import names\n")
    (tmp_path / "stray.py").write_text("")
    found = problems(tmp_path)
    line = len(spaces.read_text().splitlines())
    assert (
        f"space -> loop (line {line}): space is in layer 'core', loop in the higher 'run'"
    ) in found
    names_line = len(names.read_text().splitlines())
    redaction_line = len(redaction.read_text().splitlines())
    assert (
        f"cycle in layer 'core': redaction -> names (line {redaction_line}) "
        f"-> redaction (line {names_line})"
    ) in found
    assert any(f.startswith("autotune/stray.py is in no layer: add it to LAYERS") for f in found)
    assert len(set(found) - set(problems())) == 3, found


@pytest.mark.parametrize(
    ("code", "seen"),
    [
        ("import torch\n", [("torch", 1, True)]),
        ("def f():\n    import torch\n", [("torch", 2, False)]),
        ("from autotune.study import x\n", [("autotune.study", 1, True)]),
        ("import autotune.loop as loop\n", [("autotune.loop", 1, True)]),
        (
            "from autotune import names, theory\n",
            [("autotune.names", 1, True), ("autotune.theory", 1, True)],
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
            [("typing", 1, True)],
        ),
        ("if TYPE_CHECKING:\n    import torch\nelse:\n    import numpy\n", [("numpy", 4, True)]),
        ("try:\n    import torch\nexcept ImportError:\n    pass\n", [("torch", 2, True)]),
        (
            "class A:\n    def f(self):\n        from autotune import x\n",
            [("autotune.x", 3, False)],
        ),
    ],
)
def test_imports_are_found_wherever_they_are(code: str, seen: list) -> None:
    assert imports(ast.parse(code)) == seen

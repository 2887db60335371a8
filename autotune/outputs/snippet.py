"""best_model.py: the snippet rendered from the network autotune builds for the best
configuration, module by module, and its verification.

The snippet imports torch only: the code of any module torch does not have (Uout, DropBlock2d,
ResidualBlock, ...) is copied into it. For an imported model (`model.import`) the snippet imports
torch and the user's own module, and carries `apply_recommendation()`: the surgery that sets each
BN layer's momentum and regulariser on the user's model, keys unchanged. Either also says how
autotune trained the network (TRAINING, RECALIBRATE_BN) and carries what that training needs
besides: `recalibrate_bn()` where the trial recalibrated BN, `standardise()` where autotune
standardised the inputs (autotune.outputs.snippet_parts).

What the snippet holds of the Optuna storage and the tracking server is data, never code: values
are rendered with repr, the header's text goes through `docstring` (nothing in it can end the
string). The verification runs the code autotune rendered, not the file as it is found, and only
once `check_rendered` has found nothing at the top level but what a snippet has: its docstring,
imports, literal constants, functions and classes, and the `__main__` guard.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.core.space import TrialConfig
from autotune.core.spec import ModelSpec
from autotune.nn import surgery
from autotune.nn.models import ResidualBlock
from autotune.nn.regularizers import CUSTOM_MODULES, make_regularizer
from autotune.nn.weights import CheckFailed, verify_network
from autotune.outputs.snippet_parts import training_parts

_LEAVES: dict[type, tuple[str, ...]] = {
    nn.Flatten: (),
    nn.ReLU: (),
    nn.GELU: (),
    nn.SiLU: (),
    nn.Tanh: (),
    nn.Identity: (),
}


def render_module(module: nn.Module, indent: int = 1) -> str:
    """Python source that constructs `module` (nested Sequentials keep their child names)."""
    pad = "    " * indent
    if isinstance(module, nn.Sequential):
        items = [
            f'{pad}    ("{name}", {render_module(child, indent + 1)}),'
            for name, child in module.named_children()
        ]
        return "nn.Sequential(OrderedDict([\n" + "\n".join(items) + f"\n{pad}]))"
    if type(module) in _LEAVES:
        return f"nn.{type(module).__name__}()"
    if isinstance(module, nn.Linear):
        bias = module.bias is not None
        return f"nn.Linear({module.in_features}, {module.out_features}, bias={bias})"
    if isinstance(module, nn.Conv2d):
        return (
            f"nn.Conv2d({module.in_channels}, {module.out_channels}, "
            f"kernel_size={module.kernel_size}, stride={module.stride}, "
            f"padding={module.padding}, bias={module.bias is not None})"
        )
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return (
            f"nn.{type(module).__name__}({module.num_features}, eps={module.eps!r}, "
            f"momentum={module.momentum!r})"
        )
    if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)):
        return f"nn.{type(module).__name__}(p={module.p!r})"
    if type(module) in CUSTOM_MODULES:
        # each keeps its constructor's arguments as attributes of the same names
        names = list(inspect.signature(type(module)).parameters)
        args = ", ".join(f"{name}={getattr(module, name)!r}" for name in names)
        return f"{type(module).__name__}({args})"
    if isinstance(module, ResidualBlock):
        parts = ",".join(
            f"\n{pad}    {name}={render_module(child, indent + 1)}"
            for name, child in module.named_children()
        )
        return f"ResidualBlock({parts},\n{pad})"
    if isinstance(module, nn.MaxPool2d):
        return f"nn.MaxPool2d({module.kernel_size!r})"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return f"nn.AdaptiveAvgPool2d({module.output_size!r})"
    raise ValueError(f"cannot render {type(module).__name__} as standalone PyTorch code")


def render_imported_snippet(
    spec: ModelSpec,
    model: nn.Module,
    blocks: tuple[surgery.FoundBlock, ...],
    config: TrialConfig,
    header: str,
    input_shape: tuple[int, ...],
    kwargs: dict[str, Any],
    train: dict[str, Any] | None = None,
    *,
    standardised: bool = False,
    weights: str | None = None,
) -> str:
    """A module whose build_model() calls the user's factory and applies `config` to what it
    returns (with `kwargs`), by the same surgery autotune did (copied in), so the state_dict keys
    stay the user's own. With what the training needs besides: see `training_parts`."""
    module_name, _, factory = (spec.import_ or "").partition(":")
    classes = custom_classes(model)
    carried = "".join(f"\n\n\n{inspect.getsource(cls).rstrip()}" for cls in classes)
    surgery_code = "\n\n\n".join(
        inspect.getsource(f).rstrip()
        for f in (surgery.add_regularizer, surgery.drop_input, surgery.drop_output)
    )
    functional = "import torch.nn.functional as F\n" if "F." in carried else ""
    body = _recommendation_body(blocks, config)
    more, imports, constants, functions = training_parts(
        train, config.recalibrate_bn, standardised, weights
    )
    stdlib = f"{imports}\n" if imports else ""
    doc = f"""{header}

Your own model ({spec.import_}) with the recommended BN momenta and regularisers: imports torch
and your model's module. apply_recommendation() changes a model in place and adds no parameter or
buffer, so its state_dict keys stay your model's own: the trained weights, when autotune saved
them, load with model.load_state_dict(torch.load(path)), and so do your own checkpoints. Run it
where `{module_name}` imports.
{more}"""
    return f'''{docstring(doc)}

{stdlib}import torch
{functional}from torch import nn

from {module_name} import {factory} as build_original

INPUT_SHAPE = {tuple(input_shape)!r}  # one example, without the batch dimension
KWARGS = {kwargs!r}  # what autotune built your model with
{constants}{carried}


{surgery_code}


def apply_recommendation(model: nn.Module) -> nn.Module:
    """Each BN layer's momentum and regulariser as autotune recommends, in place."""
{body}
    return model


def build_model() -> nn.Module:
    return apply_recommendation(build_original(**KWARGS)){functions}


if __name__ == "__main__":
    model = build_model().eval()
    print(model)
    print(sum(p.numel() for p in model.parameters()), "parameters")
    print("output of a batch of 2:", tuple(model(torch.zeros(2, *INPUT_SHAPE)).shape))
'''


def _recommendation_body(blocks: tuple[surgery.FoundBlock, ...], config: TrialConfig) -> str:
    """apply_recommendation()'s statements: each block's BN momentum, then its regulariser."""
    lines = []
    for found, block in zip(blocks, config.blocks, strict=True):
        bn = f"model.get_submodule({found.bn!r})"
        lines.append(f"    {bn}.momentum = {block.bn_momentum!r}")
        if not block.active:
            continue
        host, where = {
            "before_bn": (found.bn, "input"),
            "after_bn": (found.bn, "output"),
            "after_act": (found.act, "output"),
        }[block.placement]
        drop = render_module(make_regularizer(block.regularizer, block.rate))
        lines.append(f"    add_regularizer(model.get_submodule({host!r}), {drop}, {where!r})")
    return "\n".join(lines)


def custom_classes(model: nn.Module) -> list[type]:
    """autotune's own module classes in `model`, in a fixed order: what the snippet must carry."""
    used = {type(m) for m in model.modules()}
    return [cls for cls in (*CUSTOM_MODULES, ResidualBlock) if cls in used]


def render_snippet(
    model: nn.Module,
    header: str,
    input_shape: tuple[int, ...],
    train: dict[str, Any] | None = None,
    *,
    recalibrate: bool = False,
    standardised: bool = False,
    weights: str | None = None,
) -> str:
    """A standalone module whose build_model() returns a fresh copy of `model`'s architecture,
    with what the training needs besides: see `training_parts`."""
    classes = custom_classes(model)
    carried = "".join(f"\n\n\n{inspect.getsource(cls).rstrip()}" for cls in classes)
    functional = "import torch.nn.functional as F\n" if "F." in carried else ""
    more, imports, constants, functions = training_parts(train, recalibrate, standardised, weights)
    doc = f"""{header}

Standalone: imports torch and the standard library only. Copy build_model() into your code base;
the trained weights, when autotune saved them, load with model.load_state_dict(torch.load(path)).
{more}"""
    return f"""{docstring(doc)}

from collections import OrderedDict
{imports}
import torch
{functional}from torch import nn

INPUT_SHAPE = {tuple(input_shape)!r}  # one example, without the batch dimension
{constants}{carried}


def build_model() -> nn.Module:
    return {render_module(model)}{functions}


if __name__ == "__main__":
    model = build_model().eval()
    print(model)
    print(sum(p.numel() for p in model.parameters()), "parameters")
    print("output of a batch of 2:", tuple(model(torch.zeros(2, *INPUT_SHAPE)).shape))
"""


def docstring(text: str) -> str:
    """`text` as a triple-quoted string literal that reads back as exactly `text`: each backslash,
    quote and unprintable character escaped, so that nothing in it can end the string."""
    return '"""' + "".join(_escaped(ch) for ch in text) + '"""'


def _escaped(ch: str) -> str:
    if ch in '\\"':
        return "\\" + ch
    if ch == "\n" or ch.isprintable():
        return ch
    return ch.encode("unicode_escape").decode("ascii")


class NotRendered(CheckFailed):
    """Code that is not what autotune renders as a snippet: it is not run."""


def check_rendered(code: str, source: Path, header: str | None = None) -> None:
    """Raise NotRendered unless every top-level statement of `code` is one a snippet has, so
    that executing it runs nothing but imports until build_model() is called: the docstring first
    (beginning with `header`, whole, where given), imports (no `*`), constants whose values are
    literals, functions and classes that call nothing where they are defined (no decorators;
    defaults, annotations, bases and class-level values without a call), and the
    `if __name__ == "__main__":` block (which does not run on verification). No statement binds
    a dunder name (`__builtins__`, `__getattr__`)."""
    try:
        tree = ast.parse(code, str(source))
    except SyntaxError as exc:
        raise NotRendered(f"{source}: not valid Python (line {exc.lineno}); not run") from None
    for i, node in enumerate(tree.body):
        if not _snippet_statement(node, first=i == 0):
            raise NotRendered(
                f"{source}: line {node.lineno} is not what autotune renders "
                f"({type(node).__name__}); not run"
            )
    doc = ast.get_docstring(tree, clean=False) or ""
    if header is not None and not doc.startswith(f"{header}\n"):
        raise NotRendered(f"{source}: its docstring is not the header autotune wrote; not run")


def _snippet_statement(node: ast.stmt, *, first: bool) -> bool:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return all(
            alias.name != "*" and not _dunder(alias.asname or alias.name) for alias in node.names
        )
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return not _dunder(node.name) and _plain_definition(node)
    if isinstance(node, ast.Expr):  # the docstring
        return first and _is_docstring(node)
    if isinstance(node, ast.Assign):
        return _literal_assignment(node)
    if isinstance(node, ast.If):
        return ast.unparse(node.test) == "__name__ == '__main__'"
    return False


def _plain_definition(node: ast.FunctionDef | ast.ClassDef) -> bool:
    """Whether a def or class statement runs nothing when it is executed: no decorator, and its
    defaults, annotations, bases and class-level statements call nothing. Function bodies run
    only when called."""
    if node.decorator_list:
        return False
    if isinstance(node, ast.FunctionDef):
        args = node.args
        evaluated = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        evaluated += [a.annotation for a in every if a is not None and a.annotation is not None]
        evaluated += [node.returns] if node.returns is not None else []
        return not any(_calls(part) for part in evaluated)
    if any(_calls(part) for part in (*node.bases, *node.keywords)):
        return False
    for i, statement in enumerate(node.body):
        if isinstance(statement, ast.FunctionDef):
            if not _plain_definition(statement):
                return False
        elif not (
            (i == 0 and isinstance(statement, ast.Expr) and _is_docstring(statement))
            or (isinstance(statement, ast.Assign) and _literal_assignment(statement))
            or isinstance(statement, ast.Pass)
        ):
            return False
    return True


def _literal_assignment(node: ast.Assign) -> bool:
    try:
        ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return all(isinstance(t, ast.Name) and not _dunder(t.id) for t in node.targets)


def _is_docstring(node: ast.Expr) -> bool:
    return isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _calls(node: ast.AST) -> bool:
    """Whether evaluating the expression `node` may call something or bind a name."""
    unsafe = (ast.Call, ast.NamedExpr, ast.Lambda, ast.Await, ast.Yield, ast.YieldFrom)
    return any(isinstance(part, unsafe) for part in ast.walk(node))


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def snippet_namespace(code: str, source: Path, header: str | None = None) -> dict[str, Any]:
    """Run snippet code in a fresh namespace, once check_rendered passes, as if it were the file
    `source` (its load() finds its files beside it); return the namespace."""
    check_rendered(code, source, header)
    namespace: dict[str, Any] = {"__name__": "autotune_snippet", "__file__": str(source)}
    exec(compile(code, str(source), "exec"), namespace)
    return namespace


def run_snippet(code: str, source: Path, header: str | None = None) -> nn.Module:
    """Run snippet code (snippet_namespace) and return its build_model()."""
    return snippet_namespace(code, source, header)["build_model"]()


def verify_load(
    code: str,
    source: Path,
    reference: nn.Module,
    weights: Path,
    stats: Path | None,
    input_shape: tuple[int, ...],
) -> float:
    """Check the snippet's load(): from the files beside it, fed raw features, it gives the
    outputs of `reference` with the saved weights fed the standardised ones (`stats`: the
    input statistics, None where the inputs were not standardised). Returns the largest
    difference; CheckFailed past the tolerance."""
    loaded = snippet_namespace(code, source)["load"]()
    reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    raw = x
    if stats is not None:
        saved = torch.load(stats, map_location="cpu", weights_only=True)
        raw = x * saved["std"] + saved["mean"]
    with torch.no_grad():
        ours, theirs = reference.eval()(x), loaded(raw)
    diff = float((ours - theirs).abs().max())
    if not torch.allclose(ours, theirs, atol=LOAD_TOLERANCE, rtol=LOAD_TOLERANCE):
        raise CheckFailed(f"{source}: load() gives outputs that differ by up to {diff:.3g}")
    return diff


# raw features are standardised again inside load()'s network: float32 rounding, twice
LOAD_TOLERANCE = 1e-4


def load_snippet(path: Path) -> nn.Module:
    """Run a best_model.py (see run_snippet) and return its build_model()."""
    return run_snippet(path.read_text(), path)


def verify_snippet(path: Path, reference: nn.Module) -> None:
    """Raise if the snippet's network differs from `reference` in layers or parameter count."""
    verify_network(load_snippet(path), reference, path)

"""What a study hands back: the recommendation as recommended.yaml (or .json), and a standalone
best_model.py.

best_model.py is rendered from the network autotune itself builds for the best configuration,
module by module. The snippet imports torch only: the code of any module torch does not have
(Uout, DropBlock2d, ResidualBlock, ...) is copied into it. For an imported model (`model.import`)
the snippet imports torch and the user's own module, and carries `apply_recommendation()`: the
surgery that sets each BN layer's momentum and regulariser on the user's model, keys unchanged.

Every file is verified as it is written: the network rebuilt from it (the snippet run, or the
recommendation's blocks built again) must have the tuned network's layers, names and parameter
count, load the trained best model's saved state_dict, and then give the same outputs. Each file
carries its provenance: study, trial, MLflow run ids, seed and library versions.

What the snippet holds of the Optuna storage and the tracking server is data, never code: values
are rendered with repr, the header's text goes through `docstring` (nothing in it can end the
string), run ids are taken only in MLflow's form (tracking.RUN_ID). The verification runs the code
autotune rendered, not the file as it is found, and only once `check_rendered` has found nothing at
the top level but what a snippet has: its docstring, imports, literal constants, functions and
classes, and the `__main__` guard.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import inspect
import io
import json
import math
import platform
import textwrap
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial
from torch import nn

from autotune import surgery
from autotune.errors import UserCodeError, first_line
from autotune.models import ResidualBlock, build_model
from autotune.names import (
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
    ROBUST_ATTR,
    STANDARDISED_ATTR,
    WEIGHTS_DIGEST,
    trial_weights,
)
from autotune.queries import best_trial, kept_digest, recommended_trial, state_counts, trial_config
from autotune.redaction import redact
from autotune.regularizers import CUSTOM_MODULES, make_regularizer
from autotune.space import TrialConfig, config_from_mapping
from autotune.spec import ModelSpec, Spec
from autotune.tracking import run_id_or_none, trial_run_id
from autotune.user_code import USER_ERRORS, raised_in
from autotune.writes import write_atomic

# what `export --format` writes, and the files' names
FORMATS = {"yaml": RECOMMENDED_YAML, "json": RECOMMENDED_JSON, "py": BEST_MODEL}
DEFAULT_FORMATS = ("yaml", "py")
# how close the rebuilt network's outputs must be to the tuned one's, in float32
OUTPUT_TOLERANCE = 1e-5
# what recommended.yaml keeps of each row of the robust ranking
ROBUST_KEYS = ("name", "trial", "mean", "sd", "bound", "values", "blocks", "batchnorm", "failed")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_tensors(obj: Any, path: Path) -> str:
    """torch.save(obj) to `path`, whole or not at all (writes.write_atomic); returns the sha256
    of what was written, which the export checks a trial's weights against. Raises WriteError
    when the file cannot be written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


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
) -> str:
    """A module whose build_model() calls the user's factory and applies `config` to what it
    returns (with `kwargs`), by the same surgery autotune did (copied in), so the state_dict keys
    stay the user's own."""
    module_name, _, factory = (spec.import_ or "").partition(":")
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
    classes = custom_classes(model)
    carried = "".join(f"\n\n\n{inspect.getsource(cls).rstrip()}" for cls in classes)
    surgery_code = "\n\n\n".join(
        inspect.getsource(f).rstrip()
        for f in (surgery.add_regularizer, surgery.drop_input, surgery.drop_output)
    )
    functional = "import torch.nn.functional as F\n" if classes else ""
    body = "\n".join(lines)
    doc = f"""{header}

Your own model ({spec.import_}) with the recommended BN momenta and regularisers: imports torch
and your model's module. apply_recommendation() changes a model in place and adds no parameter or
buffer, so its state_dict keys stay your model's own: the trained weights, when autotune saved
them, load with model.load_state_dict(torch.load(path)), and so do your own checkpoints. Run it
where `{module_name}` imports. The model expects inputs standardised as recommended.yaml's
`inputs` says.
"""
    return f'''{docstring(doc)}

import torch
{functional}from torch import nn

from {module_name} import {factory} as build_original

INPUT_SHAPE = {tuple(input_shape)!r}  # one example, without the batch dimension
KWARGS = {kwargs!r}  # what autotune built your model with{carried}


{surgery_code}


def apply_recommendation(model: nn.Module) -> nn.Module:
    """Each BN layer's momentum and regulariser as autotune recommends, in place."""
{body}
    return model


def build_model() -> nn.Module:
    return apply_recommendation(build_original(**KWARGS))


if __name__ == "__main__":
    model = build_model().eval()
    print(model)
    print(sum(p.numel() for p in model.parameters()), "parameters")
    print("output of a batch of 2:", tuple(model(torch.zeros(2, *INPUT_SHAPE)).shape))
'''


def custom_classes(model: nn.Module) -> list[type]:
    """autotune's own module classes in `model`, in a fixed order: what the snippet must carry."""
    used = {type(m) for m in model.modules()}
    return [cls for cls in (*CUSTOM_MODULES, ResidualBlock) if cls in used]


def render_snippet(model: nn.Module, header: str, input_shape: tuple[int, ...]) -> str:
    """A standalone module whose build_model() returns a fresh copy of `model`'s architecture."""
    classes = custom_classes(model)
    carried = "".join(f"\n\n\n{inspect.getsource(cls).rstrip()}" for cls in classes)
    functional = "import torch.nn.functional as F\n" if classes else ""
    doc = f"""{header}

Standalone: imports torch only. Copy build_model() into your code base; the trained weights, when
autotune saved them, load with model.load_state_dict(torch.load(path)). The model expects inputs
standardised as recommended.yaml's `inputs` says.
"""
    return f"""{docstring(doc)}

from collections import OrderedDict

import torch
{functional}from torch import nn

INPUT_SHAPE = {tuple(input_shape)!r}  # one example, without the batch dimension{carried}


def build_model() -> nn.Module:
    return {render_module(model)}


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


class NotRendered(RuntimeError):
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


def run_snippet(code: str, source: Path, header: str | None = None) -> nn.Module:
    """Run snippet code in a fresh namespace, once check_rendered passes, and return its
    build_model()."""
    check_rendered(code, source, header)
    namespace: dict[str, Any] = {"__name__": "autotune_snippet"}
    exec(compile(code, str(source), "exec"), namespace)
    return namespace["build_model"]()


def load_snippet(path: Path) -> nn.Module:
    """Run a best_model.py (see run_snippet) and return its build_model()."""
    return run_snippet(path.read_text(), path)


def verify_snippet(path: Path, reference: nn.Module) -> None:
    """Raise if the snippet's network differs from `reference` in layers or parameter count."""
    verify_network(load_snippet(path), reference, path)


class WeightsDoNotLoad(RuntimeError):
    """A weights file that does not fit the network it is checked against."""


def verify_weights(
    rebuilt: nn.Module,
    reference: nn.Module,
    weights: Path,
    input_shape: tuple[int, ...],
    source: Path,
) -> float:
    """Load the saved state_dict into both networks and compare their eval-mode outputs on a
    seeded batch; return the largest difference. Raise when a key does not load or the outputs
    differ: then the file does not describe the trained network."""
    state = torch.load(weights, map_location="cpu", weights_only=True)  # data: no pickled code
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsDoNotLoad(
            f"{source}: the trained weights do not load: {first_line(exc)}"
        ) from None
    reference.load_state_dict(state)
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = reference.eval()(x), rebuilt.eval()(x)
    diff = float((ours - theirs).abs().max())
    if not torch.allclose(ours, theirs, atol=OUTPUT_TOLERANCE, rtol=OUTPUT_TOLERANCE):
        raise RuntimeError(
            f"{source}: with the trained weights its outputs differ from the tuned network's "
            f"by up to {diff:.3g}"
        )
    return diff


def _trial_weights(path: Path, digest: str | None) -> tuple[Path | None, str]:
    """The trial's saved weights, when they are here and are its own (`digest`, where it was
    recorded); else None and why not."""
    if not path.exists():  # trained on another node, or removed
        return None, "no saved weights here to load"
    if digest is not None and file_digest(path) != digest:
        return None, f"{path.name} is not this trial's (another study's?), so it was not used"
    return path, ""


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


def _model_section(
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
    against the tuned network; return the paths. Raises Unverified, after writing what it
    could, when the user's factory fails to build the network."""
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats: expected some of {', '.join(FORMATS)}, got {list(formats)}")
    trial = recommended_trial(study, spec)
    if trial is None:
        raise RuntimeError(f"study {study.study_name!r} has no completed trial to recommend")
    attrs = study.user_attrs
    config = trial_config(trial)
    shape, n_classes = tuple(attrs[INPUT_SHAPE_ATTR]), attrs[N_CLASSES_ATTR]

    def tuned() -> nn.Module:  # a fresh copy each time: verification loads weights into it
        return build_model(spec.model, config, shape, n_classes, base_dir=spec.base_dir)

    model: nn.Module | None = None
    blocks: tuple[surgery.FoundBlock, ...] = ()
    failed: UserCodeError | None = None  # the user's factory, failing now
    try:
        model = tuned()
        if spec.model.imported:  # where each block is: found in the model its factory builds
            plain = surgery.make_user_model(spec.model, shape, n_classes, base_dir=spec.base_dir)
            blocks = surgery.user_blocks(spec.model, plain, shape)
    except UserCodeError as exc:
        failed = exc
    blocks_at = [block.bn for block in blocks] if blocks else attrs.get(BLOCKS_AT)
    out = spec.output_dir
    digest = trial.user_attrs.get(WEIGHTS_DIGEST) or kept_digest(study, trial.number)
    weights, absent = _trial_weights(trial_weights(out, trial.number), digest)
    metric = attrs.get(METRIC_ATTR, spec.study.metric)
    provenance = {
        "study": study.study_name,
        "trial": trial.number,
        "mlflow_run_id": trial_run_id(attrs, trial),
        "seed": spec.train.seed,
        "versions": library_versions(),
    }

    def check(rebuild: Callable[[], nn.Module], source: Path) -> str:
        """What verifying the network `rebuild` builds from `source` against the tuned network
        showed, in words; `not verified: ...` when the user's factory fails."""
        nonlocal failed
        try:
            if failed is None:
                rebuilt = rebuild()
                reference = None if weights is None else tuned()
        except USER_ERRORS as exc:
            if isinstance(exc, UserCodeError):
                failed = exc
            elif spec.model.import_ and raised_in(exc, spec.model.import_):
                failed = surgery.factory_failed(spec.model, exc)  # best_model.py called it
            else:  # a snippet that does not run: the check fails, loudly
                raise
        if failed is not None:
            unverified.append(source)
            return f"not verified: {failed}"
        assert model is not None
        verify_network(rebuilt, model, source)
        if weights is None or reference is None:
            return f"same layers and parameter count; {absent}"
        try:
            diff = verify_weights(rebuilt, reference, weights, shape, source)
        except WeightsDoNotLoad:  # its layers are the tuned network's: the file is not its
            return f"same layers and parameter count; {weights.name} does not fit them, unused"
        return (
            f"same layers and parameter count; loads {weights.name} and then gives the tuned "
            f"network's outputs (largest difference {diff:.2g})"
        )

    written: list[Path] = []
    unverified: list[Path] = []
    verified: dict[str, str] = {}
    if "py" in formats and model is None:  # rendered from the network: there is none
        verified[BEST_MODEL] = f"not written: {failed}"
    elif "py" in formats:
        py_path = out / FORMATS["py"]
        where = [
            f"{k} {v}" for k, v in provenance.items() if k != "versions" and v not in (None, "")
        ]
        made_with = [f"{k} {v}" for k, v in provenance["versions"].items()]
        header = (
            f"The network autotune recommends for study {study.study_name!r}: trial "
            f"{trial.number}, {metric} = {trial.value:.4f}.\n\n"
            + textwrap.fill(f"Provenance: {', '.join(where)}; {', '.join(made_with)}.", 99)
        )
        if spec.model.imported:
            factory = surgery.load_factory(spec.model, base_dir=spec.base_dir)
            kwargs = surgery.factory_kwargs(spec.model, factory, shape, n_classes)
            code = render_imported_snippet(spec.model, model, blocks, config, header, shape, kwargs)
        else:
            code = render_snippet(model, header, shape)
        write_atomic(py_path, code)
        verified[BEST_MODEL] = check(lambda: run_snippet(code, py_path, header), py_path)
        written.append(py_path)

    recommendation = {
        "study": {
            "name": study.study_name,
            "metric": metric,
            "direction": study.direction.name.lower(),
            "storage": redact(spec.storage_url),
            "trials": state_counts(study),
        },
        "best": {
            "trial": trial.number,
            "value": float(trial.value),
            "mlflow_run_id": trial_run_id(attrs, trial),
            "mlflow_parent_run_id": run_id_or_none(attrs.get(PARENT_ATTR)),
            "weights": str(weights) if weights is not None else None,
        },
        "model": _model_section(spec.model, model, shape, n_classes, blocks_at),
        "blocks": config.to_dicts(),
        # true: BN's statistics were re-estimated with dropout off after training; the saved
        # weights hold them, so a production model loads them as they are
        "recalibrate_bn": config.recalibrate_bn,
        "shift": {
            "predicted": trial.user_attrs.get(PREDICTED_SHIFT_ATTR),
            "measured": trial.user_attrs.get(MEASURED_SHIFT_ATTR),
        },
        "train": spec.train.model_dump(mode="json"),
        "inputs": _inputs(out, bool(attrs.get(STANDARDISED_ATTR, False))),
        "robust": _robust_section(study, trial),
        "versions": provenance["versions"],
        "verified": verified,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for kind in ("yaml", "json"):
        if kind not in formats:
            continue
        path = out / FORMATS[kind]
        if failed is not None:  # known before it is written: it says so itself
            verified[FORMATS[kind]] = f"not verified: {failed}"
        if kind == "yaml":
            text = (
                "# autotune's recommendation: the best trial's per-block configuration.\n"
                "# rate is the drop probability; bn_momentum follows PyTorch's convention.\n"
                + yaml.safe_dump(recommendation, sort_keys=False)
            )
            document = yaml.safe_load(text)
        else:  # strict JSON: a number that is not finite is written as null
            text = json.dumps(_finite(recommendation), indent=2, allow_nan=False) + "\n"
            document = json.loads(text)
        write_atomic(path, text)
        # rebuilt from the text written, not the file as found: it names the module to import
        check(partial(rebuild_recommendation, document, str(path), spec.base_dir), path)
        written.insert(0, path)
    if failed is not None:
        said = [
            f"{path.name} {'written unverified' if path in written else 'not written'}"
            for path in (out / FORMATS[f] for f in formats)
            if path in unverified or path not in written
        ]
        raise Unverified(f"{failed}; {', '.join(said)}", written)
    return written


def verify_network(rebuilt: nn.Module, reference: nn.Module, source: Path) -> None:
    """Raise if `rebuilt` differs from `reference` in layers, names or parameter count."""
    if repr(rebuilt) != repr(reference):
        raise RuntimeError(f"{source}: the rendered network differs from the tuned one")
    count = sum(p.numel() for p in rebuilt.parameters())
    expected = sum(p.numel() for p in reference.parameters())
    if count != expected:
        raise RuntimeError(f"{source}: {count} parameters, the tuned model has {expected}")
    if set(rebuilt.state_dict()) != set(reference.state_dict()):
        raise RuntimeError(f"{source}: state_dict keys differ from the tuned model's")


def _robust_section(study: optuna.Study, chosen: FrozenTrial) -> dict[str, Any] | None:
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
    }


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _inputs(out: Path, standardised: bool) -> dict[str, Any]:
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

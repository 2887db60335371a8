"""What a study hands back: recommended.yaml and a standalone best_model.py.

best_model.py is rendered from the network autotune itself builds for the best configuration,
module by module, so the snippet and the tuned model have the same layers, the same names and
the same parameter count; `write_outputs` checks that before it returns. The snippet imports
torch only: the code of any module torch does not have (Uout, DropBlock2d, ResidualBlock, ...)
is copied into it.
"""

from __future__ import annotations

import datetime as dt
import inspect
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import yaml
from torch import nn

from autotune.models import ResidualBlock, build_model
from autotune.regularizers import CUSTOM_MODULES
from autotune.space import TrialConfig
from autotune.spec import Spec
from autotune.study import best_trial, redact, state_counts

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


def custom_classes(model: nn.Module) -> list[type]:
    """autotune's own module classes in `model`, in a fixed order: what the snippet must carry."""
    used = {type(m) for m in model.modules()}
    return [cls for cls in (*CUSTOM_MODULES, ResidualBlock) if cls in used]


def render_snippet(model: nn.Module, header: str, input_shape: tuple[int, ...]) -> str:
    """A standalone module whose build_model() returns a fresh copy of `model`'s architecture."""
    classes = custom_classes(model)
    carried = "".join(f"\n\n\n{inspect.getsource(cls).rstrip()}" for cls in classes)
    functional = "import torch.nn.functional as F\n" if classes else ""
    return f'''"""{header}

Standalone: imports torch only. Copy build_model() into your code base; the trained weights, when
autotune saved them, load with model.load_state_dict(torch.load(path)). The model expects inputs
standardised as recommended.yaml's `inputs` says.
"""

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
'''


def load_snippet(path: Path) -> nn.Module:
    """Run a best_model.py in a fresh namespace and return its build_model()."""
    namespace: dict[str, Any] = {"__name__": "autotune_snippet"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["build_model"]()


def verify_snippet(path: Path, reference: nn.Module) -> None:
    """Raise if the snippet's network differs from `reference` in layers or parameter count."""
    rebuilt = load_snippet(path)
    if repr(rebuilt) != repr(reference):
        raise RuntimeError(f"{path}: the rendered network differs from the tuned one")
    count = sum(p.numel() for p in rebuilt.parameters())
    expected = sum(p.numel() for p in reference.parameters())
    if count != expected:
        raise RuntimeError(f"{path}: {count} parameters, the tuned model has {expected}")
    if set(rebuilt.state_dict()) != set(reference.state_dict()):
        raise RuntimeError(f"{path}: state_dict keys differ from the tuned model's")


def write_outputs(study: optuna.Study, spec: Spec) -> tuple[Path, Path]:
    """Write recommended.yaml and best_model.py for the study's best trial; return their paths."""
    trial = best_trial(study)
    if trial is None:
        raise RuntimeError(f"study {study.study_name!r} has no completed trial to recommend")
    attrs = study.user_attrs
    config = TrialConfig.from_dicts(
        trial.user_attrs["config"], recalibrate_bn=trial.user_attrs.get("recalibrate_bn", False)
    )
    model = build_model(spec.model, config, attrs["input_shape"], attrs["n_classes"])
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)

    weights = out / "weights" / f"trial_{trial.number}.pt"
    metric = attrs.get("metric", spec.study.metric)
    header = (
        f"The network autotune recommends for study {study.study_name!r}: trial "
        f"{trial.number}, {metric} = {trial.value:.4f}."
    )
    py_path = out / "best_model.py"
    py_path.write_text(render_snippet(model, header, tuple(attrs["input_shape"])))
    verify_snippet(py_path, model)

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
            "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
            "mlflow_parent_run_id": attrs.get("mlflow_parent_run_id"),
            "weights": str(weights) if weights.exists() else None,
        },
        "model": {
            **spec.model.model_dump(mode="json"),
            "widths": spec.model.resolved_widths,
            "input_shape": list(attrs["input_shape"]),
            "n_classes": attrs["n_classes"],
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "blocks": config.to_dicts(),
        # true: BN's statistics were re-estimated with dropout off after training; the saved
        # weights hold them, so a production model loads them as they are
        "recalibrate_bn": config.recalibrate_bn,
        "shift": {
            "predicted": trial.user_attrs.get("predicted_shift"),
            "measured": trial.user_attrs.get("measured_shift"),
        },
        "train": spec.train.model_dump(mode="json"),
        "inputs": _inputs(out, bool(attrs.get("standardised", False))),
        "versions": library_versions(),
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    yaml_path = out / "recommended.yaml"
    yaml_path.write_text(
        "# autotune's recommendation: the best trial's per-block configuration.\n"
        "# rate is the drop probability; bn_momentum follows PyTorch's convention.\n"
        + yaml.safe_dump(recommendation, sort_keys=False)
    )
    return yaml_path, py_path


def _inputs(out: Path, standardised: bool) -> dict[str, Any]:
    """Where the input standardisation lives, when autotune standardised the data itself."""
    if not standardised:
        return {"standardised": False}
    stats = out / "input_stats.pt"
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

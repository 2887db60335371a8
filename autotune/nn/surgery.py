"""Your own model: find its blocks, then apply a configuration to it by module surgery.

`model: {import: "package.module:build"}` names a factory that returns any nn.Module. One forward
pass of an example batch (eval mode, no gradients) shows how it is wired:

- every BatchNorm layer the pass uses is a block, in the order the pass reaches them;
- the weight layer feeding it is the Linear or Conv whose output BN normalises (none where BN
  follows a function rather than a module);
- its activation is the activation module that takes BN's output, where that module is used
  once per pass (a ReLU shared by several layers, as in torchvision's ResNet, gets no slot: a
  regulariser after it would act at every place it is used).

Tensors are matched by identity, so functional code in forward() is followed as far as it hands
one module's output straight to the next; nothing is traced symbolically and any Python forward()
works.

A block's slot holds `before_bn` (noise on BN's input), `after_bn` (on its output) or
`after_act` (on the activation's output, where the block has one). The regulariser is added as a
child of the module it acts on, `drop_input` or `drop_output`, applied by a forward hook. Its
parameters and buffers are none, so the state_dict keys stay the model's own: weights trained
here load into the user's unmodified model, and the user's checkpoints load into the tuned one.
`print(model)` shows every regulariser under the layer it belongs to.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.core.errors import SpecError, UserCodeError
from autotune.core.space import Slot, TrialConfig
from autotune.core.spec import ModelSpec
from autotune.core.user_code import USER_ERRORS, import_object, raised_line
from autotune.nn.regularizers import make_regularizer

_BN = nn.modules.batchnorm._BatchNorm
_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)
# an imported block's placements; in_branch and residual need autotune's own residual blocks
PLACEMENTS = ("none", "before_bn", "after_bn")
# the children add_regularizer gives the module a regulariser acts on
SLOTS = frozenset({"drop_input", "drop_output"})
# rows of the example batch that shows the wiring: BN in eval mode needs no more than one, two
# keep a model that squeezes its batch dimension honest
EXAMPLE_ROWS = 2


@dataclass(frozen=True)
class FoundBlock:
    """One BatchNorm layer of an imported model and what surrounds it (module names)."""

    bn: str
    kind: str  # spatial: BN normalises (N, C, H, W) maps; dense: anything else
    weight: str | None  # the Linear/Conv whose output BN normalises
    act: str | None  # the activation that takes BN's output, used once per pass

    def slot(self) -> Slot:
        placements = PLACEMENTS + (("after_act",) if self.act is not None else ())
        return Slot(self.bn, self.kind, placements)


def build_imported(
    spec: ModelSpec,
    config: TrialConfig | None,
    input_shape: Sequence[int],
    n_classes: int,
    *,
    base_dir: Path = Path("."),
) -> nn.Module:
    """The user's model with `config` applied (None: as the factory built it). UserCodeError,
    naming `model.import`, when the user's code fails."""
    model = make_user_model(spec, input_shape, n_classes, base_dir=base_dir)
    if config is not None:
        apply_config(model, user_blocks(spec, model, input_shape), config)
    return model


def make_user_model(
    spec: ModelSpec, input_shape: Sequence[int], n_classes: int, *, base_dir: Path = Path(".")
) -> nn.Module:
    """Call the factory `model.import` names; UserCodeError naming the field when it raises
    (SystemExit too) or returns what is not a module."""
    factory = load_factory(spec, base_dir=base_dir)
    kwargs = factory_kwargs(spec, factory, input_shape, n_classes)  # a SpecError of its own
    try:
        model = factory(**kwargs)
    except USER_ERRORS as exc:
        raise factory_failed(spec, exc) from exc
    if not isinstance(model, nn.Module):
        raise UserCodeError(
            f"model.import: {spec.import_!r} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def factory_failed(spec: ModelSpec, exc: BaseException) -> UserCodeError:
    """What the factory `model.import` names raised, said in one line, wherever it was called."""
    return UserCodeError(f"model.import: {spec.import_!r} failed to build: {raised_line(exc)}")


def user_blocks(
    spec: ModelSpec, model: nn.Module, input_shape: Sequence[int]
) -> tuple[FoundBlock, ...]:
    """find_blocks on the model `model.import` built; UserCodeError naming the field when its
    forward() fails on an example of the data's shape."""
    try:
        return find_blocks(model, input_shape)
    except USER_ERRORS as exc:  # a shape that does not fit, ...
        raise UserCodeError(
            f"model.import: {spec.import_!r} fails on an example of the data's shape "
            f"{tuple(input_shape)}: {raised_line(exc)}"
        ) from exc


def load_factory(spec: ModelSpec, *, base_dir: Path = Path(".")) -> Any:
    """The callable `model.import` names."""
    target = spec.import_
    if target is None:
        raise ValueError("the model spec imports no model")
    factory = import_object(target, field="model.import", base_dir=base_dir)
    if not callable(factory):
        raise SpecError(f"model.import: {target!r} is not callable (got {type(factory).__name__})")
    return factory


def data_arguments(input_shape: Sequence[int], n_classes: int) -> dict[str, Any]:
    """What autotune can tell a factory of the data, under the names common models give it:
    the shape, the class count, the flat feature count, and an image's channels and size."""
    shape = tuple(input_shape)
    known: dict[str, Any] = {"input_shape": shape}
    known.update(dict.fromkeys(CLASS_NAMES, n_classes))
    known.update(dict.fromkeys(FEATURE_NAMES, math.prod(shape)))
    if len(shape) >= 2:  # channels first: (C, L) or (C, H, W)
        known.update(dict.fromkeys(CHANNEL_NAMES, shape[0]))
    if len(shape) == 3 and shape[1] == shape[2]:  # a square image
        known.update(dict.fromkeys(SIZE_NAMES, shape[1]))
    return known


CLASS_NAMES = ("n_classes", "num_classes", "n_outputs", "num_outputs", "out_dim")
FEATURE_NAMES = ("in_features", "n_features", "num_features", "input_dim", "input_size", "in_dim")
CHANNEL_NAMES = ("in_channels", "in_chans", "input_channels", "n_channels", "num_channels")
SIZE_NAMES = ("image_size", "img_size")
ALWAYS_FILLED = ("input_shape", "n_classes")  # filled over a default, as autotune always did


def factory_kwargs(
    spec: ModelSpec, factory: Any, input_shape: Sequence[int], n_classes: int
) -> dict[str, Any]:
    """`model.kwargs`, with what the data tells (data_arguments) under the names the factory
    takes by keyword that the spec does not set: `input_shape` and `n_classes` wherever it takes
    them, the other names only where they have no default (a default the factory chose stays).
    A required argument left without a value is a SpecError naming it and `model.kwargs`."""
    kwargs = dict(spec.kwargs)
    parameters = _parameters(factory)
    if parameters is None:  # a builtin without a signature: what the spec gives
        return kwargs
    known = data_arguments(input_shape, n_classes)
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name, parameter in parameters.items():
        wanted = parameter.default is inspect.Parameter.empty or name in ALWAYS_FILLED
        if wanted and name not in kwargs and name in known and parameter.kind in by_keyword:
            kwargs[name] = known[name]
    missing = [
        name
        for name, parameter in parameters.items()
        if name not in kwargs
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise SpecError(
            f"model.kwargs: {spec.import_!r} needs {names}, which the data does not tell: set "
            f"{'it' if len(missing) == 1 else 'them'} in model.kwargs (autotune fills in "
            "input_shape, n_classes, num_classes, in_features, in_channels and their like)"
        )
    return kwargs


def _parameters(factory: Any) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None


def find_blocks(model: nn.Module, input_shape: Sequence[int]) -> tuple[FoundBlock, ...]:
    """The model's BatchNorm layers in the order its forward pass reaches them, each with the
    weight layer that feeds it and the activation that follows it (see the module docstring)."""
    x = torch.randn(EXAMPLE_ROWS, *input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:
        with torch.no_grad():
            return _blocks(trace(model.eval(), x.to(device_of(model))))
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Call:
    """One module call of a traced pass: its tensors by identity, the first input's rank."""

    name: str
    module: nn.Module
    inputs: list[int]
    output: int | None
    dims: int


def trace(model: nn.Module, x: torch.Tensor) -> list[Call]:
    """The calls of every leaf module (and every BN) in one forward pass of `x`, in the order
    they returned. A module's output is what its forward hooks made of it."""
    calls: list[Call] = []
    alive: list[torch.Tensor] = []  # keeps every tensor seen, so no id is reused in the pass

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            out = output if isinstance(output, torch.Tensor) else None
            alive.extend(inputs + ([out] if out is not None else []))
            dims = inputs[0].dim() if inputs else 0
            calls.append(Call(name, module, [id(a) for a in inputs], _id(out), dims))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if set(module._modules) <= SLOTS  # a leaf, or a leaf that hosts a regulariser
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _id(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else id(tensor)


def _blocks(calls: list[Call]) -> tuple[FoundBlock, ...]:
    """The BN calls, each with the module whose output it takes and the one that takes its own."""
    uses: dict[str, int] = {}
    for call in calls:
        uses[call.name] = uses.get(call.name, 0) + 1
    blocks: dict[str, FoundBlock] = {}
    for at, call in enumerate(calls):
        if not isinstance(call.module, _BN) or call.name in blocks:
            continue
        source = call.inputs[0] if call.inputs else None
        feeder = next((c for c in reversed(calls[:at]) if c.output == source), None)
        taker = next((c for c in calls[at + 1 :] if call.output in c.inputs), None)
        weight = feeder.name if feeder and isinstance(feeder.module, _WEIGHTS) else None
        once = uses[call.name] == 1 and taker is not None and uses[taker.name] == 1
        act = taker.name if once and isinstance(taker.module, ACTIVATIONS) else None  # type: ignore[union-attr]
        kind = "spatial" if call.dims == 4 else "dense"
        blocks[call.name] = FoundBlock(call.name, kind, weight, act)
    return tuple(blocks.values())


def device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def apply_config(model: nn.Module, blocks: Sequence[FoundBlock], config: TrialConfig) -> nn.Module:
    """Each block's BN momentum and regulariser, set in place; returns `model`."""
    if len(blocks) != len(config.blocks):
        raise ValueError(f"config has {len(config.blocks)} blocks, the model {len(blocks)}")
    for found, block in zip(blocks, config.blocks, strict=True):
        bn = model.get_submodule(found.bn)
        bn.momentum = block.bn_momentum
        if not block.active:
            continue
        drop = make_regularizer(block.regularizer, block.rate)
        if block.placement == "before_bn":
            add_regularizer(bn, drop, "input")
        elif block.placement == "after_bn":
            add_regularizer(bn, drop, "output")
        elif block.placement == "after_act" and found.act is not None:
            add_regularizer(model.get_submodule(found.act), drop, "output")
        else:
            raise ValueError(f"{found.bn}: no room for placement {block.placement!r}")
    return model


def add_regularizer(host: nn.Module, drop: nn.Module, where: str) -> None:
    """`drop` on the input or the output of `host`: a child named drop_<where>, and a hook."""
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', but got {where=}.")
    name = f"drop_{where}"  # one of SLOTS
    if name in host._modules:
        raise ValueError(f"{type(host).__name__} has a regulariser on its {where} already")
    host.add_module(name, drop)
    if where == "input":
        host.register_forward_pre_hook(drop_input)
    else:
        host.register_forward_hook(drop_output)


def drop_input(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """Forward pre-hook: the module's regulariser on its input, the one tensor a BN layer or an
    activation takes. Typed as TorchScript wants a hook: torch.jit.script compiles it too."""
    return (module.drop_input(args[0]),)


def drop_output(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's regulariser on its output (typed for TorchScript)."""
    return module.drop_output(output)


def without_batchnorm(model: nn.Module, blocks: Sequence[FoundBlock]) -> nn.Module:
    """Every block's BN replaced by the identity, in place, and the weight layer that fed it given
    a bias (BN's shift did that job): the network as it would be without BatchNorm."""
    for found in blocks:
        if found.weight is not None:
            weight = model.get_submodule(found.weight)
            if weight.bias is None:
                weight.bias = nn.Parameter(weight.weight.new_zeros(weight.weight.shape[0]))
        parent, _, child = found.bn.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return model

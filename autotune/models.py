"""Network templates built from a TrialConfig: mlp and cnn.

A block is weight -> BatchNorm -> activation, with one regulariser slot whose placement is
`before_bn` (weight -> drop -> bn), `after_bn` (bn -> drop -> act) or `after_act` (act -> drop).
Blocks are nn.Sequential with named children (`linear`/`conv`, `drop`, `bn`, `act`, `pool`), so
parameter names are the same in every trial and in the exported snippet. A block without a
regulariser has no `drop` child at all.

    mlp:  flatten -> block0 ... blockN -> head (Linear)
    cnn:  block0 ... blockN (each ending in 2x2 max pooling) -> pool (global average) -> flatten
          -> head (Linear)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from autotune.errors import SpecError
from autotune.regularizers import make_regularizer
from autotune.space import BlockConfig, TrialConfig
from autotune.spec import ModelSpec

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def build_model(
    spec: ModelSpec, config: TrialConfig, input_shape: Sequence[int], n_classes: int
) -> nn.Sequential:
    """The template `spec.template` with one block per width, regularised as `config` says."""
    widths = spec.resolved_widths
    if len(config.blocks) != len(widths):
        raise ValueError(f"config has {len(config.blocks)} blocks, the model {len(widths)}")
    if spec.template == "mlp":
        return _mlp(widths, config, input_shape, n_classes, spec.activation)
    return _cnn(widths, config, input_shape, n_classes, spec.activation, spec.pool)


def _mlp(widths, config, input_shape, n_classes, activation) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    fan_in = 1
    for size in input_shape:
        fan_in *= size
    for i, (width, block) in enumerate(zip(widths, config.blocks, strict=True)):
        # bias=False: the BN that follows subtracts any bias
        weight = nn.Linear(fan_in, width, bias=False)
        layers[f"block{i}"] = _block(
            "linear",
            weight,
            nn.BatchNorm1d(width, momentum=block.bn_momentum),
            ACTIVATIONS[activation](),
            block,
        )
        fan_in = width
    layers["head"] = nn.Linear(fan_in, n_classes)
    return nn.Sequential(layers)


def _cnn(widths, config, input_shape, n_classes, activation, pool) -> nn.Sequential:
    if len(input_shape) != 3:
        raise SpecError(
            "model.template: cnn needs images shaped (C, H, W); "
            f"the data has shape {tuple(input_shape)}"
        )
    channels, side = input_shape[0], min(input_shape[1], input_shape[2])
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (width, block) in enumerate(zip(widths, config.blocks, strict=True)):
        conv = nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False)
        bn = nn.BatchNorm2d(width, momentum=block.bn_momentum)
        layers[f"block{i}"] = _block("conv", conv, bn, ACTIVATIONS[activation](), block)
        if pool and side >= 2:  # halve the map while it has room to halve
            layers[f"block{i}"].add_module("pool", nn.MaxPool2d(2))
            side //= 2
        channels = width
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(channels, n_classes)
    return nn.Sequential(layers)


def _block(
    kind: str, weight: nn.Module, bn: nn.Module, act: nn.Module, block: BlockConfig
) -> nn.Sequential:
    """weight -> bn -> act with the regulariser inserted where block.placement says."""
    order = [(kind, weight), ("bn", bn), ("act", act)]
    if block.active:
        drop = make_regularizer(block.regularizer, block.rate)
        slot = {"before_bn": 1, "after_bn": 2, "after_act": 3}[block.placement]
        order.insert(slot, ("drop", drop))
    return nn.Sequential(OrderedDict(order))

"""Network templates built from a TrialConfig: mlp, cnn and resnet.

A block is weight -> BatchNorm -> activation, with one regulariser slot whose placement is
`before_bn` (weight -> drop -> bn), `after_bn` (bn -> drop -> act) or `after_act` (act -> drop).
Blocks are nn.Sequential with named children (`linear`/`conv`, `drop`, `bn`, `act`, `pool`), so
parameter names are the same in every trial and in the exported snippet. A block without a
regulariser has no `drop` child at all.

    mlp:    flatten -> block0 ... blockN -> head (Linear)
    cnn:    block0 ... blockN -> pool (global average) -> flatten -> head (Linear)
            each block halves its map with 2x2 max pooling after the activation; an `after_act`
            dropout comes after that pooling (Conv -> BN -> ReLU -> MaxPool -> Dropout), so it
            feeds the next convolution directly
    resnet: block0 ... blockN -> pool -> flatten -> head; each block is a ResidualBlock

A residual block (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385) computes drop(act(drop_path(branch(x)) + shortcut(x))), with
branch = conv1 -> bn1 -> act1 -> conv2 -> bn2 and a 1x1 conv -> BN shortcut where the shape
changes. Its slot may also sit `in_branch`, between act1 and conv2 (the Wide-ResNet placement,
Zagoruyko & Komodakis, BMVC 2016, https://arxiv.org/abs/1605.07146), or be `residual`: stochastic
depth drops the whole branch (drop_path). Blocks after the first halve the map with stride 2.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from autotune.core.checks import check_template
from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import ModelSpec
from autotune.nn import surgery
from autotune.nn.regularizers import make_regularizer

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ResidualBlock(nn.Module):
    """drop(act(drop_path(branch(x)) + shortcut(x))); empty slots are nn.Identity."""

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module,
        act: nn.Module,
        drop_path: nn.Module | None = None,
        drop: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.act = act
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.drop_path(self.branch(x)) + self.shortcut(x)))


def build_model(
    spec: ModelSpec,
    config: TrialConfig,
    input_shape: Sequence[int],
    n_classes: int,
    *,
    batchnorm: bool = True,
    base_dir: Path = Path("."),
) -> nn.Module:
    """The network `spec` describes, regularised as `config` says: the template `spec.template`
    with one block per width, or the user's own model (`model.import`, found beside base_dir)
    with the configuration applied by autotune.nn.surgery.

    batchnorm=False: the same network with every BN layer removed (the "dropout only" baseline):
    the weight layer that fed each one gets a bias instead."""
    if spec.imported:
        model = surgery.build_imported(spec, config, input_shape, n_classes, base_dir=base_dir)
    else:
        model = _template(spec, config, input_shape, n_classes)
    if not batchnorm:
        surgery.without_batchnorm(model, surgery.find_blocks(model, input_shape))
    return model


def _template(
    spec: ModelSpec, config: TrialConfig, input_shape: Sequence[int], n_classes: int
) -> nn.Sequential:
    widths = spec.resolved_widths
    if len(config.blocks) != len(widths):
        raise ValueError(f"config has {len(config.blocks)} blocks, the model {len(widths)}")
    if spec.template == "mlp":
        return _mlp(widths, config, input_shape, n_classes, spec.activation)
    if spec.template == "resnet":
        return _resnet(widths, config, input_shape, n_classes, spec.activation, spec.pool)
    return _cnn(widths, config, input_shape, n_classes, spec.activation, spec.pool)


def _mlp(widths, config, input_shape, n_classes, activation) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    fan_in = 1
    for size in input_shape:
        fan_in *= size
    for i, (width, block) in enumerate(zip(widths, config.blocks, strict=True)):
        # bias=False: the BN that follows subtracts any bias
        weight = nn.Linear(fan_in, width, bias=False)
        bn = nn.BatchNorm1d(width, momentum=block.bn_momentum)
        layers[f"block{i}"] = _block("linear", weight, bn, ACTIVATIONS[activation](), block)
        fan_in = width
    layers["head"] = nn.Linear(fan_in, n_classes)
    return nn.Sequential(layers)


def _cnn(widths, config, input_shape, n_classes, activation, pool) -> nn.Sequential:
    channels, side = _image_shape(input_shape, "cnn")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (width, block) in enumerate(zip(widths, config.blocks, strict=True)):
        conv = nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False)
        bn = nn.BatchNorm2d(width, momentum=block.bn_momentum)
        pooling = None
        if pool and side >= 2:  # halve the map while it has room to halve
            pooling = nn.MaxPool2d(2)
            side //= 2
        layers[f"block{i}"] = _block("conv", conv, bn, ACTIVATIONS[activation](), block, pooling)
        channels = width
    return _classifier(layers, channels, n_classes)


def _resnet(widths, config, input_shape, n_classes, activation, pool) -> nn.Sequential:
    channels, side = _image_shape(input_shape, "resnet")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (width, block) in enumerate(zip(widths, config.blocks, strict=True)):
        stride = 2 if pool and i > 0 and side >= 2 else 1  # the first block keeps the map
        side = (side + 1) // 2 if stride == 2 else side
        layers[f"block{i}"] = _residual_block(channels, width, stride, activation, block)
        channels = width
    return _classifier(layers, channels, n_classes)


def _residual_block(
    channels: int, width: int, stride: int, activation: str, block: BlockConfig
) -> ResidualBlock:
    momentum = block.bn_momentum
    branch = [
        ("conv1", nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(width, momentum=momentum)),
        ("act1", ACTIVATIONS[activation]()),
        ("conv2", nn.Conv2d(width, width, 3, padding=1, bias=False)),
        ("bn2", nn.BatchNorm2d(width, momentum=momentum)),
    ]
    shortcut: nn.Module = nn.Identity()
    if stride != 1 or channels != width:  # a projection where the shape changes
        shortcut = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(width, momentum=momentum),
            )
        )
    drop_path = drop = None
    if block.active:
        module = make_regularizer(block.regularizer, block.rate)
        if block.placement == "residual":
            drop_path = module
        elif block.placement == "after_act":
            drop = module
        else:
            slot = {"before_bn": 1, "after_bn": 2, "in_branch": 3}[block.placement]
            branch.insert(slot, ("drop", module))
    return ResidualBlock(
        nn.Sequential(OrderedDict(branch)), shortcut, ACTIVATIONS[activation](), drop_path, drop
    )


def _image_shape(input_shape: Sequence[int], template: str) -> tuple[int, int]:
    check_template(template, input_shape)
    return input_shape[0], min(input_shape[1], input_shape[2])


def _classifier(
    layers: OrderedDict[str, nn.Module], channels: int, n_classes: int
) -> nn.Sequential:
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(channels, n_classes)
    return nn.Sequential(layers)


def _block(
    kind: str,
    weight: nn.Module,
    bn: nn.Module,
    act: nn.Module,
    block: BlockConfig,
    pool: nn.Module | None = None,
) -> nn.Sequential:
    """weight -> bn -> act [-> pool] with the regulariser inserted where block.placement says."""
    order = [(kind, weight), ("bn", bn), ("act", act)]
    if pool is not None:
        order.append(("pool", pool))
    if block.active:
        drop = make_regularizer(block.regularizer, block.rate)
        slots = {"before_bn": 1, "after_bn": 2, "after_act": len(order)}
        if block.placement not in slots:
            raise ValueError(f"placement {block.placement!r} needs a residual block (resnet)")
        slot = slots[block.placement]
        order.insert(slot, ("drop", drop))
    return nn.Sequential(OrderedDict(order))

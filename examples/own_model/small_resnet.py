"""A small ResNet of your own, written here as a user would write it (torchvision's ResNet has the
same shape; torchvision itself is not needed). autotune imports `build` (the spec's
`model.import`), finds every BatchNorm layer its forward pass uses, and tunes a regulariser slot
and the momentum around each one.

Each ReLU is a module of its own, used once: that gives every BN that an activation follows an
`after_act` slot. A ReLU shared by several layers (torchvision's `self.relu`) would not get one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, plus the shortcut, then ReLU (He et al., CVPR 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:  # a 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A 3x3 stem, one BasicBlock per width (each after the first halves the map), global
    average pooling and a linear classifier."""

    def __init__(self, in_channels: int, n_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(channels, width, stride=1 if i == 0 else 2))
            channels = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(input_shape: Sequence[int], n_classes: int, widths: Sequence[int] = (16, 32)) -> nn.Module:
    """What the spec imports: autotune passes input_shape and n_classes (the factory asks for
    them by name); `widths` comes from the spec's model.kwargs."""
    return SmallResNet(input_shape[0], n_classes, list(widths))

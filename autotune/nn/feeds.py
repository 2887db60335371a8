"""Which regularisers reach which BN layer, for the variance-shift prediction (prediction.py).

A regulariser reaches the BN layers up to and including the next BN on its way. `find_feeds`
walks autotune's templates block by block; `trace_feeds` follows a traced pass of any network
back from each BN's input. A `Feed` names the regulariser and the modules its output passes
through before that BN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autotune.nn.models import ResidualBlock
from autotune.nn.regularizers import REGULARIZER_TYPES
from autotune.nn.surgery import trace

BATCHNORM = nn.modules.batchnorm._BatchNorm
WEIGHTS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Feed:
    """One regulariser reaching one BN layer: its output passes through `path` first.

    path () is a regulariser directly before BN; None marks a way the closed forms do not cover
    (through a residual sum)."""

    source: str
    module: nn.Module
    path: tuple[nn.Module, ...] | None


def find_feeds(model: nn.Module) -> dict[str, list[Feed]]:
    """BN layer name -> the regularisers that reach it, for autotune's templates.

    A regulariser reaches the BN layers up to and including the next BN on its way: that BN
    normalises in training whatever variance the noise added, so layers past it see none.
    """
    feeds: dict[str, list[Feed]] = {}
    pending: list[Feed] = []  # regularisers whose output reaches the next block's input
    for name, block in model.named_children():
        if isinstance(block, ResidualBlock):
            pending = _residual_feeds(name, block, pending, feeds)
        elif isinstance(block, nn.Sequential) and "bn" in block._modules:
            pending = _plain_feeds(name, block, pending, feeds)
    return feeds


def trace_feeds(net: nn.Module, x: torch.Tensor) -> dict[str, list[Feed]]:
    """BN layer name -> the regularisers that reach it, for any network (an imported model).

    One pass of `x` in training mode (so every regulariser makes a tensor of its own) is traced
    by tensor identity (autotune.nn.surgery.trace). From each BN's input the trace is followed back
    through modules of one input, collecting the regularisers on the way, and stops at a BN, at a
    module of several inputs, or where a function rather than a module made the tensor: past
    those the closed forms do not follow, and the Monte Carlo estimate takes over."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the probe's draws unchanged
        calls = trace(net.train(), x)
    feeds: dict[str, list[Feed]] = {}
    for at, call in enumerate(calls):
        if not isinstance(call.module, BATCHNORM) or call.name in feeds or not call.inputs:
            continue
        found: list[Feed] = []
        path: list[nn.Module] = []
        tensor, before = call.inputs[0], at
        while True:
            made = [j for j in range(before) if calls[j].output == tensor]
            if not made:
                break
            noisy = [j for j in made if isinstance(calls[j].module, REGULARIZER_TYPES)]
            before = (noisy or made)[-1]
            maker = calls[before]
            if isinstance(maker.module, REGULARIZER_TYPES):
                covered = not path or isinstance(path[-1], WEIGHTS)
                found.append(Feed(maker.name, maker.module, tuple(path) if covered else None))
            elif isinstance(maker.module, BATCHNORM) or len(maker.inputs) != 1:
                break
            else:
                path.insert(0, maker.module)
            tensor = maker.inputs[0]
        feeds[call.name] = found
    return feeds


def _through(pending: list[Feed], modules: tuple[nn.Module, ...]) -> list[Feed]:
    return [Feed(f.source, f.module, None if f.path is None else f.path + modules) for f in pending]


def _plain_feeds(
    name: str, block: nn.Sequential, pending: list[Feed], feeds: dict[str, list[Feed]]
) -> list[Feed]:
    names = list(block._modules)
    weight = block[0]
    drop = block._modules.get("drop")
    own = []
    if drop is not None and names.index("drop") < names.index("bn"):
        own = [Feed(f"{name}.drop", drop, ())]
    feeds[f"{name}.bn"] = _through(pending, (weight,)) + own
    if drop is not None and names.index("drop") > names.index("bn"):
        after = tuple(block[i] for i in range(names.index("drop") + 1, len(names)))
        return [Feed(f"{name}.drop", drop, after)]
    return []


def _residual_feeds(
    name: str, block: ResidualBlock, pending: list[Feed], feeds: dict[str, list[Feed]]
) -> list[Feed]:
    branch = block.branch
    names = list(branch._modules)
    drop = branch._modules.get("drop")
    at = names.index("drop") if drop is not None else -1
    own = [Feed(f"{name}.branch.drop", drop, ())] if 0 <= at < names.index("bn1") else []
    feeds[f"{name}.branch.bn1"] = _through(pending, (branch.conv1,)) + own
    if at > names.index("bn1"):
        path = tuple(branch[i] for i in range(at + 1, names.index("bn2")))
        feeds[f"{name}.branch.bn2"] = [Feed(f"{name}.branch.drop", drop, path)]
    if isinstance(block.shortcut, nn.Sequential):
        feeds[f"{name}.shortcut.bn"] = _through(pending, (block.shortcut.conv,))
        carried = []
    else:  # an identity shortcut carries the noise on, mixed into the residual sum
        carried = _through_sum(pending)
    if not isinstance(block.drop, nn.Identity):
        return [Feed(f"{name}.drop", block.drop, ())]
    if not isinstance(block.drop_path, nn.Identity):
        return [Feed(f"{name}.drop_path", block.drop_path, None), *carried]
    return carried


def _through_sum(pending: list[Feed]) -> list[Feed]:
    return [Feed(f.source, f.module, None) for f in pending]

"""The dropout family as nn.Modules, built by name from a search configuration.

Every regulariser sits in a block's one slot and is identity in eval mode. `rate` is always the
DROP probability (PyTorch's convention).

- dropout: element-wise Bernoulli dropout with inverted scaling.
  Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
  JMLR 2014, https://jmlr.org/papers/v15/srivastava14a.html
- spatial_dropout: drops whole channels of a (N, C, H, W) map, since neighbouring pixels of a
  feature map are correlated and element-wise dropout barely removes information there.
  Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015,
  https://arxiv.org/abs/1411.4280

The search's vocabulary (names and which blocks each applies to) is autotune.space.REGULARIZERS;
a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

FACTORIES: dict[str, Callable[[float], nn.Module]] = {
    "dropout": lambda rate: nn.Dropout(p=rate),
    "spatial_dropout": lambda rate: nn.Dropout2d(p=rate),
}


def make_regularizer(name: str, rate: float) -> nn.Module:
    """The regulariser `name` dropping a share `rate`; a rate of 0 is nn.Identity()."""
    if name not in FACTORIES:
        raise ValueError(f"Unknown regularizer {name!r}; expected one of: {', '.join(FACTORIES)}")
    if not 0 <= rate < 1:
        raise ValueError(f"A drop rate must lie in [0, 1), but got {rate=}.")
    return nn.Identity() if rate == 0 else FACTORIES[name](rate)

"""The dropout family as nn.Modules, built by name from a search configuration.

Every regulariser sits in a block's one slot and is the identity in eval mode. `rate` is always
the DROP probability (PyTorch's convention). For uout, rate is the half-width beta of the noise.

- dropout: element-wise Bernoulli dropout with inverted scaling (torch's nn.Dropout).
  Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
  JMLR 2014, https://jmlr.org/papers/v15/srivastava14a.html
- spatial_dropout: drops whole channels of a (N, C, H, W) map (torch's nn.Dropout2d). Neighbouring
  pixels are correlated, so element-wise dropout barely removes information there.
  Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015,
  https://arxiv.org/abs/1411.4280
- gaussian: multiplies by mean-one Gaussian noise with the variance of Bernoulli dropout.
  Srivastava et al., JMLR 2014, section 10.
- uout: multiplies by 1 + r with r ~ U(-beta, beta), a small variance that shifts BN less.
  Li et al., "Understanding the Disharmony between Dropout and Batch Normalization by Variance
  Shift", CVPR 2019, https://arxiv.org/abs/1801.05134
- alpha_dropout: keeps the mean and variance of SELU activations (torch's nn.AlphaDropout).
  Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017,
  https://arxiv.org/abs/1706.02515
- dropblock: drops contiguous squares of a feature map.
  Ghiasi et al., "DropBlock: A regularization method for convolutional networks", NeurIPS 2018,
  https://arxiv.org/abs/1810.12890
- stochastic_depth: drops a residual branch for whole samples.
  Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016, https://arxiv.org/abs/1603.09382

The classes defined here (CUSTOM_MODULES) use only `torch`, `nn` and `F`: the exporter pastes
their source into a standalone snippet. Each keeps its constructor arguments as attributes of the
same names, so the exporter can write the call back out.

The search's vocabulary (names and which blocks each applies to) is
autotune.core.space.REGULARIZERS; a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GaussianDropout(nn.Module):
    """Multiplicative Gaussian noise: x * (1 + sigma * eps), eps ~ N(0, 1), in training.

    sigma² = rate / (1 - rate), the noise variance of Bernoulli dropout at drop rate `rate`, so
    the two inflate a BN layer's input variance alike. The identity in eval mode.
    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 2014, section 10, https://jmlr.org/papers/v15/srivastava14a.html
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"A drop rate must lie in [0, 1), but got {rate=}.")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        sigma = (self.rate / (1 - self.rate)) ** 0.5
        return x * torch.randn_like(x).mul_(sigma).add_(1.0)  # noise: mean 1, variance sigma²

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Uout(nn.Module):
    """Multiplicative uniform noise: x * (1 + r), r ~ U(-beta, beta), in training.

    The noise variance is beta² / 3, far below dropout's, so BN's statistics shift less between
    training and inference. The identity in eval mode.
    Li et al., "Understanding the Disharmony between Dropout and Batch Normalization by Variance
    Shift", CVPR 2019, https://arxiv.org/abs/1801.05134
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"The noise half-width must not be negative, but got {beta=}.")
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # 1 + r drawn uniformly from [1 - beta, 1 + beta)
        return x * torch.rand_like(x).mul_(2 * self.beta).add_(1 - self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class DropBlock2d(nn.Module):
    """Drops contiguous block_size x block_size squares of each (N, C, H, W) map, in training.

    About a share `rate` of each map is dropped; the rest is scaled up so the mean is kept. On a
    map smaller than block_size the block shrinks to fit (down to 1 x 1, plain dropout). The
    identity in eval mode.
    Ghiasi et al., "DropBlock: A regularization method for convolutional networks", NeurIPS 2018,
    https://arxiv.org/abs/1810.12890
    """

    def __init__(self, rate: float, block_size: int = 3) -> None:
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"A drop rate must lie in [0, 1), but got {rate=}.")
        if block_size < 1:
            raise ValueError(f"A block size must be at least 1, but got {block_size=}.")
        self.rate = rate
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        h, w = x.shape[-2], x.shape[-1]
        bs = min(self.block_size, h, w)
        # 1. seed rate: `rate` of the map spread over blocks of bs² pixels, whose seeds fall only
        #    where a whole block fits, (h - bs + 1) x (w - bs + 1) places
        gamma = self.rate / bs**2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
        # 2. one seed per place a block fits: (..., h - bs + 1, w - bs + 1), a block's top-left
        #    (written for TorchScript: lists of sizes, nothing unpacked)
        places = list(x.shape[:-2]) + [h - bs + 1, w - bs + 1]  # noqa: RUF005 (TorchScript)
        seeds = torch.bernoulli(x.new_full(places, gamma))
        # 3. grow each seed into its square: pad by bs - 1, max-pool at stride 1: (..., h, w)
        mask = 1 - F.max_pool2d(F.pad(seeds, [bs - 1] * 4), bs, stride=1)
        # 4. scale up what is kept; an all-dropped mask stays zero rather than dividing by zero
        return x * mask * (mask.numel() / mask.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"rate={self.rate}, block_size={self.block_size}"


class StochasticDepth(nn.Module):
    """Zeroes the whole input of a sample with probability `rate`, else scales it by 1/(1 - rate).

    Applied to a residual branch, a dropped sample skips the block (torchvision's "row" mode of
    stochastic_depth). The identity in eval mode.
    Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016,
    https://arxiv.org/abs/1603.09382
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"A drop rate must lie in [0, 1), but got {rate=}.")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.rate
        # one coin a sample, (N, 1, ..., 1), broadcast over the rest
        coins = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * coins.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


# Our own classes, whose source the exporter copies; the others are torch's.
CUSTOM_MODULES: tuple[type[nn.Module], ...] = (GaussianDropout, Uout, DropBlock2d, StochasticDepth)
# every module that is noise in training and identity at inference: torch's and ours
REGULARIZER_TYPES = (nn.modules.dropout._DropoutNd, *CUSTOM_MODULES)

FACTORIES: dict[str, Callable[[float], nn.Module]] = {
    "dropout": lambda rate: nn.Dropout(p=rate),
    "spatial_dropout": lambda rate: nn.Dropout2d(p=rate),
    "gaussian": lambda rate: GaussianDropout(rate=rate),
    "uout": lambda rate: Uout(beta=rate),  # for uout, rate is the half-width beta of the noise
    "alpha_dropout": lambda rate: nn.AlphaDropout(p=rate),
    "dropblock": lambda rate: DropBlock2d(rate=rate),
    "stochastic_depth": lambda rate: StochasticDepth(rate=rate),
}


def make_regularizer(name: str, rate: float) -> nn.Module:
    """The regulariser `name` at drop rate `rate`; a rate of 0 is nn.Identity().

    For uout, rate is the half-width beta of the noise.
    """
    if name not in FACTORIES:
        raise ValueError(f"Unknown regularizer {name!r}; expected one of: {', '.join(FACTORIES)}")
    if not 0 <= rate < 1:
        raise ValueError(f"A drop rate must lie in [0, 1), but got {rate=}.")
    return nn.Identity() if rate == 0 else FACTORIES[name](rate)

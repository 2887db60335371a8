"""autotune: find how a network should combine Dropout and BatchNorm."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(output_dir: str | Path) -> nn.Module:
    """The network a study recommends, from its output folder, ready for inference in one call:
    its trained weights loaded, in eval mode, and where autotune standardised the inputs, that
    standardisation in front, so that it takes raw features; `model.classes[i]` is then the
    label of output i. It runs the folder's best_model.py (its load()), once checked to be what
    autotune writes.

        model = autotune.load("runs/quickstart")
        labels = [model.classes[i] for i in model(raw_features).argmax(1)]
    """
    from autotune.outputs.loading import load_recommended  # torch: imported when called

    return load_recommended(output_dir)

"""`autotune.load(output_dir)`: the recommendation a study wrote, as a network ready for inference
in one call, by the `load()` of the best_model.py written there.

best_model.py is checked to be what autotune renders (outputs.snippet.check_rendered: at import it
runs nothing but imports, definitions and literal constants) before it runs; its load() reads the
weights and the input statistics beside it with torch.load(weights_only=True), data only."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from autotune.core.names import BEST_MODEL
from autotune.outputs.snippet import snippet_namespace


def load_recommended(output_dir: str | Path) -> nn.Module:
    """The recommended network with its trained weights, in eval mode: behind the input
    standardisation where autotune standardised the inputs (it takes raw features, and
    model.classes[i] is the label of output i). FileNotFoundError where the folder holds no
    best_model.py with a load() and the weights it names."""
    path = Path(output_dir) / BEST_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not there; a study writes it at its end, `autotune export SPEC` again"
        )
    namespace = snippet_namespace(path.read_text(), path)
    if "load" not in namespace:
        raise FileNotFoundError(
            f"{path}: has no load(): autotune saved no weights for it, or an older version "
            "wrote it; `autotune export SPEC` writes it again"
        )
    return namespace["load"]()

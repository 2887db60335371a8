"""The trained weights: saved whole with their digest, and a network rebuilt from a written file
checked against the tuned one, in layers, names and parameter count (`verify_network`) and, with
the weights loaded, in outputs (`verify_weights`). A check that fails raises `CheckFailed`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.core.errors import first_line
from autotune.core.writes import write_atomic

# how close the rebuilt network's outputs must be to the tuned one's, in float32
OUTPUT_TOLERANCE = 1e-5


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_tensors(obj: Any, path: Path) -> str:
    """torch.save(obj) to `path`, whole or not at all (writes.write_atomic); returns the sha256
    of what was written, which the export checks a trial's weights against. Raises WriteError
    when the file cannot be written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


class CheckFailed(RuntimeError):
    """A file autotune wrote does not describe the tuned network; the message begins with the
    file's path. `autotune export` says it in one line, exit code 2."""


class WeightsDoNotLoad(CheckFailed):
    """A weights file that does not fit the network it is checked against."""


def verify_weights(
    rebuilt: nn.Module,
    reference: nn.Module,
    weights: Path,
    input_shape: tuple[int, ...],
    source: Path,
) -> float:
    """Load the saved state_dict into both networks and compare their eval-mode outputs on a
    seeded batch; return the largest difference. Raise when a key does not load or the outputs
    differ: then the file does not describe the trained network."""
    try:  # data only: no pickled code runs
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # cut short, not torch's, ...
        raise WeightsDoNotLoad(f"{weights}: cannot be read: {first_line(exc)}") from None
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsDoNotLoad(
            f"{source}: the trained weights do not load: {first_line(exc)}"
        ) from None
    reference.load_state_dict(state)
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = reference.eval()(x), rebuilt.eval()(x)
    diff = float((ours - theirs).abs().max())
    if not torch.allclose(ours, theirs, atol=OUTPUT_TOLERANCE, rtol=OUTPUT_TOLERANCE):
        raise CheckFailed(
            f"{source}: with the trained weights its outputs differ from the tuned network's "
            f"by up to {diff:.3g}"
        )
    return diff


def verify_network(rebuilt: nn.Module, reference: nn.Module, source: Path) -> None:
    """Raise CheckFailed if `rebuilt` differs from `reference` in layers, names or parameter
    count."""
    if repr(rebuilt) != repr(reference):
        raise CheckFailed(f"{source}: the rendered network differs from the tuned one")
    count = sum(p.numel() for p in rebuilt.parameters())
    expected = sum(p.numel() for p in reference.parameters())
    if count != expected:
        raise CheckFailed(f"{source}: {count} parameters, the tuned model has {expected}")
    if set(rebuilt.state_dict()) != set(reference.state_dict()):
        raise CheckFailed(f"{source}: state_dict keys differ from the tuned model's")


def own_weights(path: Path, digest: str | None) -> tuple[Path | None, str]:
    """The trial's saved weights, when they are here and are its own (`digest`, where it was
    recorded); else None and why not."""
    if not path.exists():  # trained on another node, or removed
        return None, "no saved weights here to load"
    if digest is not None and file_digest(path) != digest:
        return None, f"{path.name} is not this trial's (another study's?), so it was not used"
    return path, ""

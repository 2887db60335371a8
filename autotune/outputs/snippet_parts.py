"""What best_model.py carries besides the network: how autotune trained it (the docstring's
paragraph, TRAINING, RECALIBRATE_BN) and the functions that training needs, rendered by
`training_parts`.

The functions are written here as real code and the snippet copies their source
(inspect.getsource), so what the tests run is what users get. Each needs torch alone (and
pathlib), and reads no name but its own, `torch`, `nn`, `Path` and the snippet's constant
`INPUT_STATS`, and nothing of its annotations needs `from __future__ import annotations` (this
module does not import it): they run unchanged once pasted into a standalone file.

- recalibrate_bn: autotune.nn.shift.recalibrate_bn, standalone. Every BN layer's running
  statistics re-estimated on training batches with the regularisers off: the BN layers in
  training mode (batch statistics, as in training), everything else in eval mode, each BN's input
  pooled per channel in float64 over all the batches (count, sum, sum of squares), the pooled
  mean and unbiased variance written into running_mean and running_var.
- standardise: raw features to what the model expects, with the statistics autotune saved
  (input_stats.pt, beside best_model.py).
"""

import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.core.names import INPUT_STATS

# best_model.py's own names that load() reads once it is copied there: bound by the snippet
WEIGHTS: str | None = None
build_model: Callable[[], nn.Module] | None = None

# TRAINING's settings the docstring's paragraph names first, in this order
_HYPER = ("optimizer", "lr", "weight_decay", "momentum")


def training_parts(
    train: dict[str, Any] | None,
    recalibrate: bool,
    standardised: bool,
    weights: str | None = None,
) -> tuple[str, str, str, str]:
    """(docstring paragraphs, imports, constants, functions) of best_model.py besides its
    network: how autotune trained it (`train`: optimizer, lr, weight_decay, momentum, max_epochs,
    batch_size; None: not said) as a paragraph and TRAINING; whether it recalibrated BN as
    RECALIBRATE_BN, with recalibrate_bn() where it did; standardise() and INPUT_STATS where
    autotune standardised the inputs; load() and WEIGHTS (`weights`, the saved weights' path
    relative to the snippet's folder) where there are weights, with Standardised where the
    inputs were standardised. Values are rendered with repr; the paragraphs are text for
    `docstring`, each opening with a blank line."""
    doc, functions = [], []
    settings = None if train is None else training_settings(train)
    if settings is not None:
        hyper = ", ".join(f"{k} {v!r}" for k, v in settings.items() if k in _HYPER)
        batches = (
            f"shuffled batches of {settings['batch_size']!r} rows"
            if "batch_size" in settings
            else "your DataModule's training batches"
        )
        inputs = ", inputs standardised with standardise()" if standardised else ""
        after = " After training, call recalibrate_bn(model, batches of training data) once."
        doc.append(
            f"How autotune trained it (TRAINING): {hyper}, at a constant learning rate; "
            f"cross-entropy loss; {settings['max_epochs']!r} epochs of {batches}{inputs}."
            + (after if recalibrate else "")
        )
    if recalibrate:
        doc.append(
            "recalibrate_bn() re-estimates BN's running statistics with dropout off, as autotune "
            "did after training. The weights autotune saved hold them already: do not call it "
            "again after loading them."
        )
        functions.append(recalibrate_bn)
    if standardised:
        doc.append(
            "standardise(raw) turns raw features shaped like INPUT_SHAPE, rows first, into the "
            f"model's inputs with the statistics autotune saved in {INPUT_STATS} beside this "
            "file; stats['classes'][i] there is the label of output i."
        )
        functions.append(standardise)
    else:
        doc.append("The model expects inputs prepared as your DataModule prepares them.")
    if weights is not None:
        raw = "raw features" if standardised else "inputs prepared as for training"
        doc.append(
            f"load() returns the network with the weights autotune trained ({weights}), in eval "
            f"mode, ready for inference on {raw}"
            + (
                ": the standardisation included, model.classes[i] the label of output i."
                if standardised
                else "."
            )
            + " It is plain torch: torch.jit.script(load()) and torch.export.export(load(), "
            "(x,)) work on it."
        )
        functions.extend((Standardised, load) if standardised else (load,))
    constants = []
    if settings is not None:
        items = "".join(f"    {key!r}: {value!r},\n" for key, value in settings.items())
        constants.append(f"TRAINING = {{  # how autotune trained it\n{items}}}")
    said = "call recalibrate_bn() once after training" if recalibrate else "not recalibrated"
    constants.append(f"RECALIBRATE_BN = {bool(recalibrate)!r}  # BN's statistics: {said}")
    constants.append(
        f"INPUT_STATS = {INPUT_STATS if standardised else None!r}  # standardise()'s file, "
        + ("beside this one" if standardised else "none: your DataModule prepares the inputs")
    )
    if weights is not None:
        constants.append(f"WEIGHTS = {weights!r}  # load()'s file, from this one's folder")
    return (
        "".join(f"\n{textwrap.fill(paragraph, 99)}\n" for paragraph in doc),
        "from pathlib import Path\n" if standardised or weights is not None else "",
        "\n".join(constants),
        "".join(f"\n\n\n{inspect.getsource(f).rstrip()}" for f in functions),
    )


def training_settings(train: dict[str, Any]) -> dict[str, Any]:
    """TRAINING: what a plain training loop needs of `train`, each a plain str, float or int
    (momentum for sgd only; batch_size where `train` has it: not for a user's DataModule, which
    serves its own batches)."""
    optimizer = str(train["optimizer"])
    settings: dict[str, Any] = {
        "optimizer": optimizer,
        "lr": float(train["lr"]),
        "weight_decay": float(train["weight_decay"]),
    }
    if optimizer == "sgd":
        settings["momentum"] = float(train["momentum"])
    settings["max_epochs"] = int(train["max_epochs"])
    if train.get("batch_size") is not None:
        settings["batch_size"] = int(train["batch_size"])
    settings["loss"] = "cross_entropy"
    return settings


def recalibrate_bn(model: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm layer's running statistics with dropout off, as autotune did.

    Call it once, after training and before evaluating or deploying the model, with batches of
    the training data (tensors x or tuples (x, y, ...); inputs prepared as for training); about
    200 batches are plenty. The weights autotune saved already hold recalibrated statistics: do
    not call it again after loading them. Parameters are not touched; BN layers the data never
    reaches keep their statistics; every module's training flag is restored. Returns the model.
    """
    bn_type = nn.modules.batchnorm._BatchNorm
    layers = [m for m in model.modules() if isinstance(m, bn_type) and m.track_running_stats]
    flags = {module: module.training for module in model.modules()}
    pooled = {bn: [0, 0.0, 0.0] for bn in layers}  # count, sum, sum of squares per channel

    def pool(bn, inputs, output):
        x = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1).double()
        seen = pooled[bn]
        seen[0] += x.shape[1]
        seen[1] = seen[1] + x.sum(dim=1)
        seen[2] = seen[2] + x.square().sum(dim=1)

    handles = [bn.register_forward_hook(pool) for bn in layers]
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    device = torch.device("cpu") if tensor is None else tensor.device
    n_batches = 0
    try:
        model.eval()  # every regulariser off
        for bn in layers:  # not .train(): a regulariser held as a child of a BN stays off
            bn.training = True
        with torch.no_grad():
            for batch in batches:
                x = batch if isinstance(batch, torch.Tensor) else batch[0]
                model(x.to(device))
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    if n_batches == 0:
        raise ValueError("Got no batches; pass an iterable of tensors x or tuples (x, y, ...).")
    for bn, (count, total, squares) in pooled.items():
        if count == 0:
            continue
        mean = total / count
        var = (squares - count * mean * mean) / max(count - 1, 1)
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_(var.clamp(min=0).to(bn.running_var))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(n_batches)
    return model


def standardise(raw, stats_path=None) -> torch.Tensor:
    """Raw features (an array or tensor shaped like (rows, *INPUT_SHAPE), rows first) as the
    float32 inputs the model was trained on: (raw - mean) / std with the statistics autotune
    took of the training split. `stats_path` is the file autotune saved them in, by default
    input_stats.pt beside this file; stats["classes"][i] there is the label of output i.
    """
    path = Path(__file__).with_name(INPUT_STATS) if stats_path is None else stats_path
    stats = torch.load(path, weights_only=True)
    return (torch.as_tensor(raw, dtype=torch.float32) - stats["mean"]) / stats["std"]


class Standardised(nn.Module):
    """The network behind the input standardisation autotune trained it with: forward() takes
    raw features shaped (rows, *INPUT_SHAPE). classes[i] is the label of output i."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor, classes) -> None:
        super().__init__()
        self.net = net
        # float64, as autotune standardised: a large mean over a small spread loses no digits
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64))
        self.classes = list(classes)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.net(((raw.to(torch.float64) - self.mean) / self.std).to(torch.float32))


def load(weights=None, stats_path=None) -> nn.Module:
    """The recommended network with the weights autotune trained, in eval mode.

    `weights`: a state_dict file, by default WEIGHTS beside this file. Where autotune
    standardised the inputs, the network comes behind that standardisation (Standardised, its
    statistics from `stats_path`, by default INPUT_STATS beside this file): it takes raw features
    and model.classes[i] is the label of output i. Otherwise it takes inputs prepared as for
    training. Either way model(x).argmax(1) is the predicted output.
    """
    here = Path(__file__).parent
    net = build_model()
    state = torch.load(here / WEIGHTS if weights is None else weights, weights_only=True)
    net.load_state_dict(state)
    net.eval()
    if INPUT_STATS is None:
        return net
    path = here / INPUT_STATS if stats_path is None else stats_path
    stats = torch.load(path, weights_only=True)
    return Standardised(net, stats["mean"], stats["std"], stats["classes"]).eval()

"""What a GPU rewards (train.precision, channels_last, compile, the data held on the device),
checked on the CPU where it also works: each changes how a fit computes, never what it returns or
saves."""

from __future__ import annotations

import math

import pytest
import torch

from autotune import training
from autotune.data import load_data
from autotune.errors import SpecError
from autotune.spec import parse_spec
from autotune.study import check_runnable, resolve_space


def cnn_spec(**train):
    return parse_spec(
        {
            "data": {"name": "digits", "batch_size": 256},
            "model": {"template": "cnn", "widths": [4, 8]},
            "train": {"max_epochs": 1, "accelerator": "cpu", **train},
            "mlflow": {"enabled": False},
        }
    )


def fit(spec, watch=None):
    data = load_data(spec.data, seed=0)
    config = resolve_space(spec).defaults()
    if watch is None:
        return training.fit(spec, config, data)
    original = training.build_seeded

    def build_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        model.block0.conv.register_forward_hook(watch)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "build_seeded", build_and_watch)
        return training.fit(spec, config, data)


def test_bf16_mixed_trains_under_bfloat16_autocast():
    seen = []
    result = fit(cnn_spec(precision="bf16-mixed"), lambda m, a, out: seen.append(out.dtype))

    # the convolutions ran in bfloat16 while training; the trained weights stay float32
    assert torch.bfloat16 in seen
    assert result.model.block0.conv.weight.dtype == torch.float32
    assert math.isfinite(result.value)


def test_channels_last_stores_weights_and_batches_as_nhwc():
    seen = []

    def watch(module, args, out):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    result = fit(cnn_spec(channels_last=True), watch)

    # the batch reached the first convolution channels-last, and the weights stayed so
    assert seen and all(seen)
    assert result.model.block0.conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the same keys as any fit: a production model loads them as usual
    assert list(result.model.state_dict()) == list(fit(cnn_spec()).model.state_dict())


def test_compile_compiles_the_network_for_the_fit_only(monkeypatch):
    compiled = []

    def compile(model):  # torch.compile takes tens of seconds on the CPU: record the call
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", compile)
    result = fit(cnn_spec(compile=True))

    # the trial's network was compiled once, and comes back as the plain module it was
    assert compiled == [result.model]
    assert not any(name.startswith("_orig_mod") for name in result.model.state_dict())


def test_an_unknown_precision_names_the_field():
    # pydantic's literal check names the field and the choices
    with pytest.raises(SpecError, match=r"train\.precision: .*'32-true', 'bf16-mixed'"):
        cnn_spec(precision="8-bit")


def test_a_precision_the_machine_refuses_is_bad_input(monkeypatch):
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    spec = cnn_spec(precision="16-mixed")
    space, data = resolve_space(spec), load_data(spec.data, seed=0)

    def refuse(**kwargs):  # what Lightning says where a device lacks the precision
        raise MisconfigurationException("16-mixed precision is not supported on this device\n...")

    monkeypatch.setattr(pl, "Trainer", refuse)
    # one line naming the field and the value, before any trial
    with pytest.raises(SpecError, match=r"^train\.precision: '16-mixed': 16-mixed precision"):
        check_runnable(spec, space, data)


def test_the_fit_holds_the_data_on_the_device_it_trains_on(monkeypatch):
    held = []
    hold = training.hold_on_device
    monkeypatch.setattr(
        training, "hold_on_device", lambda dm, device: held.append(device) or hold(dm, device)
    )
    fit(cnn_spec())
    # the Trainer's own device, asked before the first batch
    assert held == [torch.device("cpu")]

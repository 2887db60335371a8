"""A trial's fit, and how it is made cheap: what a GPU rewards (train.precision, channels_last,
compile, the data held on the device), checked on the CPU where it also works, and the
measurements after training folded into passes the trial runs anyway. Each changes how a fit
computes, never what it returns or saves."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autotune.core.errors import SpecError
from autotune.core.spec import parse_spec
from autotune.nn import fitting
from autotune.nn.data import load_data
from autotune.run.preflight import check_runnable, resolve_space


def digits_spec(model, *, batch_size, max_epochs, **train):
    return parse_spec(
        {
            # no test split: the figures below were measured on digits' 80/20 split
            "data": {"name": "digits", "batch_size": batch_size, "test_fraction": 0},
            "model": model,
            "train": {"max_epochs": max_epochs, "accelerator": "cpu", **train},
            "mlflow": {"enabled": False},
        }
    )


def cnn_spec(**train):
    return digits_spec({"template": "cnn", "widths": [4, 8]}, batch_size=256, max_epochs=1, **train)


def fit(spec, watch=None):
    data = load_data(spec.data, seed=0)
    config = resolve_space(spec).defaults()
    if watch is None:
        return fitting.fit(spec, config, data)
    original = fitting.build_seeded

    def build_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        model.block0.conv.register_forward_hook(watch)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fitting, "build_seeded", build_and_watch)
        return fitting.fit(spec, config, data)


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
        if kwargs["precision"] != "32-true":  # the device itself is there
            raise MisconfigurationException(
                "16-mixed precision is not supported on this device\n..."
            )

    monkeypatch.setattr(pl, "Trainer", refuse)
    # one line naming the field and the value, before any trial
    with pytest.raises(SpecError, match=r"^train\.precision: '16-mixed': 16-mixed precision"):
        check_runnable(spec, space, data)


def test_the_fit_holds_the_data_on_the_device_it_trains_on(monkeypatch):
    held = []
    hold = fitting.hold_on_device
    monkeypatch.setattr(
        fitting, "hold_on_device", lambda dm, device: held.append(device) or hold(dm, device)
    )
    fit(cnn_spec())
    # the Trainer's own device, asked before the first batch
    assert held == [torch.device("cpu")]


# --- the measurements, in passes the trial runs anyway -------------------------------------------


def mlp_spec(**train):
    model = {"template": "mlp", "widths": [64, 32]}
    return digits_spec(model, batch_size=128, max_epochs=2, **train)


def dropout_before_bn(recalibrate):
    from autotune.core.space import BlockConfig, TrialConfig

    block = BlockConfig("before_bn", 0.4, "dropout")
    return TrialConfig((block, block), recalibrate_bn=recalibrate)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_delta_taken_in_a_pass_the_trial_runs_anyway_is_measure_shifts(recalibrate):
    from autotune.nn.shift import measure_shift

    data = load_data(mlp_spec().data, seed=0)
    result = fitting.fit(mlp_spec(), dropout_before_bn(recalibrate), data)
    # the last validation (or, after recalibration, the validation again) observed the final
    # network on the validation data: measuring it afresh gives the same Δ, layer by layer
    again = measure_shift(result.model, data.val_dataloader())
    assert list(result.measured) == list(again) == ["block0.bn", "block1.bn"]
    for name, shift in again.items():
        assert result.measured[name].per_channel == pytest.approx(shift.per_channel, rel=1e-9)
    # dropout before BN shrank Δ (0.64 here); recalibration on the training data brought it
    # near 1 (1.10 here: the validation rows vary a little more than the training rows)
    first = result.measured["block0.bn"].delta
    assert 0.9 < first < 1.2 if recalibrate else first < 0.8
    # and no observing hook was left behind
    assert not any(m._forward_hooks for m in result.model.modules())


def test_delta_takes_a_float32_pass_where_validation_ran_another_precision(monkeypatch):
    calls = []
    evaluate = fitting.evaluate
    monkeypatch.setattr(fitting, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    data = load_data(mlp_spec().data, seed=0)
    fitting.fit(mlp_spec(), dropout_before_bn(False), data)
    assert calls == []  # taken in the last validation
    result = fitting.fit(mlp_spec(precision="bf16-mixed"), dropout_before_bn(False), data)
    # bfloat16 validation is not the float32 network: one float32 pass gives Δ and eval mode's
    # accuracy, while the trial's value stays its last epoch's
    assert calls == [1] and set(result.measured) == {"block0.bn", "block1.bn"}
    assert result.value == result.history[-1]["val_acc"]
    assert result.final["mode_acc_gap"] == (
        result.final["eval_mode_acc"] - result.final["train_mode_acc"]
    )


def test_train_and_eval_mode_accuracy_are_taken_on_the_validation_data(monkeypatch):
    data = load_data(mlp_spec().data, seed=0)
    served = []
    take = fitting.train_mode_accuracy

    def seeded(model, batches):  # the dropout masks seeded, so the figure can be taken again
        served.append(batches)
        torch.manual_seed(5)
        return take(model, batches)

    monkeypatch.setattr(fitting, "train_mode_accuracy", seeded)
    result = fitting.fit(mlp_spec(), dropout_before_bn(False), data)
    final = result.final
    # one pass in train mode over the validation rows; eval mode's is the trial's val_acc
    (batches,) = served
    assert batches.x is data.x_val and not batches.shuffle
    torch.manual_seed(5)
    assert final["train_mode_acc"] == take(result.model, data.val_dataloader())
    assert final["eval_mode_acc"] == final["val_acc"]
    assert final["mode_acc_gap"] == final["eval_mode_acc"] - final["train_mode_acc"]


def test_delta_is_measured_after_the_fit_when_the_last_validation_was_not_observed(monkeypatch):
    from autotune.nn.shift import measure_shift

    # as if the last epoch's validation had not run: the float32 pass after the fit measures
    monkeypatch.setattr(fitting.LastValidationShift, "on_validation_epoch_start", lambda *a: None)
    data = load_data(mlp_spec().data, seed=0)
    result = fitting.fit(mlp_spec(), dropout_before_bn(False), data)
    again = measure_shift(result.model, data.val_dataloader())
    assert list(result.measured) == list(again)
    for name, shift in again.items():
        assert result.measured[name].per_channel == pytest.approx(shift.per_channel, rel=1e-9)


def test_no_observing_hook_is_left_when_the_last_validation_fails(monkeypatch):
    built = []
    build = fitting.build_seeded
    monkeypatch.setattr(
        fitting, "build_seeded", lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    )
    validate = fitting.Classifier.validation_step

    def fails_in_the_last_epoch(self, batch, batch_idx):
        if self.trainer.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("the device went away")
        return validate(self, batch, batch_idx)

    monkeypatch.setattr(fitting.Classifier, "validation_step", fails_in_the_last_epoch)
    data = load_data(mlp_spec().data, seed=0)
    with pytest.raises(RuntimeError, match="the device went away"):
        fitting.fit(mlp_spec(), dropout_before_bn(False), data)
    # the error came through as it was, and the BN layers carry no hook of ours
    (model,) = built
    assert not any(module._forward_hooks for module in model.modules())


def test_the_prediction_after_the_first_epoch_changes_nothing_in_the_fit():
    spec = digits_spec({"template": "mlp", "widths": [32, 16]}, batch_size=128, max_epochs=3)
    data = load_data(spec.data, seed=0)
    config = resolve_space(spec).defaults()
    plain = fitting.fit(spec, config, data)
    seen = []
    watched = fitting.fit(spec, config, data, on_trained_prediction=seen.append)

    # called once, after the first epoch: each BN layer's two factors from the trial's weights
    (prediction,) = seen
    layers = {layer.name: layer for layer in prediction.layers}
    assert list(layers) == ["block0.bn", "block1.bn"]
    assert layers["block0.bn"].exact == 1.0  # before any regulariser: exactly 1
    assert 0.5 < layers["block1.bn"].exact < 1  # the defaults' dropout after block0
    for layer in layers.values():
        assert layer.method == "trained" and math.isfinite(layer.lag) and layer.lag > 0
    # and the fit is the one without it, bit for bit: its probe passes touched nothing
    assert watched.history == plain.history
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, watched.model.state_dict()[name]), name


def test_a_one_epoch_fit_predicts_nothing_after_it():
    spec = digits_spec({"template": "mlp", "widths": [32, 16]}, batch_size=128, max_epochs=1)
    seen = []
    fitting.fit(
        spec,
        resolve_space(spec).defaults(),
        load_data(spec.data, seed=0),
        on_trained_prediction=seen.append,
    )
    assert seen == []


class GlobalShuffle(pl.LightningDataModule):
    """A user DataModule whose training loader shuffles with torch's global random state."""

    input_shape, n_classes = (8,), 2

    def __init__(self) -> None:
        super().__init__()
        x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
        self.train = TensorDataset(x, (x[:, 0] > 0).long())
        self.val = TensorDataset(x[:64], (x[:64, 0] > 0).long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=32)


def test_the_first_epoch_prediction_leaves_a_global_shuffle_as_it_was():
    spec = digits_spec({"template": "mlp", "widths": [16, 16]}, batch_size=32, max_epochs=2)
    config = resolve_space(spec).defaults()
    plain = fitting.fit(spec, config, GlobalShuffle())
    watched = fitting.fit(spec, config, GlobalShuffle(), on_trained_prediction=lambda p: None)
    # drawing the probe batch iterated a shuffled loader: the fork kept the epochs' order
    assert watched.history == plain.history

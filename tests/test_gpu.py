"""The GPU path, where there is a GPU: skipped on machines without CUDA (CI has none)."""

from __future__ import annotations

import pytest
import torch

from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import ModelSpec
from autotune.nn.models import build_model
from autotune.nn.prediction import predict_shift
from autotune.nn.probe import probe_batch
from autotune.nn.shift import measure_shift, mode_accuracy, recalibrate_bn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def resnet(placement: str, regularizer: str) -> torch.nn.Module:
    torch.manual_seed(0)
    block = BlockConfig(placement, 0.3, regularizer)
    spec = ModelSpec(template="resnet", widths=[16, 32])
    return build_model(spec, TrialConfig((block, block)), (3, 16, 16), 10)


@pytest.mark.parametrize(
    ("placement", "regularizer"),
    [("in_branch", "spatial_dropout"), ("after_act", "dropout"), ("before_bn", "uout")],
)
def test_the_probe_on_the_gpu_agrees_with_the_cpu(placement: str, regularizer: str) -> None:
    net = resnet(placement, regularizer)
    x = probe_batch([torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    cpu = predict_shift(net, x, device="cpu").deltas()
    gpu = predict_shift(net, x, device="cuda").deltas()
    for name, delta in cpu.items():
        # the covariance estimate agrees to float32 rounding, Monte Carlo within its own noise
        assert gpu[name] == pytest.approx(delta, rel=0.05), name


def test_measurement_and_recalibration_run_on_the_device() -> None:
    net = resnet("before_bn", "dropout").cuda().train()
    batches = [(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))) for _ in range(8)]
    with torch.no_grad():
        for x, _ in batches:  # BN learns its statistics with dropout on
            net(x.cuda())
    before = measure_shift(net, batches)["block0.branch.bn1"].delta
    recalibrate_bn(net, batches)
    after = measure_shift(net, batches)["block0.branch.bn1"].delta
    # dropout before BN shrinks Δ; recalibration on the same data brings it back to 1
    assert before < 0.85 and after == pytest.approx(1.0, abs=0.02)
    train_acc, eval_acc = mode_accuracy(net, batches)
    # both accuracies are proportions, and the model stayed on the GPU
    assert 0 <= train_acc <= 1 and 0 <= eval_acc <= 1
    assert next(net.parameters()).is_cuda


def digits_on_the_gpu():
    """A one-epoch mlp on the digits, trained on the GPU, logging nothing."""
    from autotune.core.spec import parse_spec

    return parse_spec(
        {
            "data": {"name": "digits", "batch_size": 128},
            "model": {"template": "mlp", "widths": [32]},
            "train": {"max_epochs": 1, "accelerator": "gpu"},
            "mlflow": {"enabled": False},
        }
    )


def test_after_training_runs_on_the_gpu(monkeypatch) -> None:
    from autotune.nn import fitting
    from autotune.nn.data import load_data

    spec = digits_on_the_gpu()
    seen = []
    after = fitting.after_training
    monkeypatch.setattr(
        fitting,
        "after_training",
        lambda model, *args: seen.append(next(model.parameters()).device) or after(model, *args),
    )
    config = TrialConfig((BlockConfig("before_bn", 0.3, "dropout"),), recalibrate_bn=True)
    result = fitting.fit(spec, config, load_data(spec.data, seed=0))
    # recalibration and measurement ran where the model trained, though Lightning's teardown
    # moves a module to the CPU; the trained model comes back on the CPU
    assert seen and seen[0].type == "cuda"
    assert next(result.model.parameters()).device.type == "cpu"


def test_bf16_channels_last_and_compile_train_on_the_gpu() -> None:
    from autotune.core.spec import parse_spec
    from autotune.nn import fitting
    from autotune.nn.data import load_data

    def fit(**options):
        spec = parse_spec(
            {
                "data": {"name": "synthetic_images", "batch_size": 128},
                "model": {"template": "cnn", "widths": [16, 32]},
                "train": {"max_epochs": 2, "accelerator": "gpu", **options},
                "mlflow": {"enabled": False},
            }
        )
        config = TrialConfig((BlockConfig("after_act", 0.1, "dropout"),) * 2)
        return fitting.fit(spec, config, load_data(spec.data, seed=0))

    plain = fit()
    fast = fit(precision="bf16-mixed", channels_last=True, compile=True)
    # the same network and keys, trained to a comparable accuracy in bfloat16
    assert list(fast.model.state_dict()) == list(plain.model.state_dict())
    assert fast.value == pytest.approx(plain.value, abs=0.1)


def test_the_data_is_held_on_the_gpu_and_batches_arrive_there(monkeypatch) -> None:
    from autotune.nn import fitting
    from autotune.nn.data import load_data

    spec = digits_on_the_gpu()
    datamodule = load_data(spec.data, seed=0)
    arrived = []

    def before_transfer(self, batch, dataloader_idx):
        arrived.append(batch[0].device.type)
        return batch

    monkeypatch.setattr(fitting.Classifier, "on_before_batch_transfer", before_transfer)
    config = TrialConfig((BlockConfig("after_act", 0.3, "dropout"),))
    fitting.fit(spec, config, datamodule)
    # moved once, before the first batch: every batch was born on the GPU
    assert datamodule.device.type == "cuda"
    assert arrived and set(arrived) == {"cuda"}

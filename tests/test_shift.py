"""Measured variance shift against the closed forms; BN recalibration; train/eval accuracy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from autotune.core.theory import gaussian_dropout_noise_var, noise_variance_shift, variance_shift
from autotune.nn.moments import channel_moments
from autotune.nn.shift import (
    LayerShift,
    factor_shift,
    measure_shift,
    measured_record,
    mode_accuracy,
    recalibrate_bn,
    summarize_measured,
    train_mode_accuracy,
)

WIDTH = 64  # channels per toy BN: the channel mean of Δ averages 64 estimates


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


class MultiplicativeNoise(nn.Module):
    """x · (1 + σε), ε ~ N(0, 1), in train mode only: mean-one noise of variance σ²."""

    def __init__(self, noise_var: float) -> None:
        super().__init__()
        self.sigma = math.sqrt(noise_var)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return x * (1 + self.sigma * torch.randn_like(x))


def normal_batches(n: int, size: int, mean: float, var: float, width: int = WIDTH) -> list[Tensor]:
    """n batches of `size` rows, each entry N(mean, var)."""
    return [mean + math.sqrt(var) * torch.randn(size, width) for _ in range(n)]


def learn_running_stats(model: nn.Module, batches: list[Tensor], epochs: int = 1) -> None:
    """Forward passes in train mode, no optimizer: BN learns the statistics dropout inflates."""
    model.train()
    with torch.no_grad():
        for _ in range(epochs):
            for x in batches:
                model(x)


def dropout_bn_net(momentum: float | None = 0.1) -> nn.Sequential:
    """Linear -> Dropout(0.5) -> BN -> ReLU -> Linear -> BN: dropout right before the first BN."""
    return nn.Sequential(
        nn.Linear(10, 32),
        nn.Dropout(0.5),
        nn.BatchNorm1d(32, momentum=momentum),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16, momentum=momentum),
    )


def trained_dropout_bn_net() -> tuple[nn.Sequential, list[Tensor], list[Tensor]]:
    """The net with BN statistics learned under dropout; its training and held-out batches."""
    model = dropout_bn_net()
    train = normal_batches(32, 128, 0.5, 1.0, width=10)
    held_out = normal_batches(16, 128, 0.5, 1.0, width=10)
    learn_running_stats(model, train, epochs=2)
    return model, train, held_out


def training_flags(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def assert_buffers_identical(model: nn.Module, before: dict[str, Tensor]) -> None:
    for name, buffer in model.named_buffers():
        # bit for bit: same dtype, same values, counters included
        assert torch.equal(buffer, before[name]), (
            f"buffer {name} changed: {before[name]} -> {buffer}"
        )


@pytest.mark.parametrize(
    ("rate", "mean", "var", "momentum"),
    [
        (0.1, 0.0, 1.0, None),
        (0.3, 1.5, 0.5, None),
        (0.5, -1.0, 2.0, None),
        (0.7, 0.5, 1.0, None),
        (0.3, 1.0, 1.0, 0.1),
    ],
)
def test_dropout_before_bn_matches_closed_form(rate, mean, var, momentum):
    model = nn.Sequential(nn.Dropout(rate), nn.BatchNorm1d(WIDTH, momentum=momentum))
    learn_running_stats(model, normal_batches(40, 256, mean, var))
    shifts = measure_shift(model, normal_batches(10, 256, mean, var))
    predicted = variance_shift(rate, mean, var)

    # one entry, named as in named_modules(), with one Δ per channel
    assert list(shifts) == ["1"], f"expected the BN at '1', got {list(shifts)}"
    assert len(shifts["1"].per_channel) == WIDTH, "one Δ per channel"
    # the measured Δ within 5 % of the closed form
    measured = shifts["1"].delta
    assert abs(measured / predicted - 1) < 0.05, (
        f"{rate=}: measured Δ {measured}, theory {predicted}"
    )


@pytest.mark.parametrize(("rate", "mean"), [(0.2, 0.0), (0.5, 0.8)])
def test_gaussian_noise_before_bn_matches_closed_form(rate, mean):
    noise_var = gaussian_dropout_noise_var(rate)
    model = nn.Sequential(MultiplicativeNoise(noise_var), nn.BatchNorm1d(WIDTH, momentum=None))
    learn_running_stats(model, normal_batches(40, 256, mean, 1.0))
    measured = measure_shift(model, normal_batches(10, 256, mean, 1.0))["1"].delta
    predicted = noise_variance_shift(noise_var, mean, 1.0)

    # mean-one multiplicative noise: the measured Δ within 5 % of form 3
    assert abs(measured / predicted - 1) < 0.05, (
        f"{rate=}: measured Δ {measured}, theory {predicted}"
    )


def test_measure_shift_pools_channels_over_batch_and_space():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout2d(0.3), nn.BatchNorm2d(8))
    learn_running_stats(model, [torch.randn(16, 3, 10, 10) for _ in range(5)])
    xs = [torch.randn(n, 3, 10, 10) for n in (16, 7, 30)]  # uneven batches
    shift = measure_shift(model, [(x, torch.zeros(len(x))) for x in xs])["2"]

    # reference: the conv output's per-channel variance over (N, H, W), all batches at once
    with torch.no_grad():
        h = model[0](torch.cat(xs)).double()
    real_var = h.transpose(0, 1).reshape(8, -1).var(dim=1)
    expected = (real_var / model[2].running_var.double()).tolist()
    # tuples (x, y) are accepted and the pooled Δ matches the direct computation per channel
    assert shift.per_channel == pytest.approx(expected, rel=1e-6), "pooled Δ differs from direct"
    assert shift.real_var == pytest.approx(float(real_var.mean()), rel=1e-6), "real_var is off"
    assert shift.delta == pytest.approx(sum(expected) / 8, rel=1e-6), "delta is not the mean"


@pytest.mark.parametrize(
    ("shape", "dtype", "offset"),
    [
        ((256, 8), torch.float32, 0.0),
        ((256, 8), torch.float32, 1e4),
        ((16, 4, 5, 7), torch.float32, 0.0),
        ((16, 4, 5, 7), torch.float32, 1e4),
        # bfloat16 keeps 8 bits: an offset of 1e4 would round every value to one
        ((16, 4, 9), torch.bfloat16, 0.0),
        ((16, 4, 9), torch.bfloat16, 30.0),
    ],
)
def test_channel_moments_agree_with_float64(shape, dtype, offset):
    x = (torch.randn(shape) * 0.5 + offset).to(dtype)
    n, mean, m2 = channel_moments(x)
    # the plain way: channels first, every value in float64
    flat = x.double().transpose(0, 1).reshape(shape[1], -1)
    assert n == flat.shape[1]
    # the mean to a float32 rounding of the values' scale, the spread to one of its own size
    torch.testing.assert_close(mean, flat.mean(dim=1), rtol=0, atol=1e-7 * (0.5 + offset))
    # float32 roundings only, even with a mean 20,000 standard deviations from zero
    torch.testing.assert_close(
        m2, ((flat - flat.mean(1, keepdim=True)) ** 2).sum(1), rtol=1e-6, atol=0
    )


def test_measure_shift_leaves_model_untouched():
    model, _, held_out = trained_dropout_bn_net()
    model.train()
    model[1].eval()  # mixed flags, to see each one restored as found
    flags, before = training_flags(model), buffers(model)
    measure_shift(model, held_out)

    # modes, buffers and hooks are as before
    assert training_flags(model) == flags, "a training flag changed"
    assert_buffers_identical(model, before)
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"a forward hook is left on {name!r}"
        assert not module._forward_pre_hooks, f"a forward pre-hook is left on {name!r}"


def test_measure_shift_cleans_up_when_forward_fails():
    model, _, _ = trained_dropout_bn_net()
    flags = training_flags(model)
    with pytest.raises(RuntimeError):
        measure_shift(model, [torch.randn(4, 7)])  # wrong width: Linear raises

    # the failure still removed the hooks and restored the modes
    assert training_flags(model) == flags, "a training flag changed"
    assert all(not m._forward_hooks for m in model.modules()), "a hook survived the failure"


def test_recalibration_moves_delta_to_one():
    model, train, held_out = trained_dropout_bn_net()
    before = measure_shift(model, held_out)
    recalibrate_bn(model, train)
    after = measure_shift(model, held_out)
    on_train = measure_shift(model, train)

    # dropout 0.5 before BN: the learned running_var is far too large (Δ about 0.5 or less)
    assert before["2"].delta < 0.6, f"no shift to repair: Δ = {before['2'].delta}"
    for name in ("2", "5"):
        # every layer moves toward Δ = 1
        distance = (abs(math.log(before[name].delta)), abs(math.log(after[name].delta)))
        assert distance[1] < distance[0] / 5, f"layer {name}: |log Δ| went {distance}"
    # the first BN ends within 5 % of 1 on held-out data (sampling noise is about 1.5 %) ...
    assert abs(after["2"].delta - 1) < 0.05, f"first BN after recalibration: Δ = {after['2'].delta}"
    # ... and at 1 per channel on the data it was recalibrated on: dropout was off
    assert on_train["2"].per_channel == pytest.approx([1.0] * 32, rel=1e-5), "not exact on train"


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_recalibration_restores_modes_and_momenta(mode):
    model, train, _ = trained_dropout_bn_net()
    model[2].momentum, model[5].momentum = None, 0.03  # cumulative and custom
    model.train(mode != "eval")
    if mode == "mixed":
        model[1].eval()
        model[5].eval()
    flags = training_flags(model)
    returned = recalibrate_bn(model, train)

    # the same model comes back, with every flag and momentum as found
    assert returned is model, "recalibrate_bn should return the model it was given"
    assert training_flags(model) == flags, f"{mode}: a training flag changed"
    assert model[2].momentum is None, f"momentum None became {model[2].momentum}"
    assert model[5].momentum == 0.03, f"momentum 0.03 became {model[5].momentum}"
    assert all(not m._forward_hooks for m in model.modules()), "a hook was left behind"


def test_recalibration_is_invariant_to_batch_size():
    model, _, _ = trained_dropout_bn_net()
    x = 0.5 + torch.randn(1000, 10)
    small, large = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate_bn(small, x.split(32))  # 31 batches of 32 and one of 8
    recalibrate_bn(large, [(b, None) for b in x.split(128)])  # 7 of 128 and one of 104

    # reference: the first BN's input (Linear, dropout off) over all 1000 rows, unbiased variance
    with torch.no_grad():
        h = model[0](x).double()
    for copy_, n_batches in ((small, 32), (large, 8)):
        bn = copy_[2]
        # exact pooled statistics, whatever the batching (uneven last batch included)
        assert torch.allclose(bn.running_mean.double(), h.mean(dim=0), rtol=1e-5, atol=1e-6), (
            f"running_mean off the direct mean with {n_batches} batches"
        )
        assert torch.allclose(bn.running_var.double(), h.var(dim=0), rtol=1e-5), (
            f"running_var off the direct variance with {n_batches} batches"
        )
        # num_batches_tracked counts the batches seen
        assert int(bn.num_batches_tracked) == n_batches, "num_batches_tracked is off"
    # the second BN sees inputs normalised with batch statistics upstream: close, not exact
    gap = (small[5].running_var / large[5].running_var - 1).abs().mean()
    assert gap < 0.04, f"second BN's running_var differs by {gap:.3f} between batchings"


def test_recalibration_skips_bn_without_running_stats():
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 4)
    )
    model.append(nn.BatchNorm1d(4))
    recalibrate_bn(model, normal_batches(4, 32, 0.0, 1.0, width=6))

    # the untracked BN has no statistics to measure or refit; the tracked one is refit
    assert model[1].running_var is None, "an untracked BN grew running statistics"
    assert list(measure_shift(model, normal_batches(2, 32, 0.0, 1.0, width=6))) == ["3"]


@pytest.mark.parametrize("function", [measure_shift, recalibrate_bn, mode_accuracy])
def test_no_batches_is_an_error(function):
    # an empty iterable says what it expected instead of returning nothing
    with pytest.raises(ValueError, match="no batches"):
        function(dropout_bn_net(), [])


def test_mode_accuracy_on_a_separable_problem():
    y = torch.randint(0, 2, (512,))
    x = torch.randn(512, 2) + 2.5 * (2 * y[:, None] - 1)  # two blobs 5 std apart
    model = nn.Sequential(
        nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    model[3].train()  # mixed flags
    flags, before = training_flags(model), buffers(model)
    batches = ((x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64))  # a one-pass generator
    train_acc, eval_acc = mode_accuracy(model, batches)

    # the blobs are separable: eval mode gets nearly all; dropout costs something but not much
    assert eval_acc > 0.97, f"eval-mode accuracy {eval_acc}"
    assert 0.8 < train_acc <= 1.0, f"train-mode accuracy {train_acc}"
    # BN's statistics and counters are bit-identical and the flags are as found
    assert_buffers_identical(model, before)
    assert training_flags(model) == flags, "a training flag changed"


def test_mode_accuracy_hand_computed():
    model = nn.Linear(1, 2)  # class 1 when x > 0: nothing differs between the modes
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.bias.zero_()
    x, y = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]), torch.tensor([0, 1, 1, 1])

    # x = -1 is labelled 1 but predicted 0: 3 of 4 right in both modes
    assert mode_accuracy(model, [(x[:2], y[:2]), (x[2:], y[2:])]) == (0.75, 0.75)


def test_a_row_bn_cannot_normalise_alone_is_not_counted():
    # BatchNorm1d on (1, C) cannot normalise one row by its own statistics in train mode
    model = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model[0].bias.zero_()
    x, y = torch.tensor([[-2.0], [-1.0], [1.0], [2.0], [3.0]]), torch.tensor([0, 0, 1, 1, 1])
    batches = [(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])]
    before = buffers(model)
    # batch statistics make each pair (-1, 1) after BN: its first row is class 0, its second
    # class 1, so one of each pair is right; eval mode, on BN's initial statistics (mean 0,
    # variance 1), gets all four. The lone row counts in neither mode
    assert train_mode_accuracy(model, batches) == 0.5
    assert mode_accuracy(model, batches) == (0.5, 1.0)
    assert_buffers_identical(model, before)
    # nothing countable: not a number, not an error after a whole trial
    assert math.isnan(train_mode_accuracy(model, batches[2:]))


def test_a_lone_row_counts_where_bn_can_normalise_it():
    # BatchNorm2d has the map's values to normalise one image by. The head always says class 1:
    # a third of the rows when all three count, half if the lone row were left out
    head = nn.Linear(32, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), head)
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 0])
    assert mode_accuracy(model, [(x[:2], y[:2]), (x[2:], y[2:])]) == (1 / 3, 1 / 3)


def test_summarize_picks_the_layer_farthest_from_one():
    shifts = {
        name: LayerShift(name, delta, (delta,), delta, 1.0)
        for name, delta in (("a", 0.9), ("b", 0.5), ("c", 1.5))
    }
    summary = summarize_measured(shifts)

    # |log 0.5| = 0.69 beats |log 1.5| = 0.41; the product is 0.9 · 0.5 · 1.5
    assert summary.worst_layer == "b", f"worst layer {summary.worst_layer}"
    assert summary.worst_delta == 0.5, "worst Δ is not that layer's"
    assert summary.product == pytest.approx(0.675), "product of Δ is off"


def factored(model: nn.Module, batches: list[Tensor]) -> dict[str, LayerShift]:
    return factor_shift(model, batches, measure_shift(model, batches))


@pytest.mark.parametrize(("rate", "mean", "var"), [(0.2, 0.0, 1.0), (0.5, 1.0, 0.5)])
def test_the_dropout_factor_is_the_closed_form_whatever_bn_learned(rate, mean, var):
    # BN learned its statistics on data of another scale: Δ is far off, but the factor that
    # dropout causes is still the paper's closed form, and the lag is what is left
    model = nn.Sequential(nn.Dropout(rate), nn.BatchNorm1d(WIDTH, momentum=None))
    learn_running_stats(model, normal_batches(40, 256, mean, 3 * var))
    shift = factored(model, normal_batches(10, 256, mean, var))["1"]
    predicted = variance_shift(rate, mean, var)
    assert abs(shift.dropout / predicted - 1) < 0.03, (shift, predicted)
    assert abs(shift.delta / predicted - 1) > 0.3  # the lag is in Δ, not in its dropout factor
    assert shift.lag == pytest.approx(shift.delta / shift.dropout, rel=1e-12)


def test_the_factors_multiply_to_delta_and_a_layer_no_regulariser_reaches_has_one():
    model = nn.Sequential(
        nn.Linear(10, 32),
        nn.BatchNorm1d(32),  # "1": before the dropout
        nn.ReLU(),
        nn.Dropout(0.4),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16),  # "5": after it
    )
    learn_running_stats(model, normal_batches(8, 64, 0.0, 1.0, width=10))
    shifts = factored(model, normal_batches(4, 64, 0.0, 1.0, width=10))
    assert shifts["1"].dropout == 1.0  # exactly: the same inputs in both passes
    assert shifts["1"].lag == shifts["1"].delta
    assert shifts["5"].dropout < 0.9  # dropout before a weight layer shrinks Var_test
    for shift in shifts.values():
        assert shift.dropout * shift.lag == pytest.approx(shift.delta, rel=1e-12)


def test_factoring_leaves_the_model_and_the_random_state_as_they_were():
    model, _, held_out = trained_dropout_bn_net()
    model.train()
    flags, before = training_flags(model), buffers(model)
    rng = torch.get_rng_state()
    first = factored(model, held_out)
    assert torch.equal(torch.get_rng_state(), rng)
    assert training_flags(model) == flags
    assert_buffers_identical(model, before)
    assert factored(model, held_out) == first  # the same noise each time: repeatable


def test_a_trial_stores_delta_and_each_factor_with_its_summary():
    model, _, held_out = trained_dropout_bn_net()
    shifts = factored(model, held_out)
    record = measured_record(shifts)
    assert set(record) == {"layers", "summary", "dropout", "lag", "momentum"}
    assert record["momentum"] == {name: 0.1 for name in shifts}  # the net's BN momentum
    for name, shift in shifts.items():
        assert record["dropout"]["layers"][name] == shift.dropout
        assert record["lag"]["layers"][name] == shift.lag
    assert record["dropout"]["summary"]["product"] * record["lag"]["summary"][
        "product"
    ] == pytest.approx(record["summary"]["product"], rel=1e-12)
    # measured without its factors: the record a study stored before them
    assert set(measured_record(measure_shift(model, held_out))) == {"layers", "summary"}

"""autotune.models and autotune.regularizers: templates, block layout, and the dropout modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autotune.errors import SpecError
from autotune.models import build_model
from autotune.regularizers import make_regularizer
from autotune.space import BlockConfig, TrialConfig
from autotune.spec import ModelSpec


def config(*blocks: BlockConfig) -> TrialConfig:
    return TrialConfig(tuple(blocks))


def uniform(n: int, placement: str = "none", rate: float = 0.0, kind: str = "none") -> TrialConfig:
    """n blocks with the same regulariser slot and PyTorch's BN momentum."""
    return config(*[BlockConfig(placement, rate, kind) for _ in range(n)])


def model(template: str, widths: list[int], cfg: TrialConfig, shape=(1, 8, 8), classes=10, **kw):
    return build_model(ModelSpec(template=template, widths=widths, **kw), cfg, shape, classes)


# --- shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "shape", "widths", "classes", "fan_in"),
    [
        # 8x8 digits flatten to 64 features
        ("mlp", (1, 8, 8), [16, 8], 10, 64),
        # 13 wine features
        ("mlp", (13,), [16, 8, 4], 3, 13),
        # one channel in, 4 then 6 out
        ("cnn", (1, 8, 8), [4, 6], 10, 1),
        # three channels
        ("cnn", (3, 16, 16), [5], 4, 3),
    ],
)
def test_output_is_one_logit_per_class(template, shape, widths, classes, fan_in) -> None:
    net = model(template, widths, uniform(len(widths), "after_act", 0.2, "dropout"), shape, classes)
    out = net.eval()(torch.randn(5, *shape))
    # a batch of 5 gives 5 rows of class logits
    assert out.shape == (5, classes)
    # the first weight layer takes the input's features (mlp) or channels (cnn)
    first = net.block0[0]
    assert (first.in_features if template == "mlp" else first.in_channels) == fan_in
    # the head takes the last block's width
    assert net.head.in_features == widths[-1] and net.head.out_features == classes


def test_mlp_layer_sizes() -> None:
    net = model("mlp", [16, 8], uniform(2), (13,), 3)
    # Linear 13 -> 16 -> 8, then the 3-way head
    assert [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)] == [
        (13, 16),
        (16, 8),
        (8, 3),
    ]
    # BN follows each block's weight, so the weight has no bias; the head has one
    assert net.block0.linear.bias is None and net.block1.linear.bias is None
    assert net.head.bias is not None
    # BN sizes match the widths
    assert (net.block0.bn.num_features, net.block1.bn.num_features) == (16, 8)


def test_cnn_halves_the_map_after_every_block() -> None:
    net = model("cnn", [4, 6], uniform(2), (1, 8, 8)).eval()
    features = net.block1(net.block0(torch.randn(2, 1, 8, 8)))
    # 8x8 -> 4x4 -> 2x2, with the last block's 6 channels
    assert features.shape == (2, 6, 2, 2)
    # 3x3 convolutions without bias, padded to keep the size
    conv = net.block0.conv
    assert (conv.kernel_size, conv.padding, conv.bias) == ((3, 3), (1, 1), None)


def test_cnn_stops_pooling_at_one_pixel() -> None:
    net = model("cnn", [2, 2, 2, 2], uniform(4), (1, 4, 4)).eval()
    # 4 -> 2 -> 1: the first two blocks pool, the last two have no room to
    assert ["pool" in net.get_submodule(f"block{i}")._modules for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    # and the network still runs
    assert net(torch.randn(3, 1, 4, 4)).shape == (3, 10)


def test_cnn_without_pooling_keeps_the_map() -> None:
    net = model("cnn", [4, 6], uniform(2), (1, 8, 8), pool=False).eval()
    # no block pools
    assert all("pool" not in net.get_submodule(f"block{i}")._modules for i in range(2))
    # the map keeps its 8x8 size through the blocks
    assert net.block1(net.block0(torch.randn(2, 1, 8, 8))).shape == (2, 6, 8, 8)


def test_top_level_layout() -> None:
    # mlp: flatten, one entry per block, head
    assert [n for n, _ in model("mlp", [4, 4], uniform(2)).named_children()] == [
        "flatten",
        "block0",
        "block1",
        "head",
    ]
    # cnn: blocks, global pooling, flatten, head
    assert [n for n, _ in model("cnn", [4, 4], uniform(2)).named_children()] == [
        "block0",
        "block1",
        "pool",
        "flatten",
        "head",
    ]


@pytest.mark.parametrize(
    ("activation", "module"),
    [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU), ("tanh", nn.Tanh)],
)
def test_activation_comes_from_the_spec(activation: str, module: type) -> None:
    net = model("mlp", [4], uniform(1), activation=activation)
    # the block's act child is the named activation
    assert type(net.block0.act) is module


# --- the regulariser slot ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "order"),
    [
        ("none", ["bn", "act"]),
        ("before_bn", ["drop", "bn", "act"]),
        ("after_bn", ["bn", "drop", "act"]),
        ("after_act", ["bn", "act", "drop"]),
    ],
)
@pytest.mark.parametrize(
    ("template", "weight", "tail"), [("mlp", "linear", []), ("cnn", "conv", ["pool"])]
)
def test_block_children_follow_the_placement(placement, order, template, weight, tail) -> None:
    rate = 0.0 if placement == "none" else 0.3
    kind = "none" if placement == "none" else "dropout"
    net = model(template, [4, 4], uniform(2, placement, rate, kind))
    # weight first, the slot where the placement says, a cnn block ends in its pooling
    for i in range(2):
        assert [name for name, _ in net.get_submodule(f"block{i}").named_children()] == [
            weight,
            *order,
            *tail,
        ]


@pytest.mark.parametrize("template", ["mlp", "cnn"])
@pytest.mark.parametrize(
    "block",
    [
        BlockConfig("none", 0.3, "dropout"),
        BlockConfig("after_act", 0.0, "dropout"),
        BlockConfig("before_bn", 0.0, "spatial_dropout"),
        BlockConfig("none", 0.0, "none"),
    ],
)
def test_no_drop_child_without_placement_or_rate(template: str, block: BlockConfig) -> None:
    net = model(template, [4], config(block))
    # neither an empty slot nor an Identity: the child is not there
    assert "drop" not in dict(net.block0.named_children())
    # and no dropout module anywhere
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Identity)) for m in net.modules())


def test_each_block_gets_its_own_configuration() -> None:
    cfg = config(
        BlockConfig("before_bn", 0.2, "dropout", 0.05),
        BlockConfig("none", 0.0, "none", 0.3),
        BlockConfig("after_act", 0.45, "dropout", 0.01),
    )
    net = model("mlp", [8, 8, 8], cfg)
    # the BN momentum of each block is the config's
    assert [net.get_submodule(f"block{i}").bn.momentum for i in range(3)] == [0.05, 0.3, 0.01]
    # the drop probability of each placed block is its rate
    assert net.block0.drop.p == 0.2 and net.block2.drop.p == 0.45
    # the unplaced block has none
    assert not hasattr(net.block1, "drop")


@pytest.mark.parametrize(
    ("template", "kind", "module"),
    [
        ("mlp", "dropout", nn.Dropout),
        ("cnn", "dropout", nn.Dropout),
        ("cnn", "spatial_dropout", nn.Dropout2d),
    ],
)
def test_regularizer_kind_builds_its_module(template: str, kind: str, module: type) -> None:
    net = model(template, [4, 4], uniform(2, "after_bn", 0.35, kind))
    for i in range(2):
        drop = net.get_submodule(f"block{i}").drop
        # the exact module type, dropping the configured share
        assert type(drop) is module
        assert drop.p == 0.35


def test_spatial_dropout_drops_whole_channels_in_a_cnn_block() -> None:
    net = model("cnn", [16], uniform(1, "after_act", 0.5, "spatial_dropout"), pool=False).train()
    torch.manual_seed(0)
    maps = net.block0(torch.randn(8, 1, 8, 8))
    # each (example, channel) map is either all zero or not zeroed at all
    zeroed = (maps == 0).flatten(2).all(dim=2)
    kept = (maps != 0).flatten(2).any(dim=2)
    assert torch.equal(zeroed, ~kept)
    # some channels went and some stayed
    assert 0 < zeroed.sum() < zeroed.numel()


# --- errors --------------------------------------------------------------------------------------


def test_cnn_on_tabular_input_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as caught:
        model("cnn", [4], uniform(1), shape=(13,), classes=3)
    # names the template and the data's shape
    assert str(caught.value) == (
        "model.template: cnn needs images shaped (C, H, W); the data has shape (13,)"
    )


def test_config_must_have_one_block_per_width() -> None:
    # three blocks for two widths is refused
    with pytest.raises(ValueError, match=r"^config has 3 blocks, the model 2$"):
        model("mlp", [4, 4], uniform(3))


def test_default_widths_are_used_when_none_are_given() -> None:
    net = build_model(ModelSpec(template="cnn"), uniform(2), (1, 8, 8), 10)
    # the cnn's default 32 and 64 channels
    assert (net.block0.conv.out_channels, net.block1.conv.out_channels) == (32, 64)


# --- weights transfer between configurations -----------------------------------------------------


@pytest.mark.parametrize("template", ["mlp", "cnn"])
def test_parameter_names_do_not_depend_on_the_configuration(template: str) -> None:
    plain = model(template, [6, 4], uniform(2))
    kind = "spatial_dropout" if template == "cnn" else "dropout"
    tuned = model(
        template,
        [6, 4],
        config(
            BlockConfig("before_bn", 0.3, kind, 0.2), BlockConfig("after_act", 0.1, "dropout", 0.01)
        ),
    )
    # the same state_dict keys with the same shapes
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in tuned.state_dict().items()
    }
    # so one configuration's weights load strictly into the other
    tuned.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(tuned.block0[0].weight, plain.block0[0].weight)


# --- make_regularizer ----------------------------------------------------------------------------


def test_unknown_regularizer_is_refused() -> None:
    # the name and the known names
    with pytest.raises(
        ValueError,
        match=r"^Unknown regularizer 'gaussian'; expected one of: dropout, spatial_dropout$",
    ):
        make_regularizer("gaussian", 0.1)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rates_outside_zero_one_are_refused(rate: float) -> None:
    # a drop probability lies in [0, 1)
    with pytest.raises(ValueError, match=r"^A drop rate must lie in \[0, 1\)"):
        make_regularizer("dropout", rate)


@pytest.mark.parametrize("kind", ["dropout", "spatial_dropout"])
def test_rate_zero_is_identity(kind: str) -> None:
    # nothing to drop, nothing to build
    assert type(make_regularizer(kind, 0.0)) is nn.Identity


def test_dropout_drops_its_rate_and_keeps_the_mean() -> None:
    drop = make_regularizer("dropout", 0.3).train()
    torch.manual_seed(0)
    x = torch.rand(1_000_000) + 0.5
    y = drop(x)
    zeroed = y == 0
    # about 30 % of the elements are dropped
    assert abs(zeroed.float().mean().item() - 0.3) < 0.01
    # survivors are scaled by 1 / (1 - 0.3) (inverted dropout)
    assert torch.allclose(y[~zeroed], x[~zeroed] / 0.7)
    # so the mean is kept
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01
    # in eval mode it is the identity
    assert torch.equal(drop.eval()(x), x)


def test_spatial_dropout_is_identity_in_eval_mode() -> None:
    drop = make_regularizer("spatial_dropout", 0.4).eval()
    x = torch.randn(4, 3, 5, 5)
    # eval mode passes the maps through untouched
    assert torch.equal(drop(x), x)

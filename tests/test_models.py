"""autotune.nn.models: the mlp, cnn and resnet templates, block layout and the regulariser slot.

The dropout modules themselves are tested in test_regularizers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autotune.core.errors import SpecError
from autotune.core.space import BlockConfig, TrialConfig
from autotune.core.spec import ModelSpec
from autotune.nn.models import ResidualBlock, build_model
from autotune.nn.regularizers import DropBlock2d, GaussianDropout, StochasticDepth, Uout


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
        # residual blocks, with and without a change of width
        ("resnet", (1, 8, 8), [4, 6, 6], 10, 1),
        ("resnet", (3, 16, 16), [5], 4, 3),
    ],
)
def test_output_is_one_logit_per_class(template, shape, widths, classes, fan_in) -> None:
    net = model(template, widths, uniform(len(widths), "after_act", 0.2, "dropout"), shape, classes)
    out = net.eval()(torch.randn(5, *shape))
    # a batch of 5 gives 5 rows of class logits
    assert out.shape == (5, classes)
    # the first weight layer takes the input's features (mlp) or channels (cnn, resnet)
    first = next(m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
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
    # cnn and resnet: blocks, global pooling, flatten, head
    for template in ("cnn", "resnet"):
        assert [n for n, _ in model(template, [4, 4], uniform(2)).named_children()] == [
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
    ("template", "placement", "order"),
    [
        ("mlp", "none", ["linear", "bn", "act"]),
        ("mlp", "before_bn", ["linear", "drop", "bn", "act"]),
        ("mlp", "after_bn", ["linear", "bn", "drop", "act"]),
        ("mlp", "after_act", ["linear", "bn", "act", "drop"]),
        ("cnn", "none", ["conv", "bn", "act", "pool"]),
        ("cnn", "before_bn", ["conv", "drop", "bn", "act", "pool"]),
        ("cnn", "after_bn", ["conv", "bn", "drop", "act", "pool"]),
        # after the pooling: the dropout feeds the next convolution directly
        ("cnn", "after_act", ["conv", "bn", "act", "pool", "drop"]),
    ],
)
def test_block_children_follow_the_placement(template, placement, order) -> None:
    rate = 0.0 if placement == "none" else 0.3
    kind = "none" if placement == "none" else "dropout"
    net = model(template, [4, 4], uniform(2, placement, rate, kind))
    # weight first, the slot where the placement says, a cnn block's pooling after its act
    for i in range(2):
        assert [name for name, _ in net.get_submodule(f"block{i}").named_children()] == order


def test_cnn_after_act_without_room_to_pool_ends_in_the_dropout() -> None:
    net = model("cnn", [2, 2], uniform(2, "after_act", 0.3, "dropout"), (1, 2, 2))
    # 2 -> 1: the first block pools before its dropout, the second has no room to pool
    assert [list(net.get_submodule(f"block{i}")._modules) for i in range(2)] == [
        ["conv", "bn", "act", "pool", "drop"],
        ["conv", "bn", "act", "drop"],
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
    ("template", "kind", "module", "rate_attr"),
    [
        ("mlp", "dropout", nn.Dropout, "p"),
        ("mlp", "gaussian", GaussianDropout, "rate"),
        ("mlp", "uout", Uout, "beta"),
        ("mlp", "alpha_dropout", nn.AlphaDropout, "p"),
        ("cnn", "dropout", nn.Dropout, "p"),
        ("cnn", "spatial_dropout", nn.Dropout2d, "p"),
        ("cnn", "dropblock", DropBlock2d, "rate"),
    ],
)
def test_regularizer_kind_builds_its_module(template, kind, module, rate_attr) -> None:
    net = model(template, [4, 4], uniform(2, "after_bn", 0.35, kind))
    for i in range(2):
        drop = net.get_submodule(f"block{i}").drop
        # the exact module type, dropping the configured share
        assert type(drop) is module
        assert getattr(drop, rate_attr) == 0.35


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


@pytest.mark.parametrize("template", ["cnn", "resnet"])
def test_image_template_on_tabular_input_is_a_spec_error(template: str) -> None:
    with pytest.raises(SpecError) as caught:
        model(template, [4], uniform(1), shape=(13,), classes=3)
    # names the template and the data's shape
    assert str(caught.value) == (
        f"model.template: {template} needs images shaped (C, H, W); the data has shape (13,)"
    )


def test_config_must_have_one_block_per_width() -> None:
    # three blocks for two widths is refused
    with pytest.raises(ValueError, match=r"^config has 3 blocks, the model 2$"):
        model("mlp", [4, 4], uniform(3))


def test_default_widths_are_used_when_none_are_given() -> None:
    net = build_model(ModelSpec(template="cnn"), uniform(2), (1, 8, 8), 10)
    # the cnn's default 32 and 64 channels
    assert (net.block0.conv.out_channels, net.block1.conv.out_channels) == (32, 64)
    res = build_model(ModelSpec(template="resnet"), uniform(3), (1, 8, 8), 10)
    # the resnet's default 16, 32 and 64 channels
    assert [res.get_submodule(f"block{i}").branch.conv2.out_channels for i in range(3)] == [
        16,
        32,
        64,
    ]


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


def test_resnet_parameter_names_do_not_depend_on_the_configuration() -> None:
    placements = ["none", "before_bn", "after_bn", "after_act", "in_branch", "residual"]
    nets = []
    for placement in placements:
        kind = {"none": "none", "residual": "stochastic_depth"}.get(placement, "dropblock")
        rate = 0.0 if placement == "none" else 0.3
        nets.append(model("resnet", [4, 6], uniform(2, placement, rate, kind)))
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in nets]
    # every placement gives the same state_dict keys and shapes as the plain network
    assert all(other == shapes[0] for other in shapes[1:])
    # with the branch's layers named the same, wherever the slot sits
    assert (
        "block1.branch.conv2.weight" in shapes[0] and "block1.shortcut.bn.running_var" in shapes[0]
    )
    # so the plain network's weights load strictly into each of the others
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict(), strict=True)
        assert torch.equal(net.block1.branch.conv1.weight, nets[0].block1.branch.conv1.weight)


# --- resnet --------------------------------------------------------------------------------------

BRANCH = ["conv1", "bn1", "act1", "conv2", "bn2"]


def resnet_block(placement: str, rate: float, kind: str, shape=(4, 6, 6)) -> ResidualBlock:
    """block0 of a one-block resnet as wide as the input: a stride-1 block with no projection."""
    return model("resnet", [shape[0]], config(BlockConfig(placement, rate, kind)), shape).block0


def test_resnet_blocks_are_residual_blocks() -> None:
    net = model("resnet", [4, 8], config(BlockConfig(bn_momentum=0.05), BlockConfig()))
    for i in range(2):
        block = net.get_submodule(f"block{i}")
        # a ResidualBlock: branch, shortcut, the two slots and the activation after the sum
        assert type(block) is ResidualBlock
        assert list(block._modules) == ["branch", "shortcut", "drop_path", "act", "drop"]
        # the branch is conv1 -> bn1 -> act1 -> conv2 -> bn2
        assert list(block.branch._modules) == BRANCH
        # 3x3 convolutions without bias (BN follows), padded to keep the size
        for conv in (block.branch.conv1, block.branch.conv2):
            assert (conv.kernel_size, conv.padding, conv.bias) == ((3, 3), (1, 1), None)
    # each block's BNs use its own momentum, the shortcut's too
    assert (net.block0.branch.bn1.momentum, net.block0.branch.bn2.momentum) == (0.05, 0.05)
    assert net.block0.shortcut.bn.momentum == 0.05
    assert net.block1.branch.bn2.momentum == 0.1


@pytest.mark.parametrize(
    ("shape", "widths", "pool", "sides"),
    [
        # the first block keeps the map, every later one halves it
        ((3, 16, 16), [4, 8, 8], True, [16, 8, 4]),
        # an odd side rounds up, as a padded stride-2 convolution does
        ((1, 7, 7), [2, 2, 2], True, [7, 4, 2]),
        # no more halving at one pixel
        ((1, 2, 2), [2, 2, 2, 2], True, [2, 1, 1, 1]),
        # pool=False: every block keeps the map
        ((1, 8, 8), [4, 6], False, [8, 8]),
    ],
)
def test_resnet_stride_and_map_sizes(shape, widths, pool, sides) -> None:
    net = model("resnet", widths, uniform(len(widths)), shape, pool=pool).eval()
    x = torch.randn(2, *shape)
    for i, (width, side) in enumerate(zip(widths, sides, strict=True)):
        block = net.get_submodule(f"block{i}")
        x = block(x)
        # the block's output has its width and the expected side
        assert x.shape == (2, width, side, side)
        # only conv1 strides: 2 where the map halves, else 1; conv2 always 1
        previous = shape[1] if i == 0 else sides[i - 1]
        stride = 2 if side < previous else 1
        assert (block.branch.conv1.stride, block.branch.conv2.stride) == ((stride,) * 2, (1, 1))
    # and the whole network runs
    assert net(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize(
    ("widths", "pool", "projected"),
    [
        # 4 -> 4 at stride 1: identity; 4 -> 4 at stride 2, and 4 -> 8 at stride 2: projections
        ([4, 4, 8], True, [None, 2, 2]),
        # without pooling only the change of width needs a projection (stride 1)
        ([4, 4, 8], False, [None, None, 1]),
    ],
)
def test_resnet_shortcut_projects_only_where_the_shape_changes(widths, pool, projected) -> None:
    net = model("resnet", widths, uniform(3), (4, 8, 8), pool=pool)
    channels = [4, *widths]
    for i, stride in enumerate(projected):
        shortcut = net.get_submodule(f"block{i}").shortcut
        if stride is None:
            # same shape in and out: the input is added as it is
            assert type(shortcut) is nn.Identity
            continue
        # else a 1x1 convolution at the block's stride, then BN
        assert list(shortcut._modules) == ["conv", "bn"]
        conv = shortcut.conv
        assert (conv.in_channels, conv.out_channels) == (channels[i], channels[i + 1])
        assert (conv.kernel_size, conv.stride, conv.bias) == ((1, 1), (stride, stride), None)
        assert shortcut.bn.num_features == channels[i + 1]


def test_resnet_block_computes_act_of_branch_plus_shortcut() -> None:
    torch.manual_seed(0)
    block = resnet_block("none", 0.0, "none")
    for bn in (block.branch.bn1, block.branch.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    block.eval()
    x = torch.randn(3, 4, 6, 6)

    def bn(layer: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        scale = layer.weight / (layer.running_var + layer.eps).sqrt()
        return (t - layer.running_mean[:, None, None]) * scale[:, None, None] + layer.bias[
            :, None, None
        ]

    b = block.branch
    hidden = torch.relu(bn(b.bn1, F.conv2d(x, b.conv1.weight, padding=1)))
    expected = torch.relu(bn(b.bn2, F.conv2d(hidden, b.conv2.weight, padding=1)) + x)
    # relu(bn2(conv2(relu(bn1(conv1(x))))) + x), written out with eval-mode BN
    assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("placement", "kind", "branch", "drop_path", "drop"),
    [
        ("none", "none", BRANCH, nn.Identity, nn.Identity),
        # inside the branch: between conv1 and bn1, bn1 and act1, act1 and conv2
        ("before_bn", "dropout", ["conv1", "drop", *BRANCH[1:]], nn.Identity, nn.Identity),
        ("after_bn", "dropout", [*BRANCH[:2], "drop", *BRANCH[2:]], nn.Identity, nn.Identity),
        ("in_branch", "dropout", [*BRANCH[:3], "drop", *BRANCH[3:]], nn.Identity, nn.Identity),
        # after the activation that follows the sum
        ("after_act", "dropout", BRANCH, nn.Identity, nn.Dropout),
        # on the whole branch: stochastic depth
        ("residual", "stochastic_depth", BRANCH, StochasticDepth, nn.Identity),
    ],
)
def test_resnet_slot_follows_the_placement(placement, kind, branch, drop_path, drop) -> None:
    rate = 0.0 if placement == "none" else 0.3
    block = resnet_block(placement, rate, kind)
    # the branch's children, with the slot where the placement says
    assert list(block.branch._modules) == branch
    # the two slots outside the branch: the regulariser in at most one, nn.Identity otherwise
    assert (type(block.drop_path), type(block.drop)) == (drop_path, drop)
    # the module that is there drops the configured share
    placed = [m for m in block.modules() if isinstance(m, (nn.Dropout, StochasticDepth))]
    assert [getattr(m, "p", getattr(m, "rate", None)) for m in placed] == (
        [] if placement == "none" else [0.3]
    )


@pytest.mark.parametrize("placement", ["before_bn", "in_branch", "after_act", "residual"])
def test_resnet_slot_is_empty_at_rate_zero(placement: str) -> None:
    kind = "stochastic_depth" if placement == "residual" else "dropout"
    block = resnet_block(placement, 0.0, kind)
    # no drop child in the branch, and both outer slots are the identity
    assert list(block.branch._modules) == BRANCH
    assert (type(block.drop_path), type(block.drop)) == (nn.Identity, nn.Identity)


def test_resnet_after_act_drops_the_block_output() -> None:
    block = resnet_block("after_act", 0.5, "dropout").train()
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = block(x)
    summed = torch.relu(block.branch(x) + x)  # train-mode BN: the same batch, the same output
    zeroed = out == 0
    # every survivor is the activated sum, scaled by 1 / (1 - 0.5)
    assert torch.allclose(out[~zeroed], 2 * summed[~zeroed], atol=1e-6)
    # and about half of the positive outputs were dropped (a binomial sd of about 0.02)
    dropped = zeroed[summed > 0].float().mean().item()
    assert abs(dropped - 0.5) < 0.05, f"dropped {dropped:.3f}"


def test_resnet_stochastic_depth_drops_whole_branches_in_training() -> None:
    rate, n = 0.5, 256
    block = resnet_block("residual", rate, "stochastic_depth").train()
    x = torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = block(x)
    branch = block.branch(x)  # train-mode BN: the same batch gives the same branch output
    skipped = torch.isclose(out, torch.relu(x), atol=1e-6).flatten(1).all(dim=1)
    kept = torch.isclose(out, torch.relu(branch / (1 - rate) + x), atol=1e-6).flatten(1).all(1)
    # each example either skips the whole branch (relu of the shortcut alone) or keeps all of it
    # scaled by 1 / (1 - rate): never partly
    assert torch.equal(skipped, ~kept)
    # about `rate` of the examples skip it (a binomial sd of about 0.03)
    share = skipped.float().mean().item()
    assert abs(share - rate) < 0.1, f"skipped {share:.3f}"


def test_resnet_stochastic_depth_is_the_identity_in_eval() -> None:
    block = resnet_block("residual", 0.5, "stochastic_depth").eval()
    x = torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = block(x)
    # the whole branch is added back, unscaled, for every example
    assert torch.allclose(out, torch.relu(block.branch(x) + x), atol=1e-6)
    # and the same input gives the same output again
    assert torch.equal(block(x), out)

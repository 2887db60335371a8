"""autotune.core.space and autotune.core.space_files: search-space files, overrides, sampling
through Optuna, and TrialConfig."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autotune.core import space
from autotune.core.errors import SpecError
from autotune.core.space import BlockConfig, Choice, Fixed, Range, TrialConfig
from autotune.core.space_files import find_space_file, list_spaces, load_space
from autotune.nn import regularizers

ROOT = Path(__file__).resolve().parents[1]
# the placements of mlp and cnn blocks, and every placement there is (dropout_bn.yaml lists all)
PLACEMENTS = ("none", "before_bn", "after_bn", "after_act")
ALL_PLACEMENTS = (*PLACEMENTS, "in_branch", "residual")
# the regularizers an mlp block can use, and those a cnn or resnet block can
DENSE = ("dropout", "gaussian", "uout", "alpha_dropout")
SPATIAL = ("dropout", "spatial_dropout", "gaussian", "uout", "alpha_dropout", "dropblock")

# dropout_bn.yaml, resolved for one block of each template
PLACEMENT = Choice(PLACEMENTS, "after_act")
RATE = Range(0.05, 0.5, 0.1)
MOMENTUM = Range(0.01, 0.5, 0.1, log=True)
MLP_BLOCK = {
    "placement": PLACEMENT,
    "rate": RATE,
    "regularizer": Choice(DENSE, "dropout"),
    "bn_momentum": MOMENTUM,
}
CNN_BLOCK = {**MLP_BLOCK, "regularizer": Choice(SPATIAL, "dropout")}
# a resnet block also has room for in_branch and residual
RESNET_BLOCK = {**CNN_BLOCK, "placement": Choice(ALL_PLACEMENTS, "after_act")}
NETWORK = {"recalibrate_bn": Choice((False, True), False)}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def resolve(params=None, blocks=None, *, n_blocks: int = 2, template: str = "mlp"):
    """dropout_bn with the given overrides."""
    return load_space(
        "dropout_bn", params=params, blocks=blocks, n_blocks=n_blocks, template=template
    )


def ask(n: int, seed: int = 0) -> list[optuna.Trial]:
    """n trials of an in-memory study with a seeded random sampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask() for _ in range(n)]


# --- resolving the shipped space -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "block"), [("mlp", MLP_BLOCK), ("cnn", CNN_BLOCK), ("resnet", RESNET_BLOCK)]
)
def test_dropout_bn_resolves_one_copy_per_block(template: str, block: dict) -> None:
    resolved = resolve(n_blocks=3, template=template)
    # named after the file, with its description
    assert resolved.name == "dropout_bn"
    assert resolved.description == "dropout placement, rate, kind and BN momentum, per block"
    # one mapping per block, each the file's entries
    assert resolved.blocks == (block, block, block)
    # and one recalibrate_bn choice for the whole network, off by default
    assert resolved.network == NETWORK


def test_channel_regularizers_are_left_out_for_mlp_and_kept_for_cnn() -> None:
    # an mlp block has no channels or squares: spatial_dropout and dropblock are left out
    assert resolve(template="mlp").blocks[0]["regularizer"] == Choice(DENSE, "dropout")
    # cnn and resnet blocks search all six
    for template in ("cnn", "resnet"):
        assert resolve(template=template).blocks[0]["regularizer"] == Choice(SPATIAL, "dropout")


def test_a_single_dense_regularizer_left_for_an_mlp_is_fixed() -> None:
    # of dropout and spatial_dropout only dropout fits an mlp block, so nothing is searched
    assert resolve({"regularizer": ["spatial_dropout", "dropout"]}).blocks[0][
        "regularizer"
    ] == Fixed("dropout")


def test_fixing_spatial_dropout_on_a_cnn() -> None:
    # a cnn block can be fixed to spatial dropout
    assert resolve({"regularizer": "spatial_dropout"}, template="cnn").blocks[1][
        "regularizer"
    ] == Fixed("spatial_dropout")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # a fixed value that the block cannot use
        (
            "spatial_dropout",
            "search_space.params.regularizer: spatial_dropout does not apply to mlp blocks",
        ),
        # choices of which none is left
        (
            ["spatial_dropout"],
            "search_space.params.regularizer.choices: none of ['spatial_dropout'] applies to mlp "
            "blocks",
        ),
    ],
)
def test_spatial_dropout_on_an_mlp_is_an_error(override, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        resolve({"regularizer": override}, template="mlp")
    # the field and why
    assert str(caught.value) == message


@pytest.mark.parametrize("template", ["mlp", "cnn"])
def test_residual_placements_are_left_out_for_mlp_and_cnn(template: str) -> None:
    resolved = resolve({"placement": list(ALL_PLACEMENTS)}, template=template)
    # in_branch and residual need a residual block: the other four remain, after_act the default
    assert resolved.blocks[0]["placement"] == Choice(PLACEMENTS, "after_act")


def test_resnet_keeps_every_placement() -> None:
    resolved = resolve({"placement": list(ALL_PLACEMENTS)}, template="resnet")
    # all six placements are searched in a residual block
    assert resolved.blocks[0]["placement"] == Choice(ALL_PLACEMENTS, "after_act")


def test_a_residual_default_left_out_falls_back_to_the_first_choice() -> None:
    override = {"choices": ["before_bn", "residual"], "default": "residual"}
    # residual is valid but left out for a cnn: the first remaining choice is the default
    assert resolve({"placement": override}, template="cnn").blocks[0]["placement"] == Fixed(
        "before_bn"
    )
    # a resnet keeps the default
    assert resolve({"placement": override}, template="resnet").blocks[0]["placement"] == Choice(
        ("before_bn", "residual"), "residual"
    )


@pytest.mark.parametrize(
    ("template", "params", "blocks", "message"),
    [
        # a fixed residual placement outside a resnet, for all blocks and for one
        (
            "mlp",
            {"placement": "residual"},
            None,
            "search_space.params.placement: residual does not apply to mlp blocks",
        ),
        (
            "cnn",
            None,
            {1: {"placement": "in_branch"}},
            "search_space.blocks.1.placement: in_branch does not apply to cnn blocks",
        ),
        # choices of which none is left
        (
            "mlp",
            {"placement": ["in_branch", "residual"]},
            None,
            "search_space.params.placement.choices: none of ['in_branch', 'residual'] applies "
            "to mlp blocks",
        ),
        # dropblock needs maps, like spatial_dropout
        (
            "mlp",
            {"regularizer": "dropblock"},
            None,
            "search_space.params.regularizer: dropblock does not apply to mlp blocks",
        ),
    ],
)
def test_what_a_template_cannot_use_is_an_error(template, params, blocks, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        resolve(params, blocks, template=template)
    # the field, the value and the template
    assert str(caught.value) == message


@pytest.mark.parametrize("template", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize(
    ("params", "blocks", "message"),
    [
        (
            {"regularizer": "stochastic_depth"},
            None,
            "search_space.params.regularizer: stochastic_depth drops a whole residual branch; "
            "choose it with placement: residual (resnet template)",
        ),
        (
            {"regularizer": ["dropout", "stochastic_depth"]},
            None,
            "search_space.params.regularizer.choices: stochastic_depth drops a whole residual "
            "branch; choose it with placement: residual (resnet template)",
        ),
        (
            None,
            {0: {"regularizer": "stochastic_depth"}},
            "search_space.blocks.0.regularizer: stochastic_depth drops a whole residual branch; "
            "choose it with placement: residual (resnet template)",
        ),
    ],
)
def test_stochastic_depth_is_not_a_regularizer_choice(template, params, blocks, message) -> None:
    with pytest.raises(SpecError) as caught:
        resolve(params, blocks, template=template)
    # even for a resnet: the message points to placement: residual
    assert str(caught.value) == message


def test_has_numeric() -> None:
    # rate and bn_momentum are ranges in the file
    assert resolve().has_numeric() is True
    # fixing both leaves only categorical parameters
    assert resolve({"rate": 0.1, "bn_momentum": 0.1}).has_numeric() is False


# --- overrides -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "name", "expected"),
    [
        # a mapping changes the range and keeps what it does not mention
        ({"rate": {"high": 0.3}}, "rate", Range(0.05, 0.3, 0.1)),
        ({"rate": {"step": 0.05}}, "rate", Range(0.05, 0.5, 0.1, step=0.05)),
        ({"bn_momentum": {"log": False}}, "bn_momentum", Range(0.01, 0.5, 0.1)),
        ({"rate": {"high": 0.3, "default": 0.2}}, "rate", Range(0.05, 0.3, 0.2)),
        # both bounds at once, with a default inside them
        ({"rate": {"low": 0.1, "high": 0.3, "default": 0.1}}, "rate", Range(0.1, 0.3, 0.1)),
        # a list replaces the choices; the default stays while it is one, else the first choice
        (
            {"placement": ["none", "after_act"]},
            "placement",
            Choice(("none", "after_act"), "after_act"),
        ),
        (
            {"placement": ["after_bn", "before_bn"]},
            "placement",
            Choice(("after_bn", "before_bn"), "after_bn"),
        ),
        # a list of rates is a categorical rate
        ({"rate": [0.3, 0.1]}, "rate", Choice((0.3, 0.1), 0.1)),
        # a mapping with choices replaces them and keeps the file's default when still a choice
        (
            {"placement": {"choices": ["none", "after_act"]}},
            "placement",
            Choice(("none", "after_act"), "after_act"),
        ),
        # a scalar fixes the value
        ({"rate": 0.2}, "rate", Fixed(0.2)),
        ({"placement": "after_bn"}, "placement", Fixed("after_bn")),
        ({"bn_momentum": 0.05}, "bn_momentum", Fixed(0.05)),
        # a single-choice list is a fixed value
        ({"placement": ["before_bn"]}, "placement", Fixed("before_bn")),
        # a range with low == high is a fixed value
        ({"rate": {"low": 0.25, "high": 0.25}}, "rate", Fixed(0.25)),
    ],
)
def test_global_override_applies_to_every_block(params: dict, name: str, expected) -> None:
    resolved = resolve(params, n_blocks=3)
    # every block gets the overridden entry
    assert [block[name] for block in resolved.blocks] == [expected] * 3
    # the other entries are the file's
    assert all(
        block[other] == MLP_BLOCK[other]
        for block in resolved.blocks
        for other in block
        if other != name
    )


def test_range_default_is_the_middle_when_none_is_given(tmp_path: Path) -> None:
    path = tmp_path / "ranges.yaml"
    path.write_text(
        "params:\n"
        "  placement: {choices: [none, after_act]}\n"
        "  rate: {low: 0.1, high: 0.3}\n"
        "  regularizer: dropout\n"
        "  bn_momentum: {low: 0.01, high: 0.64, log: true}\n"
    )
    block = load_space(str(path), n_blocks=1, template="mlp").blocks[0]
    # arithmetic middle of a linear range
    assert block["rate"] == Range(0.1, 0.3, pytest.approx(0.2))
    # geometric middle of a log range: sqrt(0.01 * 0.64) = 0.08
    assert block["bn_momentum"] == Range(0.01, 0.64, pytest.approx(0.08), log=True)
    # no default among the choices: the first one
    assert block["placement"] == Choice(("none", "after_act"), "none")


def test_per_block_override_beats_the_global_one() -> None:
    resolved = resolve(
        {"rate": {"high": 0.3}, "placement": ["none", "after_act"]},
        {1: {"rate": 0.25, "placement": "before_bn"}},
    )
    block0, block1 = resolved.blocks
    # block 0 has the global overrides
    assert block0["rate"] == Range(0.05, 0.3, 0.1)
    assert block0["placement"] == Choice(("none", "after_act"), "after_act")
    # block 1 has its own
    assert block1["rate"] == Fixed(0.25)
    assert block1["placement"] == Fixed("before_bn")
    # what neither touches is the file's
    assert block1["bn_momentum"] == block0["bn_momentum"] == MOMENTUM


def test_per_block_mapping_merges_into_the_global_override() -> None:
    block0, block1 = resolve({"rate": {"high": 0.3}}, {0: {"rate": {"low": 0.1}}}).blocks
    # the block's low on top of the global high on top of the file's default
    assert block0["rate"] == Range(0.1, 0.3, 0.1)
    # the other block only has the global high
    assert block1["rate"] == Range(0.05, 0.3, 0.1)


def test_mapping_with_a_value_fixes_the_parameter() -> None:
    # {value: 0.2} is the documented fixed-entry form, so it fixes the rate like `rate: 0.2`
    assert resolve({"rate": {"value": 0.2}}).blocks[0]["rate"] == Fixed(0.2)
    # per block too, on top of a global range
    block0, block1 = resolve({"rate": {"high": 0.3}}, {1: {"rate": {"value": 0.05}}}).blocks
    assert (block0["rate"], block1["rate"]) == (Range(0.05, 0.3, 0.1), Fixed(0.05))


def test_mapping_with_a_default_keeps_the_choices() -> None:
    # {default: after_bn} is merged into the entry: the choices stay, the default changes
    assert resolve({"placement": {"default": "after_bn"}}).blocks[0]["placement"] == Choice(
        PLACEMENTS, "after_bn"
    )


def test_narrowing_a_range_past_the_inherited_default() -> None:
    # the file's default 0.1 lies outside [0.2, 0.4], so the middle of the new range is used
    assert resolve({"rate": {"low": 0.2, "high": 0.4}}).blocks[0]["rate"] == Range(
        0.2, 0.4, pytest.approx(0.3)
    )
    # on a log scale the middle is geometric: sqrt(0.2 * 0.8) = 0.4
    assert resolve({"bn_momentum": {"low": 0.2, "high": 0.8}}).blocks[0]["bn_momentum"] == Range(
        0.2, 0.8, pytest.approx(0.4), log=True
    )
    # an inherited default that still fits is kept
    assert resolve({"rate": {"low": 0.08}}).blocks[0]["rate"] == Range(0.08, 0.5, 0.1)


def test_narrowing_choices_past_the_inherited_default() -> None:
    # after_act is not among the new choices, so the first one is the default
    assert resolve({"placement": {"choices": ["none", "before_bn"]}}).blocks[0][
        "placement"
    ] == Choice(("none", "before_bn"), "none")


# --- recalibrate_bn: one choice for the whole network ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # a scalar fixes it
        (True, Fixed(True)),
        (False, Fixed(False)),
        # a single-choice list is a fixed value
        ([True], Fixed(True)),
        # a list replaces the choices; the file's default false is kept while it is a choice
        ([True, False], Choice((True, False), False)),
        # a mapping with a default keeps the choices
        ({"default": True}, Choice((False, True), True)),
        ({"value": True}, Fixed(True)),
    ],
)
def test_recalibrate_bn_override(override, expected) -> None:
    resolved = resolve({"recalibrate_bn": override}, n_blocks=3)
    # the network's entry is the overridden one
    assert resolved.network == {"recalibrate_bn": expected}
    # it is not a block parameter
    assert all("recalibrate_bn" not in block for block in resolved.blocks)
    # and the blocks keep the file's entries
    assert resolved.blocks == (MLP_BLOCK,) * 3


def test_recalibrate_bn_is_off_when_a_file_does_not_mention_it(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(
        "params: {placement: after_bn, rate: 0.2, regularizer: dropout, bn_momentum: 0.1}\n"
    )
    resolved = load_space(str(path), n_blocks=1, template="mlp")
    # absent means off, and nothing to search
    assert resolved.network == {"recalibrate_bn": Fixed(False)}
    # a spec can still turn it on
    on = load_space(str(path), params={"recalibrate_bn": True}, n_blocks=1, template="mlp")
    assert on.network == {"recalibrate_bn": Fixed(True)}


@pytest.mark.parametrize(
    ("params", "blocks", "message"),
    [
        # per block: the whole network shares one BN recalibration
        (
            None,
            {1: {"recalibrate_bn": True}},
            "search_space.blocks.1.recalibrate_bn: set for the whole network "
            "(search_space.params), not per block",
        ),
        # not a bool: fixed, among choices, as a default
        (
            {"recalibrate_bn": "yes"},
            None,
            "search_space.params.recalibrate_bn: expected true or false, got 'yes'",
        ),
        (
            {"recalibrate_bn": 1},
            None,
            "search_space.params.recalibrate_bn: expected true or false, got 1",
        ),
        (
            {"recalibrate_bn": [False, 1]},
            None,
            "search_space.params.recalibrate_bn.choices: expected true or false, got 1",
        ),
        (
            {"recalibrate_bn": {"default": "on"}},
            None,
            "search_space.params.recalibrate_bn.default: 'on' is not one of [False, True]",
        ),
        # not a range
        (
            {"recalibrate_bn": {"low": 0, "high": 1}},
            None,
            "search_space.params.recalibrate_bn: recalibrate_bn takes choices or a value, "
            "not a range",
        ),
    ],
)
def test_invalid_recalibrate_bn_names_the_field(params, blocks, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        resolve(params, blocks)
    # the exact message, naming where it was set
    assert str(caught.value) == message


# --- errors name the field -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "blocks", "message"),
    [
        # unknown parameters, for all blocks and for one
        # (the whole network's recalibrate_bn is a parameter for all blocks, not for one)
        (
            {"dropout_rate": 0.1},
            None,
            "search_space.params.dropout_rate: unknown parameter; "
            "expected one of: placement, rate, regularizer, bn_momentum, recalibrate_bn",
        ),
        (
            None,
            {1: {"momentum": 0.1}},
            "search_space.blocks.1.momentum: unknown parameter; "
            "expected one of: placement, rate, regularizer, bn_momentum",
        ),
        # unknown placement: fixed, among choices, per block
        (
            {"placement": "middle"},
            None,
            "search_space.params.placement: unknown placement 'middle'; "
            "expected one of: none, before_bn, after_bn, after_act, in_branch, residual",
        ),
        (
            {"placement": ["none", "middle"]},
            None,
            "search_space.params.placement.choices: unknown placement 'middle'; "
            "expected one of: none, before_bn, after_bn, after_act, in_branch, residual",
        ),
        (
            None,
            {0: {"placement": "middle"}},
            "search_space.blocks.0.placement: unknown placement 'middle'; "
            "expected one of: none, before_bn, after_bn, after_act, in_branch, residual",
        ),
        # unknown regularizer: the choosable names, without stochastic_depth
        (
            {"regularizer": "drpout"},
            None,
            "search_space.params.regularizer: unknown regularizer 'drpout'; "
            "expected one of: dropout, spatial_dropout, gaussian, uout, alpha_dropout, dropblock",
        ),
        (
            {"regularizer": ["dropout", "gausian"]},
            None,
            "search_space.params.regularizer.choices: unknown regularizer 'gausian'; "
            "expected one of: dropout, spatial_dropout, gaussian, uout, alpha_dropout, dropblock",
        ),
        # a drop rate of 1 or more
        ({"rate": 1.0}, None, "search_space.params.rate: a drop rate must lie in [0, 1), got 1.0"),
        ({"rate": 1}, None, "search_space.params.rate: a drop rate must lie in [0, 1), got 1"),
        (
            {"rate": {"high": 1.0}},
            None,
            "search_space.params.rate.high: a drop rate must lie in [0, 1), got 1.0",
        ),
        (
            {"rate": [0.1, 1.5]},
            None,
            "search_space.params.rate.choices: a drop rate must lie in [0, 1), got 1.5",
        ),
        (
            None,
            {1: {"rate": 1.5}},
            "search_space.blocks.1.rate: a drop rate must lie in [0, 1), got 1.5",
        ),
        (
            {"rate": "high"},
            None,
            "search_space.params.rate: expected a number, got 'high'",
        ),
        # a BN momentum of 0 or less
        (
            {"bn_momentum": 0},
            None,
            "search_space.params.bn_momentum: BN momentum must lie in (0, 1], got 0",
        ),
        (
            {"bn_momentum": {"low": -0.1}},
            None,
            "search_space.params.bn_momentum.low: BN momentum must lie in (0, 1], got -0.1",
        ),
        (
            None,
            {0: {"bn_momentum": 0.0}},
            "search_space.blocks.0.bn_momentum: BN momentum must lie in (0, 1], got 0.0",
        ),
        # a range upside down
        (
            {"rate": {"low": 0.4, "high": 0.2}},
            None,
            "search_space.params.rate: low must not exceed high, got low=0.4 high=0.2",
        ),
        (
            None,
            {1: {"bn_momentum": {"low": 0.3, "high": 0.2}}},
            "search_space.blocks.1.bn_momentum: low must not exceed high, got low=0.3 high=0.2",
        ),
        # a log range that starts at 0
        (
            {"rate": {"low": 0.0, "log": True}},
            None,
            "search_space.params.rate.low: a log range needs low > 0, got 0.0",
        ),
        (
            {"bn_momentum": {"step": 0.01}},
            None,
            "search_space.params.bn_momentum.step: a log range cannot have a step",
        ),
        (
            {"rate": {"step": -0.1}},
            None,
            "search_space.params.rate.step: expected a positive number, got -0.1",
        ),
        (
            {"rate": {"high": 0.3, "default": 0.4}},
            None,
            "search_space.params.rate.default: 0.4 is outside [0.05, 0.3]",
        ),
        # keys an entry does not have, and ranges for a categorical parameter
        (
            {"rate": {"hi": 0.3}},
            None,
            "search_space.params.rate.hi: unknown key; "
            "expected one of: default, high, log, low, step",
        ),
        (
            {"placement": {"low": 0, "high": 1}},
            None,
            "search_space.params.placement: placement takes choices or a value, not a range",
        ),
        (
            {"placement": []},
            None,
            "search_space.params.placement.choices: expected a non-empty list, got []",
        ),
        # a block the model does not have
        (None, {2: {"rate": 0.1}}, "search_space.blocks.2: the model has 2 blocks (0..1)"),
        (None, {-1: {"rate": 0.1}}, "search_space.blocks.-1: the model has 2 blocks (0..1)"),
    ],
)
def test_invalid_override_names_the_field(params, blocks, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        resolve(params, blocks)
    # the exact message, naming search_space.params.<name> or search_space.blocks.<i>.<name>
    assert str(caught.value) == message
    # one line
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        # Optuna fails on a NaN step in the first trial (decimal.InvalidOperation)
        (
            {"low": 0.1, "high": 0.4, "step": float("nan")},
            "search_space.params.rate.step: expected a positive number, got nan",
        ),
        (
            {"low": 0.1, "high": 0.4, "step": float("inf")},
            "search_space.params.rate.step: expected a positive number, got inf",
        ),
        # a bool is no step, nor a bound
        (
            {"low": 0.1, "high": 0.4, "step": True},
            "search_space.params.rate.step: expected a positive number, got True",
        ),
        ({"low": False, "high": 0.4}, "search_space.params.rate.low: expected a number, got False"),
        # 'no' is text, which bool() took for true: a log range
        (
            {"low": 0.1, "high": 0.4, "log": "no"},
            "search_space.params.rate.log: expected true or false, got 'no'",
        ),
        # a bound float() cannot convert is out of range, not an OverflowError
        (
            {"low": 0.1, "high": 10**400},
            "search_space.params.rate.high: a drop rate must lie in [0, 1), got 1000000000000"
            "000000000000000000000000000000000000000000000000000000000000000000…",
        ),
        (
            {"low": 0.1, "high": 0.4, "default": float("nan")},
            "search_space.params.rate.default: nan is outside [0.1, 0.4]",
        ),
    ],
)
def test_a_range_run_cannot_sample_is_refused(rate: dict, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        resolve({"rate": rate})
    # the field and the value, one line
    assert str(caught.value) == message


def test_space_file_without_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text(
        "params:\n  placement: [none, after_act]\n  rate: 0.1\n  regularizer: dropout\n"
    )
    with pytest.raises(SpecError) as caught:
        load_space(str(path), n_blocks=1, template="mlp")
    # the file and the parameter it lacks
    assert str(caught.value) == f"{path}: params.bn_momentum: missing"


# --- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["mlp", "cnn"])
def test_sampled_values_lie_in_their_ranges(template: str) -> None:
    resolved = resolve(n_blocks=2, template=template)
    placements, regularizers_seen, recalibrations = set(), set(), set()
    for trial in ask(40):
        config = resolved.sample(trial)
        # one BlockConfig per block
        assert len(config.blocks) == 2
        for block in config.blocks:
            placements.add(block.placement)
            # BN momentum is always searched, within [0.01, 0.5]
            assert 0.01 <= block.bn_momentum <= 0.5
            if block.placement == "none":
                # an unplaced block has no rate and no regularizer
                assert (block.rate, block.regularizer) == (0.0, "none")
            else:
                # a placed block drops between 5 % and 50 %
                assert 0.05 <= block.rate <= 0.5
                regularizers_seen.add(block.regularizer)
        # recalibrate_bn is drawn once for the network, as a bool
        assert type(config.recalibrate_bn) is bool
        recalibrations.add(config.recalibrate_bn)
        # what the trial recorded is what the config holds
        assert {k: config.to_params()[k] for k in trial.params} == trial.params
    # 80 draws reach every placement, so both branches were checked
    assert placements == set(PLACEMENTS)
    # an mlp gets the four element-wise kinds; a cnn gets the channel and square ones too
    assert regularizers_seen == set(DENSE if template == "mlp" else SPATIAL)
    # 40 trials recalibrate and not
    assert recalibrations == {False, True}


@pytest.mark.parametrize("template", ["mlp", "cnn"])
def test_unplaced_blocks_suggest_no_rate_or_regularizer(template: str) -> None:
    resolved = resolve(n_blocks=2, template=template)
    for trial in ask(30, seed=1):
        config = resolved.sample(trial)
        for i, block in enumerate(config.blocks):
            keys = {key for key in trial.params if key.startswith(f"block{i}.")}
            expected = {f"block{i}.placement", f"block{i}.bn_momentum"}
            if block.placement != "none":
                expected |= {f"block{i}.rate", f"block{i}.regularizer"}
            # an unplaced block asks only for placement and momentum, a placed one the rate
            # and the kind too
            assert keys == expected
        # the network's parameter is asked for once, without a block prefix
        assert "recalibrate_bn" in trial.params


def test_fixed_parameters_never_reach_the_trial() -> None:
    resolved = resolve(
        {"placement": ["after_bn"], "rate": 0.2},
        {1: {"bn_momentum": 0.3}},
        template="cnn",
    )
    trial = ask(1)[0]
    config = resolved.sample(trial)
    # only what is still searched: block 0's momentum, each block's kind, and recalibrate_bn
    assert set(trial.params) == {
        "block0.bn_momentum",
        "block0.regularizer",
        "block1.regularizer",
        "recalibrate_bn",
    }
    # the fixed values are in the config all the same
    assert [(b.placement, b.rate) for b in config.blocks] == [("after_bn", 0.2)] * 2
    assert config.blocks[1].bn_momentum == 0.3


def test_a_fully_fixed_space_asks_nothing() -> None:
    resolved = resolve(
        {
            "placement": "after_act",
            "rate": 0.3,
            "regularizer": "uout",
            "bn_momentum": 0.05,
            "recalibrate_bn": True,
        }
    )
    trial = ask(1)[0]
    # nothing is searched, so the trial has no parameters
    assert resolved.sample(trial) == TrialConfig(
        (BlockConfig("after_act", 0.3, "uout", 0.05),) * 2, recalibrate_bn=True
    )
    assert trial.params == {}


def test_residual_placement_samples_stochastic_depth_without_a_regularizer_param() -> None:
    resolved = resolve({"placement": list(ALL_PLACEMENTS)}, n_blocks=3, template="resnet")
    placements = set()
    for trial in ask(40, seed=2):
        config = resolved.sample(trial)
        for i, block in enumerate(config.blocks):
            placements.add(block.placement)
            asked = f"block{i}.regularizer" in trial.params
            if block.placement == "residual":
                # the placement names the regulariser: stochastic depth, and Optuna is not asked
                assert block.regularizer == "stochastic_depth" and not asked
                # the drop rate is still searched
                assert 0.05 <= trial.params[f"block{i}.rate"] <= 0.5
            elif block.placement != "none":
                # any other placement draws one of the six spatial kinds
                assert block.regularizer in SPATIAL and asked
    # 120 draws reach every placement, in_branch and residual included
    assert placements == set(ALL_PLACEMENTS)


def test_fixed_residual_placement_asks_only_rate_and_momentum() -> None:
    resolved = resolve({"placement": "residual", "recalibrate_bn": False}, template="resnet")
    trial = ask(1)[0]
    config = resolved.sample(trial)
    # no placement, no regularizer, no recalibrate_bn: all fixed or implied
    assert set(trial.params) == {
        "block0.rate",
        "block0.bn_momentum",
        "block1.rate",
        "block1.bn_momentum",
    }
    # every block drops its residual branch at the sampled rate
    assert config.blocks == tuple(
        BlockConfig(
            "residual",
            trial.params[f"block{i}.rate"],
            "stochastic_depth",
            trial.params[f"block{i}.bn_momentum"],
        )
        for i in range(2)
    )


@pytest.mark.parametrize("value", [False, True])
def test_fixed_recalibrate_bn_is_not_asked(value: bool) -> None:
    trial = ask(1)[0]
    config = resolve({"recalibrate_bn": value}).sample(trial)
    # the config carries the fixed value
    assert config.recalibrate_bn is value
    # and Optuna never saw the parameter
    assert "recalibrate_bn" not in trial.params


def test_step_ranges_sample_on_the_grid() -> None:
    resolved = resolve({"placement": "after_act", "rate": {"low": 0.1, "high": 0.4, "step": 0.1}})
    rates = {resolved.sample(trial).blocks[0].rate for trial in ask(30)}
    # every rate is one of 0.1, 0.2, 0.3, 0.4
    assert {round(rate, 6) for rate in rates} <= {0.1, 0.2, 0.3, 0.4}
    assert len(rates) > 1


# --- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["mlp", "cnn", "resnet"])
def test_defaults_are_the_files_defaults(template: str) -> None:
    # after_act, drop 10 %, element-wise dropout, PyTorch's momentum, in every block; no
    # recalibration
    assert resolve(n_blocks=3, template=template).defaults() == TrialConfig(
        (BlockConfig("after_act", 0.1, "dropout", 0.1),) * 3, recalibrate_bn=False
    )


def test_defaults_of_a_resnet_space() -> None:
    config = resolve(
        {
            "placement": {"choices": list(ALL_PLACEMENTS), "default": "residual"},
            "recalibrate_bn": {"default": True},
        },
        {1: {"placement": {"default": "in_branch"}, "regularizer": {"default": "dropblock"}}},
        n_blocks=3,
        template="resnet",
    ).defaults()
    # a residual default implies stochastic depth at the default rate
    assert (
        config.blocks[0]
        == config.blocks[2]
        == BlockConfig("residual", 0.1, "stochastic_depth", 0.1)
    )
    # block 1's own default placement and kind
    assert config.blocks[1] == BlockConfig("in_branch", 0.1, "dropblock", 0.1)
    # the network's default
    assert config.recalibrate_bn is True


def test_defaults_follow_overrides() -> None:
    config = resolve(
        {"rate": {"default": 0.3}}, {1: {"placement": ["none", "before_bn"]}}
    ).defaults()
    # block 0: the overridden default rate
    assert config.blocks[0] == BlockConfig("after_act", 0.3, "dropout", 0.1)
    # block 1: the first choice is none, so no rate and no regularizer
    assert config.blocks[1] == BlockConfig("none", 0.0, "none", 0.1)


# --- TrialConfig ---------------------------------------------------------------------------------

CONFIG = TrialConfig(
    (
        BlockConfig("before_bn", 0.25, "spatial_dropout", 0.05),
        BlockConfig("none", 0.0, "none", 0.2),
    ),
    recalibrate_bn=True,
)


def test_trial_config_to_dicts_and_back() -> None:
    dicts = CONFIG.to_dicts()
    # one plain dict per block, with every field
    assert dicts == [
        {
            "placement": "before_bn",
            "rate": 0.25,
            "regularizer": "spatial_dropout",
            "bn_momentum": 0.05,
        },
        {"placement": "none", "rate": 0.0, "regularizer": "none", "bn_momentum": 0.2},
    ]
    # from_dicts rebuilds an equal config, given the network's setting
    assert TrialConfig.from_dicts(dicts, recalibrate_bn=True) == CONFIG
    # which is off when not given
    assert TrialConfig.from_dicts(dicts).recalibrate_bn is False


def test_trial_config_to_params_names() -> None:
    # block{i}.{field} for every block and field
    assert CONFIG.to_params() == {
        "block0.placement": "before_bn",
        "block0.rate": 0.25,
        "block0.regularizer": "spatial_dropout",
        "block0.bn_momentum": 0.05,
        "block1.placement": "none",
        "block1.rate": 0.0,
        "block1.regularizer": "none",
        "block1.bn_momentum": 0.2,
        # and the network's parameter, without a block prefix
        "recalibrate_bn": True,
    }


@pytest.mark.parametrize(
    ("placement", "rate", "active"),
    [
        ("none", 0.3, False),
        ("after_act", 0.0, False),
        ("after_act", 0.3, True),
        ("before_bn", 0.01, True),
    ],
)
def test_block_is_active_only_when_placed_with_a_rate(
    placement: str, rate: float, active: bool
) -> None:
    # a regulariser slot needs both a place and a positive rate
    assert BlockConfig(placement, rate, "dropout").active is active


# --- finding search-space files ------------------------------------------------------------------


def test_find_space_file_by_name() -> None:
    # a name is a file in search_spaces/
    assert find_space_file("dropout_bn").resolve() == ROOT / "search_spaces" / "dropout_bn.yaml"


def test_find_space_file_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "spaces").mkdir()
    path = tmp_path / "spaces" / "mine.yml"
    path.write_text(
        "params: {placement: after_bn, rate: 0.2, regularizer: dropout, bn_momentum: 0.1}\n"
    )
    # a path is relative to base_dir (the spec's folder)
    assert find_space_file("spaces/mine.yml", base_dir=tmp_path) == path
    # and loads as a space of fixed values named after the file
    resolved = load_space("spaces/mine.yml", n_blocks=1, template="mlp", base_dir=tmp_path)
    assert resolved.name == "mine"
    assert resolved.defaults() == TrialConfig((BlockConfig("after_bn", 0.2, "dropout", 0.1),))


def test_find_space_file_unknown_name() -> None:
    with pytest.raises(SpecError) as caught:
        find_space_file("dropout_only")
    # the field, the name, and the names there are
    assert str(caught.value).startswith(
        "search_space.base: unknown search space 'dropout_only'; expected one of: "
    )
    assert "dropout_bn" in str(caught.value).rsplit(": ", 1)[1].split(", ")


def test_find_space_file_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        find_space_file("spaces/gone.yaml", base_dir=tmp_path)
    # the path it looked for, under base_dir
    assert str(caught.value) == (
        f"search_space.base: file not found: {str(tmp_path / 'spaces' / 'gone.yaml')!r}"
    )


def test_list_spaces_includes_dropout_bn() -> None:
    rows = {name: (path, description) for name, path, description in list_spaces()}
    # the shipped space, its file and its description
    assert rows["dropout_bn"] == (
        find_space_file("dropout_bn"),
        "dropout placement, rate, kind and BN momentum, per block",
    )


# --- the vocabulary and the modules agree --------------------------------------------------------


def test_space_and_regularizers_name_the_same_regularizers() -> None:
    # every name the search can pick has a module, and every module a name
    assert set(space.REGULARIZERS) == set(regularizers.FACTORIES)


def test_every_regularizer_but_stochastic_depth_applies_to_some_template() -> None:
    template_kinds = set(space.TEMPLATE_KINDS.values())
    # no choosable regularizer is dead weight: each fits dense or spatial blocks; stochastic
    # depth fits none, since placement: residual picks it
    assert {name for name, kinds in space.REGULARIZERS.items() if not kinds & template_kinds} == {
        "stochastic_depth"
    }


def test_placements_cover_every_template() -> None:
    # the vocabulary, in the order messages list it
    assert space.PLACEMENTS == ALL_PLACEMENTS
    # the residual-only ones are placements
    assert space.RESIDUAL_PLACEMENTS == {"in_branch", "residual"} <= set(space.PLACEMENTS)


def test_space_does_not_import_torch() -> None:
    code = (
        "import sys, autotune.core.space, autotune.core.space_files; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    # `validate` imports both and must stay light
    assert result.stdout.strip() == "False"

"""autotune.space: search-space files, overrides, sampling through Optuna, and TrialConfig."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autotune import regularizers, space
from autotune.errors import SpecError
from autotune.space import (
    BlockConfig,
    Choice,
    Fixed,
    Range,
    TrialConfig,
    find_space_file,
    list_spaces,
    load_space,
)

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = ("none", "before_bn", "after_bn", "after_act")

# dropout_bn.yaml, resolved for one block of each template
PLACEMENT = Choice(PLACEMENTS, "after_act")
RATE = Range(0.05, 0.5, 0.1)
MOMENTUM = Range(0.01, 0.5, 0.1, log=True)
MLP_BLOCK = {
    "placement": PLACEMENT,
    "rate": RATE,
    "regularizer": Fixed("dropout"),
    "bn_momentum": MOMENTUM,
}
CNN_BLOCK = {**MLP_BLOCK, "regularizer": Choice(("dropout", "spatial_dropout"), "dropout")}

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


@pytest.mark.parametrize(("template", "block"), [("mlp", MLP_BLOCK), ("cnn", CNN_BLOCK)])
def test_dropout_bn_resolves_one_copy_per_block(template: str, block: dict) -> None:
    resolved = resolve(n_blocks=3, template=template)
    # named after the file, with its description
    assert resolved.name == "dropout_bn"
    assert resolved.description == "dropout placement, rate, kind and BN momentum, per block"
    # one mapping per block, each the file's entries
    assert resolved.blocks == (block, block, block)


def test_spatial_dropout_is_left_out_for_mlp_and_kept_for_cnn() -> None:
    # an mlp block has no channels: dropout is the only regularizer left, so it is fixed
    assert resolve(template="mlp").blocks[0]["regularizer"] == Fixed("dropout")
    # a cnn block searches both
    assert resolve(template="cnn").blocks[0]["regularizer"] == Choice(
        ("dropout", "spatial_dropout"), "dropout"
    )


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
        # a list replaces the whole entry: the choices, and the default becomes the first choice
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


# --- errors name the field -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "blocks", "message"),
    [
        # unknown parameters, for all blocks and for one
        (
            {"dropout_rate": 0.1},
            None,
            "search_space.params.dropout_rate: unknown parameter; "
            "expected one of: placement, rate, regularizer, bn_momentum",
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
            "expected one of: none, before_bn, after_bn, after_act",
        ),
        (
            {"placement": ["none", "middle"]},
            None,
            "search_space.params.placement.choices: unknown placement 'middle'; "
            "expected one of: none, before_bn, after_bn, after_act",
        ),
        (
            None,
            {0: {"placement": "middle"}},
            "search_space.blocks.0.placement: unknown placement 'middle'; "
            "expected one of: none, before_bn, after_bn, after_act",
        ),
        # unknown regularizer
        (
            {"regularizer": "alpha_dropout"},
            None,
            "search_space.params.regularizer: unknown regularizer 'alpha_dropout'; "
            "expected one of: dropout, spatial_dropout",
        ),
        (
            {"regularizer": ["dropout", "gaussian"]},
            None,
            "search_space.params.regularizer.choices: unknown regularizer 'gaussian'; "
            "expected one of: dropout, spatial_dropout",
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
    placements, regularizers_seen = set(), set()
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
        # what the trial recorded is what the config holds
        assert {k: config.to_params()[k] for k in trial.params} == trial.params
    # 80 draws reach every placement, so both branches were checked
    assert placements == set(PLACEMENTS)
    # an mlp only ever gets element-wise dropout; a cnn gets both kinds
    expected = {"dropout"} if template == "mlp" else {"dropout", "spatial_dropout"}
    assert regularizers_seen == expected


@pytest.mark.parametrize("template", ["mlp", "cnn"])
def test_unplaced_blocks_suggest_no_rate_or_regularizer(template: str) -> None:
    resolved = resolve(n_blocks=2, template=template)
    for trial in ask(30, seed=1):
        config = resolved.sample(trial)
        for i, block in enumerate(config.blocks):
            keys = {key for key in trial.params if key.startswith(f"block{i}.")}
            if block.placement == "none":
                # only placement and momentum are asked for
                expected = {f"block{i}.placement", f"block{i}.bn_momentum"}
            elif template == "mlp":
                # the rate too; the regularizer is fixed for an mlp
                expected = {f"block{i}.placement", f"block{i}.bn_momentum", f"block{i}.rate"}
            else:
                # the rate and the kind
                expected = {
                    f"block{i}.placement",
                    f"block{i}.bn_momentum",
                    f"block{i}.rate",
                    f"block{i}.regularizer",
                }
            assert keys == expected


def test_fixed_parameters_never_reach_the_trial() -> None:
    resolved = resolve(
        {"placement": ["after_bn"], "rate": 0.2},
        {1: {"bn_momentum": 0.3}},
        template="cnn",
    )
    trial = ask(1)[0]
    config = resolved.sample(trial)
    # only what is still searched: block 0's momentum, and each block's kind
    assert set(trial.params) == {"block0.bn_momentum", "block0.regularizer", "block1.regularizer"}
    # the fixed values are in the config all the same
    assert [(b.placement, b.rate) for b in config.blocks] == [("after_bn", 0.2)] * 2
    assert config.blocks[1].bn_momentum == 0.3


def test_a_fully_fixed_space_asks_nothing() -> None:
    resolved = resolve({"placement": "after_act", "rate": 0.3, "bn_momentum": 0.05})
    trial = ask(1)[0]
    # nothing is searched, so the trial has no parameters
    assert resolved.sample(trial) == TrialConfig(
        (BlockConfig("after_act", 0.3, "dropout", 0.05),) * 2
    )
    assert trial.params == {}


def test_step_ranges_sample_on_the_grid() -> None:
    resolved = resolve({"placement": "after_act", "rate": {"low": 0.1, "high": 0.4, "step": 0.1}})
    rates = {resolved.sample(trial).blocks[0].rate for trial in ask(30)}
    # every rate is one of 0.1, 0.2, 0.3, 0.4
    assert {round(rate, 6) for rate in rates} <= {0.1, 0.2, 0.3, 0.4}
    assert len(rates) > 1


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_are_the_files_defaults() -> None:
    # after_act, drop 10 %, element-wise dropout, PyTorch's momentum, in every block
    assert resolve(n_blocks=3).defaults() == TrialConfig(
        (BlockConfig("after_act", 0.1, "dropout", 0.1),) * 3
    )


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
    )
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
    # from_dicts rebuilds an equal config
    assert TrialConfig.from_dicts(dicts) == CONFIG


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


def test_every_regularizer_applies_to_some_template() -> None:
    # no regularizer is dead weight: each fits dense or spatial blocks
    assert all(kinds & set(space.TEMPLATE_KINDS.values()) for kinds in space.REGULARIZERS.values())


def test_space_does_not_import_torch() -> None:
    code = "import sys, autotune.space; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    # `validate` imports autotune.space and must stay light
    assert result.stdout.strip() == "False"

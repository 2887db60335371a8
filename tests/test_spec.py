"""autotune.core.spec: a spec file -> frozen sections with documented defaults, or a one-line
error."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_spec

from autotune.core.errors import SpecError
from autotune.core.spec import DataSpec, load_spec, parse_spec
from autotune.search.pruners import VarianceShiftPruner
from autotune.search.storage import make_pruner

SIX_LINES = """\
study:
  name: six
  metric: val_loss
data:
  name: wine
model: {template: cnn}
"""


def spec_error(raw: dict) -> str:
    """The message of the SpecError that parse_spec raises for raw."""
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return str(caught.value)


# --- valid specs and their defaults --------------------------------------------------------------


def test_six_line_spec_validates_with_defaults_filled_in(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SIX_LINES)
    # the fixture really is six lines
    assert len(SIX_LINES.splitlines()) == 6
    spec = load_spec(path)
    # what the six lines say
    assert (spec.study.name, spec.study.metric, spec.data.name) == ("six", "val_loss", "wine")
    assert spec.model.template == "cnn"
    # a loss is minimised when no direction is given
    assert spec.study.direction is None
    assert spec.study.resolved_direction == "minimize"
    # a cnn gets two blocks of 32 and 64 channels
    assert spec.model.resolved_widths == [32, 64]
    # outputs go to runs/<study name>, the databases inside it
    assert spec.output_dir == Path("runs/six")
    assert spec.storage_url == "sqlite:///runs/six/autotune.db"
    assert spec.tracking_uri == "sqlite:///runs/six/mlflow.db"
    # the MLflow experiment is named after the study
    assert spec.experiment_name == "six"
    # paths the spec reads resolve against the spec's folder
    assert spec.base_dir == tmp_path


def test_empty_spec_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    spec = load_spec(path)
    # study defaults: accuracy, maximised, 20 trials, TPE with the variance-shift pruner
    assert spec.study.name == "autotune"
    assert spec.study.metric == "val_acc"
    assert spec.study.resolved_direction == "maximize"
    assert spec.study.n_trials == 20
    assert spec.study.timeout is None
    assert spec.study.sampler == "tpe"
    pruner = spec.study.pruner
    assert pruner.name == "variance_shift"
    # its gate at Δ = 0.5 lets a tenth of the gated trials explore; a median decides in training
    assert (pruner.base, pruner.threshold, pruner.exploration) == ("median", 0.5, 0.1)
    # stricter far from Δ = 1, no extra warm-up near it, the gate learned once 10 trials completed
    assert (pruner.strictness, pruner.patience, pruner.seed_trials) == (0.5, 0, 0)
    assert (pruner.learn_threshold, pruner.learn_after) == (True, 10)
    # the median's own settings, and the percentile base's 50 (the median)
    assert (pruner.n_startup_trials, pruner.n_warmup_epochs, pruner.percentile) == (5, 3, 50.0)
    # no data source means the bundled digits, 20 % held out, batches of 64
    assert spec.data.name == "digits"
    assert spec.data.path is None and spec.data.datamodule is None
    assert (spec.data.val_fraction, spec.data.batch_size) == (0.2, 64)
    # an mlp of 256, 256 and 128 units with ReLU
    assert spec.model.template == "mlp"
    assert spec.model.widths is None
    assert spec.model.resolved_widths == [256, 256, 128]
    assert spec.model.activation == "relu"
    # training defaults
    assert spec.train.max_epochs == 15
    assert (spec.train.optimizer, spec.train.lr, spec.train.seed) == ("adamw", 1e-3, 0)
    # the shipped search space with no overrides
    assert spec.search_space.base == "dropout_bn"
    assert spec.search_space.params == {} and spec.search_space.blocks == {}
    # MLflow on, both databases under runs/autotune
    assert spec.mlflow.enabled is True
    assert spec.output_dir == Path("runs/autotune")
    assert spec.storage_url == "sqlite:///runs/autotune/autotune.db"
    assert spec.tracking_uri == "sqlite:///runs/autotune/mlflow.db"


def test_default_databases_live_under_the_output_folder(write_spec, tmp_path: Path) -> None:
    spec = load_spec(write_spec(tiny_spec()))
    # write_spec puts the output under tmp_path/out; both sqlite files go there
    assert spec.output_dir == tmp_path / "out"
    assert spec.storage_url == f"sqlite:///{tmp_path / 'out' / 'autotune.db'}"
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"


def test_explicit_storage_and_tracking_uri_win() -> None:
    spec = parse_spec(
        {
            "study": {"storage": "postgresql://u:p@db/optuna"},
            "mlflow": {"tracking_uri": "http://mlflow:5000", "experiment": "exp"},
        }
    )
    # given URLs are used as they are, not placed under the output folder
    assert spec.storage_url == "postgresql://u:p@db/optuna"
    assert spec.tracking_uri == "http://mlflow:5000"
    # an explicit experiment name beats the study name
    assert spec.experiment_name == "exp"


@pytest.mark.parametrize(
    ("study", "direction"),
    [
        ({"metric": "val_acc"}, "maximize"),
        ({"metric": "val_loss"}, "minimize"),
        ({"metric": "train_loss"}, "minimize"),
        ({"metric": "val_loss", "direction": "maximize"}, "maximize"),
        ({"metric": "val_acc", "direction": "minimize"}, "minimize"),
    ],
)
def test_direction_follows_the_metric_unless_given(study: dict, direction: str) -> None:
    # accuracy goes up, losses go down; an explicit direction is kept
    assert parse_spec({"study": study}).study.resolved_direction == direction


@pytest.mark.parametrize(
    ("template", "widths"),
    [("mlp", [256, 256, 128]), ("cnn", [32, 64]), ("resnet", [16, 32, 64])],
)
def test_widths_default_per_template(template: str, widths: list[int]) -> None:
    # each template has its own default widths
    assert parse_spec({"model": {"template": template}}).model.resolved_widths == widths


def test_given_widths_are_kept() -> None:
    # explicit widths beat the template's default
    assert parse_spec({"model": {"template": "cnn", "widths": [8]}}).model.resolved_widths == [8]


def test_pruner_shorthand() -> None:
    pruner = parse_spec({"study": {"pruner": "hyperband"}}).study.pruner
    # `pruner: hyperband` is `pruner: {name: hyperband}` with every other field at its default
    assert pruner.name == "hyperband"
    assert (pruner.min_epochs, pruner.reduction_factor) == (1, 3)


def test_the_gate_can_be_turned_off() -> None:
    pruner = parse_spec({"study": {"pruner": {"threshold": None}}}).study.pruner
    # threshold null: the variance-shift pruner without its gate
    assert (pruner.name, pruner.threshold) == ("variance_shift", None)


@pytest.mark.parametrize(
    ("pruner", "message"),
    [
        # the threshold is a Δ strictly between 0 and 1
        ({"threshold": 1.0}, "study.pruner.threshold: Input should be less than 1 (got 1.0)"),
        ({"threshold": 0}, "study.pruner.threshold: Input should be greater than 0 (got 0)"),
        # a share
        (
            {"exploration": 1.5},
            "study.pruner.exploration: Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            {"exploration": -0.1},
            "study.pruner.exploration: Input should be greater than or equal to 0 (got -0.1)",
        ),
        # strictness 1 would give a percentile of 0 at the threshold: nothing kept
        ({"strictness": 1}, "study.pruner.strictness: Input should be less than 1 (got 1)"),
        (
            {"patience": -1},
            "study.pruner.patience: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            {"learn_after": 0},
            "study.pruner.learn_after: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"quantile": 1}, "study.pruner.quantile: Input should be less than 1 (got 1)"),
        (
            {"optimism": -1},
            "study.pruner.optimism: Input should be greater than or equal to 0 (got -1)",
        ),
        ({"gate": "metric"}, "study.pruner.gate: Input should be 'cost' or 'delta' (got 'metric')"),
        # the cost model fits the completed trials: fewer than 3 leave nothing to learn
        (
            {"learn_after": 2},
            "study.pruner: learn_after (2) must be at least 3 with gate cost: the cost model "
            "learns from that many completed trials",
        ),
        (
            {"seed_trials": -2},
            "study.pruner.seed_trials: Input should be greater than or equal to 0 (got -2)",
        ),
        ({"percentile": 100}, "study.pruner.percentile: Input should be less than 100 (got 100)"),
        (
            {"base": "variance_shift"},
            "study.pruner.base: Input should be 'median', 'percentile', 'hyperband', "
            "'successive_halving' or 'none' (got 'variance_shift')",
        ),
        (
            {"name": "asha"},
            "study.pruner.name: Input should be 'variance_shift', 'none', 'median', 'percentile', "
            "'hyperband' or 'successive_halving' (got 'asha')",
        ),
    ],
)
def test_invalid_pruner_fields_name_the_field_in_one_line(pruner: dict, message: str) -> None:
    text = spec_error({"study": {"pruner": pruner}})
    # the dotted field, the rule and the value
    assert text == f"spec: {message}"
    # one line
    assert "\n" not in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", optuna.pruners.NopPruner),
        ("median", optuna.pruners.MedianPruner),
        ("percentile", optuna.pruners.PercentilePruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
    ],
)
def test_make_pruner_builds_each_named_pruner(name: str, expected: type) -> None:
    plain = make_pruner(parse_spec({"study": {"pruner": name}}).study.pruner, max_epochs=5)
    wrapped = make_pruner(
        parse_spec({"study": {"pruner": {"base": name, "threshold": 0.4}}}).study.pruner,
        max_epochs=5,
        seed=7,
    )
    # the name alone gives Optuna's pruner of that name
    assert type(plain) is expected
    # variance_shift wraps the pruner named by base, with the spec's gate and the study's seed
    assert isinstance(wrapped, VarianceShiftPruner)
    assert type(wrapped.base) is expected
    assert (wrapped.threshold, wrapped.exploration, wrapped.seed) == (0.4, 0.1, 7)


def test_make_pruner_passes_the_spec_settings_on() -> None:
    spec = parse_spec(
        {
            "study": {
                "pruner": {
                    "base": "percentile",
                    "percentile": 30,
                    "n_warmup_epochs": 1,
                    "exploration": 0.0,
                    "strictness": 0.25,
                    "patience": 4,
                    "learn_threshold": True,
                    "learn_after": 6,
                    "gate": "cost",
                    "quantile": 0.3,
                    "optimism": 0.8,
                    "cost_steps": 2,
                }
            }
        }
    )
    pruner = make_pruner(spec.study.pruner, max_epochs=5)
    # every variance-shift field reaches the pruner
    assert (pruner.exploration, pruner.strictness, pruner.patience) == (0.0, 0.25, 4)
    assert (pruner.learn_threshold, pruner.learn_after) == (True, 6)
    assert (pruner.gate, pruner.quantile, pruner.optimism, pruner.cost_steps) == (
        "cost",
        0.3,
        0.8,
        2,
    )
    # and the base gets the percentile settings (Optuna keeps them private)
    assert (pruner.base._percentile, pruner.base._n_warmup_steps) == (30.0, 1)


def test_learn_after_below_3_is_refused_only_where_a_cost_gate_would_use_it() -> None:
    for pruner in ({"name": "median", "learn_after": 2}, {"gate": "delta", "learn_after": 2}):
        assert parse_spec({"study": {"pruner": pruner}}).study.pruner.learn_after == 2


def test_search_space_shorthand() -> None:
    search_space = parse_spec({"search_space": "dropout_bn"}).search_space
    # `search_space: dropout_bn` is `search_space: {base: dropout_bn}` with no overrides
    assert search_space.base == "dropout_bn"
    assert search_space.params == {} and search_space.blocks == {}


def test_block_override_keys_become_ints() -> None:
    spec = parse_spec({"search_space": {"blocks": {"1": {"placement": "after_act"}}}})
    # a block index written as a string is read as the int the search space expects
    assert spec.search_space.blocks == {1: {"placement": "after_act"}}


def test_spec_sections_are_frozen() -> None:
    spec = parse_spec({})
    # a validated spec cannot be changed behind the validator's back
    with pytest.raises(ValueError, match="frozen"):
        spec.study.n_trials = 3  # type: ignore[misc]


# --- data files resolve against the spec's folder ------------------------------------------------


def test_relative_data_path_resolves_against_the_spec_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.csv").write_text("a,label\n1,0\n2,1\n")
    (project / "spec.yaml").write_text("data:\n  path: data.csv\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(project / "spec.yaml")
    # the csv is found beside the spec, not in the working directory
    assert spec.data.path == project / "data.csv"
    # giving a path leaves the dataset name unset
    assert spec.data.name is None


def test_missing_data_file_is_named_relative_to_the_spec_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "spec.yaml").write_text("data:\n  path: missing.csv\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as caught:
        load_spec(project / "spec.yaml")
    # the message names the spec, the field and the path it looked at, on one line
    expected = (
        f"{project / 'spec.yaml'}: data.path: file not found: {str(project / 'missing.csv')!r}"
    )
    assert str(caught.value) == expected


def test_wrong_data_file_suffix(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("a,label\n1,0\n")
    (tmp_path / "spec.yaml").write_text("data: {path: data.txt}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "spec.yaml")
    # an existing file with the wrong suffix is refused by its suffix
    assert str(caught.value).endswith(
        f"data.path: expected a .csv or .npz file, got {str(tmp_path / 'data.txt')!r}"
    )


def test_data_spec_built_directly_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rows.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    # without a spec file the base folder is the working directory
    assert DataSpec(path="rows.npz").path == Path("rows.npz")


# --- errors: one line that names the field -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # unknown keys list the keys the section allows (never the internal base_dir)
        (
            {"studdy": {}},
            "spec: studdy: unknown key; expected one of: "
            "study, data, model, train, search_space, mlflow, recommend, output",
        ),
        (
            {"study": {"trials": 3}},
            "spec: study.trials: unknown key; expected one of: name, metric, direction, "
            "n_trials, timeout, sampler, pruner, storage, heartbeat_interval, heartbeat_grace",
        ),
        (
            {"study": {"pruner": {"name": "median", "warmup": 2}}},
            "spec: study.pruner.warmup: unknown key; expected one of: name, base, gate, "
            "quantile, optimism, cost_steps, threshold, exploration, learn_threshold, "
            "learn_after, strictness, patience, seed_trials, n_startup_trials, n_warmup_epochs, "
            "percentile, min_epochs, reduction_factor",
        ),
        (
            {"data": {"synthetic": {"rows": 10}}},
            "spec: data.synthetic.rows: unknown key; expected one of: n_samples, n_features, "
            "n_informative, n_classes, image_size, channels, flip_y",
        ),
        (
            {"search_space": {"base": "dropout_bn", "param": {}}},
            "spec: search_space.param: unknown key; expected one of: base, params, blocks",
        ),
        # wrong types give the value that was there
        (
            {"study": {"n_trials": "many"}},
            "spec: study.n_trials: Input should be a valid integer (got 'many')",
        ),
        ({"model": {"widths": 3}}, "spec: model.widths: Input should be a valid list (got 3)"),
        (
            {"model": {"widths": [8, "wide"]}},
            "spec: model.widths.1: Input should be a valid integer (got 'wide')",
        ),
        (
            {"study": {"sampler": "grid"}},
            "spec: study.sampler: Input should be 'tpe', 'random', 'gp' or 'cmaes' (got 'grid')",
        ),
        (
            {"model": {"template": "vgg"}},
            "spec: model.template: Input should be 'mlp', 'cnn' or 'resnet' (got 'vgg')",
        ),
        # out-of-range values give the bound and the value
        (
            {"study": {"n_trials": 0}},
            "spec: study.n_trials: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"data": {"val_fraction": 1.0}},
            "spec: data.val_fraction: Input should be less than 1 (got 1.0)",
        ),
        ({"model": {"widths": [16, 0]}}, "spec: model.widths: widths[1] must be at least 1, got 0"),
        # several errors: the first, and how many more
        (
            {"study": {"n_trials": 0, "timeout": -1}},
            "spec: study.n_trials: Input should be greater than or equal to 1 (got 0) (and 1 more)",
        ),
        # data sources
        (
            {"data": {"name": "mnist"}},
            "spec: data.name: unknown dataset 'mnist'; expected one of: digits, breast_cancer, "
            "wine, synthetic_tabular, synthetic_images",
        ),
        (
            {"data": {"datamodule": "mypackage.data.DigitsModule"}},
            "spec: data.datamodule: expected 'package.module:Class', "
            "got 'mypackage.data.DigitsModule'",
        ),
        (
            {"data": {"datamodule": "my package:Module"}},
            "spec: data.datamodule: expected 'package.module:Class', got 'my package:Module'",
        ),
        (
            {"data": {"name": "wine", "datamodule": "pkg.mod:Data"}},
            "spec: data: give one of name, path, datamodule; got name, datamodule",
        ),
    ],
)
def test_invalid_spec_names_the_field_in_one_line(raw: dict, message: str) -> None:
    text = spec_error(raw)
    # the exact message: source, dotted field path, what is wrong
    assert text == message
    # one line, for the CLI to print without a traceback
    assert "\n" not in text


def test_two_data_sources_with_a_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,label\n1,0\n2,1\n")
    (tmp_path / "spec.yaml").write_text("data: {name: wine, path: data.csv}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "spec.yaml")
    # a dataset name and a file at once are refused, naming both
    assert str(caught.value) == (
        f"{tmp_path / 'spec.yaml'}: data: give one of name, path, datamodule; got name, path"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a YAML syntax error says which line
        ("study:\n  name: [unclosed\n", "not valid YAML (line 3)"),
        # a list is not a mapping of sections
        ("- study\n- data\n", "expected a mapping of sections, got list"),
        # a bare scalar neither
        ("just text\n", "expected a mapping of sections, got str"),
        # base_dir is set by load_spec, never by the file
        ("base_dir: /etc\n", "base_dir: unknown key"),
    ],
)
def test_unreadable_spec_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    # the file, then what is wrong with it, on one line (a YAML error then says the parser's
    # own words)
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "\n" not in str(caught.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    # the path that was not found
    assert str(caught.value) == f"{path}: spec file not found"


def test_errors_from_a_file_start_with_its_path(write_spec) -> None:
    path = write_spec(tiny_spec(train={"lr": -1}))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    # the source is the spec file, then the field
    assert str(caught.value) == f"{path}: train.lr: Input should be greater than 0 (got -1)"


# --- overrides -----------------------------------------------------------------------------------


def test_dotted_overrides_apply(write_spec) -> None:
    path = write_spec(tiny_spec())
    spec = load_spec(path, overrides={"study.n_trials": 7, "train.lr": 0.01})
    # the override beats the file's value (tiny_spec has 3 trials)
    assert spec.study.n_trials == 7
    # a key the file leaves out is added
    assert spec.train.lr == 0.01
    # the rest of the file is untouched
    assert spec.study.name == "tiny" and spec.train.max_epochs == 2
    # the file itself is not rewritten
    assert yaml.safe_load(path.read_text())["study"]["n_trials"] == 3


def test_override_creates_a_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("data: {name: wine}\n")
    # a section the file does not have is created for the override
    assert load_spec(path, overrides={"study.timeout": 30.0}).study.timeout == 30.0


def test_overrides_are_validated(write_spec) -> None:
    path = write_spec(tiny_spec())
    with pytest.raises(SpecError) as caught:
        load_spec(path, overrides={"study.n_trials": 0})
    # an override is checked like the file's own values
    assert str(caught.value) == (
        f"{path}: study.n_trials: Input should be greater than or equal to 1 (got 0)"
    )


def test_override_below_a_shorthand_section(write_spec) -> None:
    # `pruner: median` is the shorthand for {name: median}
    path = write_spec(tiny_spec(study={"pruner": "median"}))
    pruner = load_spec(path, overrides={"study.pruner.n_warmup_epochs": 1}).study.pruner
    # the shorthand's name is kept and the override lands
    assert pruner.name == "median"
    assert pruner.n_warmup_epochs == 1


# --- value ranges: what run cannot use is refused at validate ------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # an infinite learning rate or decay trains nothing; NaN neither
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number (got inf)"),
        (
            {"train": {"weight_decay": float("inf")}},
            "train.weight_decay: Input should be a finite number (got inf)",
        ),
        (
            {"train": {"optimizer": "sgd", "momentum": float("nan")}},
            "train.momentum: Input should be a finite number (got nan)",
        ),
        (
            {"study": {"timeout": float("inf")}},
            "study.timeout: Input should be a finite number (got inf)",
        ),
        # seeds numpy and Lightning take: run blamed data.val_fraction for these
        (
            {"train": {"seed": -1}},
            "train.seed: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            {"train": {"seed": 2**32}},
            "train.seed: Input should be less than or equal to 4294967295 (got 4294967296)",
        ),
        (
            {"train": {"seed": 10**20}},
            f"train.seed: Input should be less than or equal to 4294967295 (got {10**20})",
        ),
        # a width no trial can allocate, and bools taken for widths of 1
        (
            {"model": {"widths": [100_000_000_000, 2]}},
            "model.widths.0: Input should be less than or equal to 65536 (got 100000000000)",
        ),
        (
            {"model": {"widths": [True, True]}},
            "model.widths.0: Input should be a valid integer (got True) (and 1 more)",
        ),
        # a decay whose every step scales the weights by more than 1: NaN in every trial
        (
            {"train": {"weight_decay": 4294967295}},
            "train: weight_decay: lr × weight_decay = 4.29497e+06 is past 2, where adamw's decay "
            "makes the weights grow without bound",
        ),
        (
            {"train": {"optimizer": "sgd", "lr": 1, "momentum": 0.5, "weight_decay": 3.5}},
            "train: weight_decay: lr × weight_decay = 3.5 is past 3, where sgd's decay makes the "
            "weights grow without bound",
        ),
        # a bool is no count, nor a number
        (
            {"study": {"n_trials": True}},
            "study.n_trials: Input should be a valid integer (got True)",
        ),
        ({"train": {"lr": True}}, "train.lr: expected a number, got True"),
        # past int64: what numpy, torch and the storages hold
        (
            {"study": {"pruner": {"patience": 10**30}}},
            f"study.pruner.patience: expected an integer of at most 2**63 - 1, got {10**30}",
        ),
        # Optuna's thread waits on the interval; a day of silence is a dead worker
        (
            {"study": {"heartbeat_grace": 10**20}},
            f"study.heartbeat_grace: Input should be less than or equal to 86400 (got {10**20})",
        ),
        # each seed trial costs ten predictions, and more than the budget never run
        (
            {"study": {"n_trials": 3, "pruner": {"seed_trials": 1_000_000}}},
            "study: pruner.seed_trials (1000000) must not exceed n_trials (3)",
        ),
        # the robust recommendation trains seeds train.seed, train.seed + 1, ...
        (
            {"train": {"seed": 2**32 - 2}, "recommend": {"top_k": 1, "seeds": 3}},
            "recommend.seeds: train.seed + seeds - 1 = 4294967296 is past 4294967295 "
            "(2**32 - 1), the largest seed numpy and Lightning take",
        ),
        # a bool block index is not block 1
        (
            {"search_space": {"blocks": {True: {"placement": "none"}}}},
            "search_space.blocks.1.[key]: expected a number, got True",
        ),
    ],
)
def test_values_run_cannot_use_are_refused(raw: dict, message: str) -> None:
    # the exact message: the field, the rule, the value
    assert spec_error(raw) == f"spec: {message}"


def test_values_at_the_bounds_are_taken() -> None:
    spec = parse_spec(
        {
            "train": {"seed": 2**32 - 1, "lr": "1e-3"},
            "model": {"widths": [65_536]},
            "study": {"heartbeat_grace": 86_400, "n_trials": 2, "pruner": {"seed_trials": 2}},
        }
    )
    # the largest seed, the widest block, a day of grace
    assert spec.train.seed == 2**32 - 1 and spec.model.resolved_widths == [65_536]
    # YAML 1.1 reads 1e-3 as text: a number written so is still a number
    assert spec.train.lr == 1e-3
    # adam normalises the decay with the gradient: no bound on lr × weight_decay
    assert parse_spec({"train": {"optimizer": "adam", "weight_decay": 1e6}}).train.lr == 1e-3
    # seeds past 2**32 - 1 matter only when seeds are trained again
    assert parse_spec({"train": {"seed": 2**32 - 1}, "recommend": {"seeds": 5}}).train.seed > 0


def test_a_missing_current_configuration_is_refused_at_validate(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text("recommend: {top_k: 1, current: mine.yaml}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "spec.yaml")
    # found missing when the spec is read, relative to its folder, not after the whole study
    assert str(caught.value) == (
        f"{tmp_path / 'spec.yaml'}: recommend.current: file not found: "
        f"{str(tmp_path / 'mine.yaml')!r}"
    )
    (tmp_path / "mine.yaml").write_text("blocks: []\n")
    # once there, it is kept as the resolved path
    assert load_spec(tmp_path / "spec.yaml").recommend.current == tmp_path / "mine.yaml"


def test_a_long_bad_value_is_abbreviated() -> None:
    # a 1 MB name: the error echoed all of it
    message = spec_error({"study": {"name": "x" * 1_000_000}})
    assert message.startswith("spec: study.name: String should have at most 100 characters")
    # the value by its start, cut with "…"
    assert message.endswith("(got '" + "x" * 78 + "…)")
    assert len(message) < 200
    # an unknown key of any length is named by its start too
    message = spec_error({"study": {"k" * 100_000: 1}})
    assert message.startswith("spec: study." + "k" * 39 + "…: unknown key") and len(message) < 300


def test_binary_kwargs_dump_for_the_mlflow_params(tmp_path: Path) -> None:
    from autotune.search.run_fields import flatten

    path = tmp_path / "spec.yaml"
    # YAML's !!binary makes bytes, here not UTF-8 text: `run` failed with a UnicodeDecodeError
    # when it dumped the spec for the parent run's params, after validate had passed
    path.write_text("data:\n  datamodule: 'pkg.mod:DM'\n  kwargs: {blob: !!binary '//4='}\n")
    spec = load_spec(path)
    assert spec.data.kwargs["blob"] == b"\xff\xfe"
    params = flatten(spec.model_dump(mode="json", by_alias=True))
    # dumped as base64 text
    assert params["data.kwargs.blob"] == "__4="


@pytest.mark.parametrize(
    ("value", "kind"),
    [("2020-01-01", "date"), (".nan", "float"), ("!!timestamp 2020-01-01 10:00:00", "datetime")],
)
def test_model_kwargs_must_read_back_as_a_literal(tmp_path: Path, value: str, kind: str) -> None:
    # best_model.py writes them as KWARGS = {...}: a date passed validate and the whole study,
    # then the export could not render it
    path = tmp_path / "spec.yaml"
    path.write_text(f"model:\n  import: 'pkg.mod:build'\n  kwargs: {{when: {value}}}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert f"model.kwargs: 'when' is a {kind}," in str(caught.value)
    assert str(caught.value).endswith(
        "expected numbers, text, true/false, null, lists and mappings"
    )
    # numbers, text, lists and mappings pass
    path.write_text(
        "model:\n  import: 'pkg.mod:build'\n  kwargs: {a: 1, b: [x, 2.5], c: {d: null}}\n"
    )
    assert load_spec(path).model.kwargs == {"a": 1, "b": ["x", 2.5], "c": {"d": None}}

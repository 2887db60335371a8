"""spec.yaml as frozen pydantic models, and `load_spec(path)` whose errors name the field.

A spec has seven sections: study, data, model, train, search_space, mlflow, output. Every field
has a default, so `data: {name: digits}` alone is a valid spec. Unknown keys are errors.

Paths the spec *reads* (data.path, a search space file) are relative to the spec file's folder, so
a spec works from any working directory. Paths the spec *writes* (output, the default sqlite
databases) are relative to the working directory, as sqlite URLs are.

The field types and shared validators are in autotune.core.spec_fields, the study section in
autotune.core.spec_study, and a pydantic error's one line in autotune.core.spec_errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from autotune.core.errors import SpecError, abbreviate, quote_path
from autotune.core.files import path_too_long, read_yaml
from autotune.core.names import STORAGE_FILE, TRACKING_FILE
from autotune.core.spec_errors import describe_error
from autotune.core.spec_fields import (
    Float,
    Int,
    Section,
    SyntheticSpec,
    existing,
    file_url_fits,
    import_path,
    no_bool,
    reads_back,
    resolve,
    shorthand,
)
from autotune.core.spec_study import StudySpec

# recommend.top_k: null trains the top AUTO_TOP_K again where those fits, with the baselines,
# would take at most AUTO_SHARE of the time the study's trials took
AUTO_TOP_K, AUTO_SHARE = 2, 1.0
# recommend.folds: null re-ranks over AUTO_FOLDS folds where the data is in memory and has at
# most AUTO_FOLD_ROWS training and validation rows, where one validation split is too few rows
AUTO_FOLDS, AUTO_FOLD_ROWS = 5, 1000
# the test split of a new study whose spec does not say (data.test_fraction: null)
DEFAULT_TEST_FRACTION = 0.2
BUILTIN_DATASETS = ("digits", "breast_cancer", "wine", "synthetic_tabular", "synthetic_images")
# sections that may be written as one string: `pruner: median`, `search_space: dropout_bn`
_SHORTHAND_KEYS = {"pruner": "name", "search_space": "base"}
# numpy's legacy RandomState (Optuna's samplers, scikit-learn's split) and Lightning's
# seed_everything take seeds in [0, 2**32 - 1]; Lightning draws a random one past that
MAX_SEED = 2**32 - 1
# the widest template block: a Linear of 65,536 inputs and outputs is already 4.3e9 weights
# (17 GB in float32); checks.MAX_PARAMETERS bounds the whole network
MAX_WIDTH = 65_536


class DataSpec(Section):
    # a built-in dataset: digits, breast_cancer, wine (scikit-learn's bundled copies),
    # synthetic_tabular or synthetic_images (generated, seeded)
    name: str | None = None
    # a .csv or .npz file instead; relative to the spec file's folder
    path: Path | None = None
    # the label: a column of the csv, or an array of the npz
    label: str = "label"
    # the npz array that holds the features (rows first)
    features: str = "x"
    # a user LightningDataModule instead, as "package.module:Class", built with kwargs
    datamodule: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # classes of a user datamodule that has no `n_classes` attribute
    n_classes: Int | None = Field(None, ge=2)
    # share of the rows held out first, as a test split that no trial, pruner or re-ranking
    # sees: the recommendation is scored on it once, at the end. null: 0.2 for a new study (one
    # stored before test splits resumes without); 0: none. A datamodule's own test_dataloader
    test_fraction: Float | None = Field(None, ge=0, lt=1)
    # share of the rows left after the test split held out for validation, split with train.seed
    val_fraction: Float = Field(0.2, gt=0, lt=1)
    # 64 keeps BN's batch statistics steady on small tabular sets
    batch_size: Int = Field(64, ge=2)
    # each feature scaled by the training split's mean and std (the input_stats.pt beside the
    # snippet); false: the values as they are, for a model trained on them (autotune diagnose)
    standardize: bool = True
    synthetic: SyntheticSpec = SyntheticSpec()

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str | None) -> str | None:
        if name is not None and name not in BUILTIN_DATASETS:
            raise ValueError(
                f"unknown dataset {name!r}; expected one of: {', '.join(BUILTIN_DATASETS)}"
            )
        return name

    @field_validator("path")
    @classmethod
    def _existing_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        path = resolve(path, info)
        if path.suffix not in (".csv", ".npz"):
            raise ValueError(f"expected a .csv or .npz file, got {quote_path(path)}")
        return existing(path)

    _datamodule_path = field_validator("datamodule")(import_path("Class"))

    @property
    def test_share(self) -> float:
        """The share of the rows held out for the test split: test_fraction, or the default."""
        return DEFAULT_TEST_FRACTION if self.test_fraction is None else self.test_fraction

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("name", "path", "datamodule") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of name, path, datamodule; got {', '.join(given)}")
        if not given:
            object.__setattr__(self, "name", "digits")
        if self.datamodule is not None and self.test_fraction:
            raise ValueError(
                "test_fraction: a datamodule holds out its own test split (test_dataloader)"
            )
        return self


class ModelSpec(Section):
    model_config = ConfigDict(**Section.model_config, populate_by_name=True)

    # mlp: Linear blocks on flattened input; cnn: 3x3 Conv2d blocks on (C, H, W) images;
    # resnet: residual blocks of two 3x3 convolutions on images (where stochastic depth applies)
    template: Literal["mlp", "cnn", "resnet"] = "mlp"
    # your own network instead of a template: "package.module:build", a function or class that
    # returns an nn.Module, looked for beside the spec first. Every BatchNorm layer its forward
    # pass uses becomes a block (autotune.nn.surgery); template, widths, activation and pool are
    # then the model's own business and may not be set
    import_: str | None = Field(None, alias="import")
    # keyword arguments for the imported factory; input_shape and n_classes are added where its
    # signature takes them and they are not given here
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # one block per entry: hidden units (mlp) or channels (cnn, resnet); none: [256, 256, 128]
    # for mlp, [32, 64] for cnn, [16, 32, 64] for resnet
    widths: list[Annotated[Int, Field(le=MAX_WIDTH)]] | None = Field(None, min_length=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    # cnn: halve the image with 2x2 max pooling after every block (while it is at least 2 wide);
    # resnet: halve it with stride 2 in every block after the first
    pool: bool = True

    @field_validator("widths")
    @classmethod
    def _positive(cls, widths: list[int] | None) -> list[int] | None:
        for i, width in enumerate(widths or []):
            if width < 1:
                raise ValueError(f"widths[{i}] must be at least 1, got {width}")
        return widths

    _factory_path = field_validator("import_")(import_path("function"))

    @field_validator("kwargs")
    @classmethod
    def _literals(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # best_model.py writes them out as a Python literal (KWARGS = {...}), which must read
        # back as what the factory got: a YAML date or a NaN would not
        for key, value in kwargs.items():
            if not reads_back(value):
                raise ValueError(
                    f"{abbreviate(key)} is a {type(value).__name__}, {abbreviate(value)}; "
                    "expected numbers, text, true/false, null, lists and mappings"
                )
        return kwargs

    @model_validator(mode="after")
    def _import_or_template(self) -> ModelSpec:
        if self.import_ is None:
            if self.kwargs:
                raise ValueError("kwargs: only for an imported model (model.import)")
            return self
        for name in ("template", "widths", "activation", "pool"):
            if name in self.model_fields_set:
                raise ValueError(
                    f"{name}: the imported model {abbreviate(self.import_)} has its own; "
                    f"leave {name} out"
                )
        return self

    @property
    def imported(self) -> bool:
        return self.import_ is not None

    @property
    def resolved_widths(self) -> list[int]:
        if self.widths is not None:
            return list(self.widths)
        return {"mlp": [256, 256, 128], "cnn": [32, 64], "resnet": [16, 32, 64]}[self.template]


class TrainSpec(Section):
    # 15 epochs bring a small mlp on digits close to its plateau; raise it for real work
    max_epochs: Int = Field(15, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Float = Field(1e-3, gt=0)
    # light decay: the search is about dropout and BN, not weight decay
    weight_decay: Float = Field(1e-4, ge=0)
    # sgd only
    momentum: Float = Field(0.9, ge=0, lt=1)
    # Lightning's accelerator: auto takes a GPU where there is one
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    # one seed for every trial, so trials differ by their configuration, not their luck
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    # Lightning's precision. bf16-mixed: bfloat16 autocast, about twice the matmul throughput
    # of float32 on an Ampere-or-later GPU with float32's range, so no loss scaling; 16-mixed:
    # float16 with loss scaling, for older GPUs. 32-true keeps results comparable across
    # machines. BN's statistics and the variance-shift measurement stay in float32 either way
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    # store image batches and convolution weights channels-last (NHWC): faster convolutions on
    # GPU tensor cores, above all with bf16; no effect on an mlp
    channels_last: bool = False
    # torch.compile the network for training: pays a compile (tens of seconds) per trial for
    # faster epochs, so it helps long trials only; needs a C++ compiler on the CPU
    compile: bool = False

    @model_validator(mode="after")
    def _decay_that_shrinks(self) -> TrainSpec:
        # adamw and sgd multiply every weight by 1 - lr * weight_decay each step, besides the
        # gradient's step: past 2 (sgd with momentum m: 2 (1 + m)) its size is above 1 and the
        # weights grow without bound, so every trial's loss becomes NaN. adam adds the decay to
        # the gradient it normalises: no such bound
        limit = {"adamw": 2.0, "sgd": 2.0 * (1 + self.momentum)}.get(self.optimizer)
        product = self.lr * self.weight_decay
        if limit is not None and product > limit:
            raise ValueError(
                f"weight_decay: lr × weight_decay = {product:g} is past {limit:g}, where "
                f"{self.optimizer}'s decay makes the weights grow without bound"
            )
        return self


class SearchSpaceSpec(Section):
    # a file in search_spaces/ by name, or a path to a YAML file (relative to the spec's folder)
    base: str = "dropout_bn"
    # overrides for every block: a list sets the choices, a scalar fixes the value, a mapping
    # changes the range (e.g. rate: {high: 0.3})
    params: dict[str, Any] = Field(default_factory=dict)
    # overrides for one block, by index: {1: {placement: after_act}}
    blocks: dict[Annotated[int, BeforeValidator(no_bool)], dict[str, Any]] = Field(
        default_factory=dict
    )

    @model_validator(mode="before")
    @classmethod
    def _base_shorthand(cls, value: Any) -> Any:
        """Let `search_space: dropout_bn` stand for `search_space: {base: dropout_bn}`."""
        return shorthand(value, "base")


class MlflowSpec(Section):
    # none: sqlite in the output folder (MLflow 3 refuses the ./mlruns file store by default)
    tracking_uri: str | None = None
    # none: the study's name
    experiment: str | None = None
    # false: log nothing to MLflow
    enabled: bool = True

    _tracking_uri_fits = field_validator("tracking_uri")(file_url_fits)


class RecommendSpec(Section):
    # retrain the top_k configurations over `seeds` seeds, with the baselines, and recommend by
    # `by`; 0: recommend the best trial as it is; null: the top 2, where those fits would take
    # no longer than the study's trials took (the budget allows it), else none
    top_k: Int | None = Field(None, ge=0)
    # over seeds on the study's own split (3 different initialisations), or over folds
    seeds: Int = Field(3, ge=2)
    # repeated stratified k-fold over the training and validation rows (built-in and file
    # data): 0: seeds on the study's own split; null: 5 folds for at most 1000 rows, else seeds
    folds: Int | None = Field(None, ge=0)
    # each repeat splits the rows into folds anew: 1 validates every row once
    repeats: Int = Field(1, ge=1)
    # mean: the best mean value; bound: the best one-sided 95 % confidence bound of the mean
    # (Student's t): the lower bound of an accuracy, the upper bound of a loss
    by: Literal["mean", "bound"] = "mean"
    # retrain the baselines (BN only; plain dropout after every activation) beside them
    baselines: bool = True
    # your configuration (a file with `blocks`, such as a recommended.yaml) as one more baseline;
    # relative to the spec file's folder
    current: Path | None = None

    @property
    def wanted_top_k(self) -> int:
        """top_k, or what `null` trains where the budget allows it."""
        return AUTO_TOP_K if self.top_k is None else self.top_k

    @field_validator("current")
    @classmethod
    def _existing_current(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else existing(resolve(path, info))


class Spec(Section):
    study: StudySpec = StudySpec()
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    search_space: SearchSpaceSpec = SearchSpaceSpec()
    mlflow: MlflowSpec = MlflowSpec()
    recommend: RecommendSpec = RecommendSpec()
    # where recommended.yaml, best_model.py and the default databases go; none: runs/<study name>
    output: Path | None = None
    # the folder the spec file lives in, for resolving the files it names (set by load_spec)
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("output")
    @classmethod
    def _output_fits(cls, path: Path | None) -> Path | None:
        if path is not None and path_too_long(path):
            raise ValueError(f"path too long for the file system: {quote_path(path)}")
        return path

    @model_validator(mode="after")
    def _seeds_in_range(self) -> Spec:
        last = self.train.seed + self.recommend.seeds - 1
        # asked for; null skips the re-ranking there (run.robust)
        if (self.recommend.top_k or 0) > 0 and last > MAX_SEED:
            raise ValueError(
                f"recommend.seeds: train.seed + seeds - 1 = {last} is past {MAX_SEED} "
                "(2**32 - 1), the largest seed numpy and Lightning take"
            )
        return self

    @property
    def output_dir(self) -> Path:
        return self.output if self.output is not None else Path("runs") / self.study.name

    @property
    def storage_url(self) -> str:
        return self.study.storage or f"sqlite:///{self.output_dir / STORAGE_FILE}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.output_dir / TRACKING_FILE}"

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.study.name


def load_spec(path: str | Path, *, overrides: dict[str, Any] | None = None) -> Spec:
    """Read and validate a spec file. Raises SpecError with one line naming the field or file."""
    path = Path(path)
    raw = read_yaml(path, what="spec file")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if "base_dir" in raw:
        raise SpecError(f"{path}: base_dir: unknown key")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_spec(raw, base_dir=path.parent, source=str(path))


def parse_spec(raw: dict[str, Any], *, base_dir: Path = Path("."), source: str = "spec") -> Spec:
    """Validate a spec already read into a dict."""
    try:
        return Spec.model_validate({**raw, "base_dir": base_dir}, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise SpecError(f"{source}: {describe_error(exc, Spec)}") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw['a']['b'] = value for 'a.b', expanding a shorthand (`pruner: median`) on the way."""
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif isinstance(child, str) and key in _SHORTHAND_KEYS:
            child = node[key] = {_SHORTHAND_KEYS[key]: child}
        elif not isinstance(child, dict):
            raise SpecError(f"{dotted}: {key} is not a section (got {abbreviate(child)})")
        node = child
    node[last] = value

"""The vocabulary of the search and the configuration a trial runs: the placements and
regularizers, a parameter's domain (Choice, Range, Fixed), what a block has room for (Slot), a
resolved SearchSpace and its Optuna suggestions, and the frozen TrialConfig they give.

No torch here: `validate` imports this module. The search-space files are read, and their
overrides applied, in autotune.core.space_files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna  # core imports no Optuna at run time

PLACEMENTS = ("none", "before_bn", "after_bn", "after_act", "in_branch", "residual")
# placements only a residual block has: in_branch (between its two convolutions, the Wide-ResNet
# placement) and residual (the whole branch, dropped by stochastic depth)
RESIDUAL_PLACEMENTS = frozenset({"in_branch", "residual"})
# regularizer name -> the block kinds it applies to: "dense" (mlp: (N, F) features) and
# "spatial" (cnn, resnet: (N, C, H, W) maps). spatial_dropout and dropblock drop whole channels
# or squares, which a dense block does not have. stochastic_depth drops a residual branch: it is
# not a choice of `regularizer` but what `placement: residual` means. The modules themselves live
# in autotune.nn.regularizers.
REGULARIZERS: dict[str, frozenset[str]] = {
    "dropout": frozenset({"dense", "spatial"}),
    "spatial_dropout": frozenset({"spatial"}),
    "gaussian": frozenset({"dense", "spatial"}),
    "uout": frozenset({"dense", "spatial"}),
    "alpha_dropout": frozenset({"dense", "spatial"}),
    "dropblock": frozenset({"spatial"}),
    "stochastic_depth": frozenset({"residual"}),
}
TEMPLATE_KINDS = {"mlp": "dense", "cnn": "spatial", "resnet": "spatial"}
PARAM_NAMES = ("placement", "rate", "regularizer", "bn_momentum")
# parameters drawn once for the whole network, not per block
NETWORK_PARAMS = ("recalibrate_bn",)


@dataclass(frozen=True)
class Choice:
    choices: tuple[Any, ...]
    default: Any


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    default: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Fixed:
    value: Any


Param = Choice | Range | Fixed


@dataclass(frozen=True)
class Slot:
    """What one block has room for: its `kind` ("dense" or "spatial": which regularizers apply)
    and its placements. `label` names it in messages ("mlp blocks", "layer1.0.bn2")."""

    label: str
    kind: str
    placements: tuple[str, ...]


def template_slot(template: str) -> Slot:
    """Every block of a template has the same room: residual placements only in a resnet."""
    placements = tuple(
        p for p in PLACEMENTS if template == "resnet" or p not in RESIDUAL_PLACEMENTS
    )
    return Slot(f"{template} blocks", TEMPLATE_KINDS[template], placements)


def block_slots(template: str, n_blocks: int, slots: Sequence[Slot] | None) -> list[Slot]:
    """One slot per block: the given ones (an imported model's), else the template's."""
    if slots is None:
        return [template_slot(template)] * n_blocks
    if len(slots) != n_blocks:
        raise ValueError(f"{len(slots)} slots for {n_blocks} blocks")
    return list(slots)


@dataclass(frozen=True)
class BlockConfig:
    """One block's regulariser slot and BN momentum. `rate` is the DROP probability."""

    placement: str = "none"
    rate: float = 0.0
    regularizer: str = "none"
    bn_momentum: float = 0.1

    @property
    def active(self) -> bool:
        return self.placement != "none" and self.rate > 0


@dataclass(frozen=True)
class TrialConfig:
    """The whole network's configuration: one BlockConfig per block, and whether BN's statistics
    are re-estimated with dropout off after training (autotune.nn.shift.recalibrate_bn)."""

    blocks: tuple[BlockConfig, ...]
    recalibrate_bn: bool = False

    def to_params(self) -> dict[str, Any]:
        """Flat `block0.placement`-style names, as Optuna and MLflow see them."""
        params: dict[str, Any] = {
            f"block{i}.{key}": value
            for i, block in enumerate(self.blocks)
            for key, value in asdict(block).items()
        }
        params["recalibrate_bn"] = self.recalibrate_bn
        return params

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(block) for block in self.blocks]

    @classmethod
    def from_dicts(
        cls, blocks: Sequence[Mapping[str, Any]], *, recalibrate_bn: bool = False
    ) -> TrialConfig:
        return cls(tuple(BlockConfig(**block) for block in blocks), bool(recalibrate_bn))


@dataclass(frozen=True)
class SearchSpace:
    """Resolved parameters, one mapping per block, ready to sample."""

    name: str
    description: str
    blocks: tuple[dict[str, Param], ...]
    network: dict[str, Param] = field(default_factory=lambda: {"recalibrate_bn": Fixed(False)})
    # what each block has room for: a hand-written configuration is checked against it
    slots: tuple[Slot, ...] = ()

    def sample(self, trial: optuna.Trial) -> TrialConfig:
        """Ask an Optuna trial for every block's parameters (rate and kind only when placed)."""
        blocks = tuple(self._sample_block(trial, i) for i in range(len(self.blocks)))
        recalibrate = _suggest(trial, "recalibrate_bn", self.network["recalibrate_bn"])
        return TrialConfig(blocks, bool(recalibrate))

    def _sample_block(self, trial: optuna.Trial, i: int) -> BlockConfig:
        params = self.blocks[i]
        placement = _suggest(trial, f"block{i}.placement", params["placement"])
        momentum = _suggest(trial, f"block{i}.bn_momentum", params["bn_momentum"])
        if placement == "none":
            return BlockConfig(placement="none", bn_momentum=momentum)
        rate = _suggest(trial, f"block{i}.rate", params["rate"])
        if placement == "residual":  # the placement names the regulariser
            return BlockConfig(placement, rate, "stochastic_depth", momentum)
        regularizer = _suggest(trial, f"block{i}.regularizer", params["regularizer"])
        return BlockConfig(placement, rate, regularizer, momentum)

    def defaults(self) -> TrialConfig:
        """Every parameter at its default: the configuration a study can start from."""
        blocks = []
        for params in self.blocks:
            values = {name: _default(param) for name, param in params.items()}
            if values["placement"] == "none":
                values.update(rate=0.0, regularizer="none")
            elif values["placement"] == "residual":
                values.update(regularizer="stochastic_depth")
            blocks.append(BlockConfig(**values))
        return TrialConfig(tuple(blocks), bool(_default(self.network["recalibrate_bn"])))

    def has_numeric(self) -> bool:
        """Whether any parameter is a range (what CMA-ES and GP can model)."""
        return any(isinstance(p, Range) for block in self.blocks for p in block.values())


def _suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if isinstance(param, Fixed):
        return param.value
    if isinstance(param, Choice):
        return trial.suggest_categorical(name, list(param.choices))
    return trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)


def _default(param: Param) -> Any:
    return param.value if isinstance(param, Fixed) else param.default


def block_line(index: int, block: Mapping[str, Any]) -> str:
    """A block of a configuration (TrialConfig.to_dicts()) in one short line, as the summary,
    `autotune trials` and the report say it: "1 dropout after_bn 0.33 m=0.11", "0 none m=0.21"
    (regulariser, placement, drop rate, BN momentum to two significant digits)."""
    momentum = f"m={block['bn_momentum']:.2g}"
    if block["placement"] == "none":
        return f"{index} none {momentum}"
    return f"{index} {block['regularizer']} {block['placement']} {block['rate']:.2f} {momentum}"

"""The configurations a tuned one is compared with, for the robust recommendation.

Each is trained again over the same seeds as the top configurations (`autotune.run.robust`), and
reported beside them, never recommended:

    bn_only            every block without a regulariser: BN alone
    dropout_only       every BN layer removed (the weight layer before it gets a bias), plain
                       dropout at rate 0.5 after every activation: the network before BN
    dropout_after_act  plain dropout at rate 0.5 after every activation, the textbook place
    current            the user's own configuration (recommend.current), when given

In an imported model a block whose BN is not followed by an activation of its own (the second
BN of a residual branch, whose output meets the shortcut first) has no `after_act` slot: the
dropout baselines leave that block without a regulariser. No torch: a session reads
recommend.current here before its first trial, so a bad file is said at once.
"""

from __future__ import annotations

from typing import NamedTuple

from autotune.core.files import read_yaml
from autotune.core.space import BlockConfig, SearchSpace, TrialConfig, block_slots
from autotune.core.space_files import config_from_mapping
from autotune.core.spec import Spec

BASELINE_RATE = 0.5  # Srivastava et al. (JMLR 2014) for hidden units


class Candidate(NamedTuple):
    """A configuration trained again: a top trial's (`trial` its number) or a baseline's."""

    name: str
    trial: int | None
    config: TrialConfig
    batchnorm: bool = True  # False: the network with its BN layers removed


def baselines(spec: Spec, space: SearchSpace) -> list[Candidate]:
    """The configurations a tuned one is compared with."""
    n_blocks = len(space.blocks)
    slots = space.slots or block_slots(spec.model.template, n_blocks, None)
    after_act = TrialConfig(
        tuple(
            BlockConfig("after_act", BASELINE_RATE, "dropout")
            if "after_act" in slot.placements
            else BlockConfig()
            for slot in slots
        )
    )
    rows = [
        Candidate("bn_only", None, TrialConfig(tuple(BlockConfig() for _ in range(n_blocks)))),
        Candidate("dropout_only", None, after_act, batchnorm=False),
        Candidate("dropout_after_act", None, after_act),
    ]
    current = spec.recommend.current  # resolved against the spec's folder, and there
    if current is not None:
        raw = read_yaml(current, what="recommend.current")
        config = config_from_mapping(raw, n_blocks=n_blocks, slots=slots, source=str(current))
        rows.append(Candidate("current", None, config))
    return rows

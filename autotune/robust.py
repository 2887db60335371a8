"""A recommendation that is not one lucky trial.

The top_k configurations of the study, and beside them the baselines a user would compare
against, are each trained again over several seeds under the same budget: the same data, epochs,
optimiser and learning rate, only the seed of the initialisation differs (the spec's seed first,
which reproduces the trial itself). The recommendation is the configuration with the best mean,
or the best one-sided 95 % confidence bound of the mean (Student's t). Baselines are reported,
never recommended:

    bn_only            every block without a regulariser: BN alone
    dropout_only       every BN layer removed (the weight layer before it gets a bias), plain
                       dropout at rate 0.5 after every activation: the network before BN
    dropout_after_act  plain dropout at rate 0.5 after every activation, the textbook place
    current            the user's own configuration (recommend.current), when given

In an imported model a block whose BN is not followed by an activation of its own (the second
BN of a residual branch, whose output meets the shortcut first) has no `after_act` slot: the
dropout baselines leave that block without a regulariser.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

import optuna

from autotune.files import read_yaml
from autotune.names import CONFIG_ATTR, RECALIBRATE_ATTR, ROBUST_ATTR, WEIGHTS_DIGEST, trial_weights
from autotune.space import (
    BlockConfig,
    SearchSpace,
    TrialConfig,
    block_slots,
    config_from_mapping,
)
from autotune.spec import Spec
from autotune.study import Session, best_trial, top_trials

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


def robust_recommendation(session: Session) -> dict[str, Any] | None:
    """Train the top configurations and the baselines again over the seeds; keep the result in
    the study (trained again only when what would be trained changes); None when the spec asks
    for none. A fit that fails (a diverging seed) marks its row failed, out of the choice."""
    from autotune.training import fit

    spec, study = session.spec, session.study
    wanted = spec.recommend
    if wanted.top_k == 0 or best_trial(study) is None:
        return None
    top = distinct_top(study, wanted.top_k)
    seeds = [spec.train.seed + i for i in range(wanted.seeds)]
    candidates = [Candidate(f"trial {t.number}", t.number, _config(t)) for t in top]
    candidates += [
        row for row in baselines(spec, session.space) if wanted.baselines or row.name == "current"
    ]
    signature = signature_of(spec, candidates, seeds)
    stored = study.user_attrs.get(ROBUST_ATTR)
    if stored is not None and stored.get("signature") == signature:
        return _choose(stored, wanted.by, study)  # `by` alone changed: no training needed
    session.tracker.notify(
        f"recommending by the {wanted.by} over {len(seeds)} seeds: training "
        f"{len(candidates)} configurations again, {len(candidates) * len(seeds)} fits"
    )
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = []
    for name, number, config, batchnorm in candidates:
        row: dict[str, Any] = {"name": name, "trial": number, "blocks": config.to_dicts()}
        row["recalibrate_bn"] = config.recalibrate_bn
        if not batchnorm:
            row["batchnorm"] = False
        values: list[float] = []
        for seed in seeds:
            seeded = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})})
            try:
                result = fit(seeded, config, session.datamodule, batchnorm=batchnorm)
            except Exception as exc:  # NonFiniteLossError, ...: this configuration's record
                row["failed"] = f"seed {seed}: {type(exc).__name__}: {exc}"
                break
            values.append(float(result.value))
            if number is not None and seed == spec.train.seed:
                own = study.trials[number].user_attrs.get(WEIGHTS_DIGEST)
                row[WEIGHTS_DIGEST] = _keep_weights(spec, number, result.model, own)
        row["values"] = values
        if "failed" not in row:
            row.update(summary(values, maximize))
        rows.append(row)
    result = {"seeds": seeds, "signature": signature, "rows": rows}
    return _choose(result, wanted.by, study)


def _choose(result: dict[str, Any], by: str, study: optuna.Study) -> dict[str, Any]:
    """The tuned configuration with the best mean or bound (None when every one failed)."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    tuned = [r for r in result["rows"] if r["trial"] is not None and "failed" not in r]
    key = "mean" if by == "mean" else "bound"
    pick = (max if maximize else min)(tuned, key=lambda r: r[key]) if tuned else None
    result = {**result, "by": by, "choice": None if pick is None else pick["trial"]}
    study.set_user_attr(ROBUST_ATTR, result)
    return result


def distinct_top(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best complete trials with different configurations (TPE may try one twice)."""
    seen, top = set(), []
    for trial in top_trials(study, len(study.trials)):
        key = repr(_config(trial))
        if key not in seen:
            seen.add(key)
            top.append(trial)
        if len(top) == k:
            break
    return top


def signature_of(spec: Spec, candidates: list[Candidate], seeds: list[int]) -> dict[str, Any]:
    """What the result depends on: what is trained, on which seeds, how."""
    train = spec.train.model_dump(mode="json", exclude={"seed"})
    return {
        "candidates": [
            [row.name, row.trial, repr(row.config), row.batchnorm] for row in candidates
        ],
        "seeds": seeds,
        "train": train,
    }


def current_ranking(study: optuna.Study, spec: Spec) -> dict[str, Any] | None:
    """The stored robust ranking while it still answers the spec: recommend.top_k asks for one
    and it was made from today's top configurations; else None."""
    stored = study.user_attrs.get(ROBUST_ATTR)
    if spec.recommend.top_k == 0 or stored is None:
        return None
    trained = [row[1] for row in stored["signature"]["candidates"] if row[1] is not None]
    today = [t.number for t in distinct_top(study, spec.recommend.top_k)]
    return stored if trained == today else None


def current_choice(study: optuna.Study, spec: Spec) -> int | None:
    """The stored robust choice while it still answers the spec (current_ranking)."""
    ranking = current_ranking(study, spec)
    return None if ranking is None else ranking.get("choice")


def summary(values: list[float], maximize: bool) -> dict[str, float]:
    """mean, standard deviation, and the one-sided 95 % bound of the mean on the side that
    counts against it (lower for a value to maximise)."""
    from scipy import stats

    mean, sd = statistics.mean(values), statistics.stdev(values)
    margin = stats.t.ppf(0.95, len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "sd": sd, "bound": mean - margin if maximize else mean + margin}


def recommended_trial(study: optuna.Study, spec: Spec) -> optuna.trial.FrozenTrial | None:
    """The trial the study recommends: the robust choice when there is a current one, else the
    best trial."""
    choice = current_choice(study, spec)
    return study.trials[choice] if choice is not None else best_trial(study)


def _config(trial: optuna.trial.FrozenTrial) -> TrialConfig:
    return TrialConfig.from_dicts(
        trial.user_attrs[CONFIG_ATTR], recalibrate_bn=trial.user_attrs.get(RECALIBRATE_ATTR, False)
    )


def _keep_weights(spec: Spec, number: int, model: Any, own: str | None) -> str:
    """The run with the spec's own seed trained the trial's network again (exactly, where the
    data come in the same order, as autotune's own datasets do). Where the trial's own weights
    are not here, or cannot be told to be its own (no digest), keep these; return the digest of
    the file kept, which the export checks."""
    from autotune.export import file_digest, save_tensors

    path = trial_weights(spec.output_dir, number)
    if path.exists() and own is not None and file_digest(path) == own:
        return own
    return save_tensors(model.state_dict(), path)


def kept_digest(study: optuna.Study, number: int) -> str | None:
    """The digest of the weights the robust phase kept for trial `number`, if it kept any."""
    stored = study.user_attrs.get(ROBUST_ATTR) or {}
    for row in stored.get("rows", []):
        if row["trial"] == number:
            return row.get(WEIGHTS_DIGEST)
    return None

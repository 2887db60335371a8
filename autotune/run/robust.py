"""A recommendation that is not one lucky trial.

The top_k configurations of the study, and beside them the baselines a user would compare
against (`autotune.core.baselines`), are each trained again over several seeds under the same
budget: the same data, epochs, optimiser and learning rate, only the seed of the initialisation
differs (the spec's seed first, which reproduces the trial itself). The chosen tuned
configuration is the one with the best mean, or the best one-sided 95 % confidence bound of the
mean (Student's t). It is recommended only where it beats the best baseline beyond the noise,
by a paired t test over the seeds (`against_baselines`); otherwise the simplest baseline that is
as good is, with its weights from the spec's seed. The result is kept in the study
(names.ROBUST_ATTR), where `autotune.search.queries` reads it.

Training imports Lightning, which takes seconds: it is imported by the function that trains, not
with this module, which the end of every study (autotune.run.finish) imports.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from autotune.core.baselines import Candidate, baselines
from autotune.core.direction import best_of, maximizes
from autotune.core.names import ROBUST_ATTR, WEIGHTS_DIGEST, baseline_weights, trial_weights
from autotune.core.spec import AUTO_FOLD_ROWS, AUTO_FOLDS, AUTO_SHARE, MAX_SEED, Spec
from autotune.run.session import Session
from autotune.search.queries import (
    FINISHED,
    best_trial,
    distinct_top,
    held_out_key,
    trial_config,
)

if TYPE_CHECKING:
    from torch import nn


def robust_recommendation(session: Session) -> dict[str, Any] | None:
    """Train the top configurations and the baselines again over the seeds; keep the result in
    the study (trained again only when what would be trained changes); None when the spec asks
    for none. A fit that fails (a diverging seed) marks its row failed, out of the choice."""
    from autotune.nn.data import test_batches  # Lightning: imported when the fits begin
    from autotune.nn.fitting import evaluate, fit
    from autotune.nn.weights import save_tensors
    from autotune.outputs.recommendation import folds_said

    spec, study = session.spec, session.study
    wanted = spec.recommend
    if wanted.wanted_top_k == 0 or best_trial(study) is None:
        return None
    top = distinct_top(study, wanted.wanted_top_k)
    runs, resampled = resampling(spec, session.datamodule)
    seeds = [seed for seed, _ in runs]
    candidates = [Candidate(f"trial {t.number}", t.number, trial_config(t)) for t in top]
    candidates += [
        row for row in baselines(spec, session.space) if wanted.baselines or row.name == "current"
    ]
    signature = {**signature_of(spec, candidates, seeds), "folds": resampled}
    stored = study.user_attrs.get(ROBUST_ATTR)
    if stored is not None and stored.get("signature") == signature:
        return _choose(stored, wanted.by, study)  # `by` alone changed: no training needed
    fits = len(candidates) * len(runs)
    cost, spent = fit_cost(study, fits)
    if wanted.top_k is None and seeds[-1] > MAX_SEED:
        session.tracker.notify(f"no re-ranking over seeds: seed {seeds[-1]} is past {MAX_SEED}")
        return None
    if wanted.top_k is None and cost > AUTO_SHARE * spent:  # the budget does not allow it
        session.tracker.notify(
            f"no re-ranking over seeds: its {fits} fits would take about {_took(cost)}, longer "
            f"than the study's trials took ({_took(spent)}); set recommend.top_k to ask for it"
        )
        return None
    over = f"{len(seeds)} seeds" if resampled is None else folds_said(resampled)
    session.tracker.notify(
        f"recommending by the {wanted.by} over {over}: training "
        f"{len(candidates)} configurations again, {fits} fits, about {_took(cost)}"
    )
    maximize = maximizes(study)
    correction = 0.0 if resampled is None else resampled["correction"]
    held_out = test_batches(session.datamodule)
    scored = f"val_{held_out_key(spec.study.metric)}"  # what evaluate() names it
    rows = []
    for name, number, config, batchnorm in candidates:
        row: dict[str, Any] = {"name": name, "trial": number, "blocks": config.to_dicts()}
        row["recalibrate_bn"] = config.recalibrate_bn
        if not batchnorm:
            row["batchnorm"] = False
        values: list[float] = []
        tested: list[float] = []  # on the test split: kept, never read by the choice
        for i, (seed, datamodule) in enumerate(runs):
            seeded = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})})
            try:
                result = fit(seeded, config, datamodule, batchnorm=batchnorm)
            except Exception as exc:  # NonFiniteLossError, ...: this configuration's record
                where = f"seed {seed}" if resampled is None else f"fold {i}"
                row["failed"] = f"{where}: {type(exc).__name__}: {exc}"
                break
            values.append(float(result.value))
            if held_out is not None:
                tested.append(evaluate(result.model, held_out)[scored])
            if datamodule is session.datamodule and seed == spec.train.seed:  # the trial's own
                if number is not None:
                    own = study.trials[number].user_attrs.get(WEIGHTS_DIGEST)
                    row[WEIGHTS_DIGEST] = _keep_weights(spec, number, result.model, own)
                elif batchnorm:  # a baseline that may be recommended
                    path = baseline_weights(spec.output_dir, name)
                    row[WEIGHTS_DIGEST] = save_tensors(result.model.state_dict(), path)
        row["values"] = values
        if tested:
            row["test_values"] = tested
        if "failed" not in row:
            row.update(seed_statistics(values, maximize, correction))
        rows.append(row)
    result = {"seeds": seeds, "folds": resampled, "correction": correction}
    result = _choose({**result, "signature": signature, "rows": rows}, wanted.by, study)
    _keep_baseline_weights(session, result, candidates)
    return result


def resampling(spec: Spec, datamodule: Any) -> tuple[list[tuple[int, Any]], dict | None]:
    """What each configuration is trained on again: (seed, datamodule) per fit, and the folds
    ({"folds", "repeats", "correction"}) or None for seeds on the study's own split.
    recommend.folds null: folds where the data is in memory and has at most AUTO_FOLD_ROWS
    training and validation rows, else seeds."""
    from autotune.nn.folds import folds, held_out_share  # torch

    wanted = spec.recommend
    rows = len(getattr(datamodule, "y_train", ())) + len(getattr(datamodule, "y_val", ()))
    k = wanted.folds if wanted.folds is not None else (AUTO_FOLDS if rows <= AUTO_FOLD_ROWS else 0)
    made = folds(datamodule, k, wanted.repeats, seed=spec.train.seed) if k >= 2 else None
    if made is None:
        return [(spec.train.seed + i, datamodule) for i in range(wanted.seeds)], None
    said = {"folds": k, "repeats": wanted.repeats, "correction": held_out_share(made[0])}
    return [(spec.train.seed, fold) for fold in made], said


def _keep_baseline_weights(
    session: Session, result: dict[str, Any], candidates: list[Candidate]
) -> None:
    """A recommended baseline's weights from the spec's seed on the study's own split, where
    the fits did not leave them (folds): one more fit."""
    from autotune.nn.fitting import fit
    from autotune.nn.weights import save_tensors

    name = (result.get("verdict") or {}).get("recommend")
    row = next((r for r in result["rows"] if r["name"] == name), None)
    if row is None or row.get(WEIGHTS_DIGEST):
        return
    config = next(c.config for c in candidates if c.name == name)
    model = fit(session.spec, config, session.datamodule).model
    path = baseline_weights(session.spec.output_dir, name)
    row[WEIGHTS_DIGEST] = save_tensors(model.state_dict(), path)
    session.study.set_user_attr(ROBUST_ATTR, result)


def fit_cost(study: optuna.Study, fits: int) -> tuple[float, float]:
    """(seconds `fits` full trainings would take, at the mean of the complete trials' times;
    seconds the study's finished trials took in all)."""
    finished = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.duration]
    complete = [t.duration.total_seconds() for t in finished if t.state == TrialState.COMPLETE]
    spent = sum(t.duration.total_seconds() for t in finished)
    return (statistics.mean(complete) * fits if complete else math.inf), spent


def _took(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _choose(result: dict[str, Any], by: str, study: optuna.Study) -> dict[str, Any]:
    """The tuned configuration with the best mean or bound (None when every one failed)."""
    tuned = [r for r in result["rows"] if r["trial"] is not None and "failed" not in r]
    key = "mean" if by == "mean" else "bound"
    pick = best_of(tuned, maximizes(study), key=lambda r: r[key]) if tuned else None
    result = {**result, "by": by, "choice": None if pick is None else pick["trial"]}
    baselines = [r for r in result["rows"] if r["trial"] is None and "failed" not in r]
    if pick is not None and baselines:
        correction = result.get("correction") or 0.0
        result["verdict"] = against_baselines(pick, baselines, maximizes(study), correction)
    study.set_user_attr(ROBUST_ATTR, result)
    return result


def against_baselines(
    pick: dict[str, Any], baselines: list[dict[str, Any]], maximize: bool, correction: float = 0.0
) -> dict[str, Any]:
    """Whether the tuned pick beats the best baseline beyond the noise, by a paired Student's t
    test over the seeds (each seed trains both from the same start and the same batches): it does
    when the one-sided 95 % bound of the mean difference is past 0. Where it does not, the
    simplest baseline (SIMPLEST) that the pick does not beat is as good, and is recommended
    instead (`recommend`) where it keeps BN: the network without BN is the user's own model
    changed, which the export does not write."""
    best = best_of(baselines, maximize, key=lambda r: r["mean"])
    versus = {
        row["name"]: paired(pick["values"], row["values"], maximize, correction)
        for row in baselines
    }
    beats = versus[best["name"]]["bound"] > 0
    order = sorted(baselines, key=lambda r: SIMPLEST.index(r["name"]))
    as_good = None if beats else next(r for r in order if versus[r["name"]]["bound"] <= 0)
    recommend = as_good is not None and as_good.get("batchnorm", True)
    return {
        "test": "paired Student's t over the seeds, one-sided 95 %"
        if not correction
        else "Nadeau and Bengio's corrected paired t over the folds, one-sided 95 %",
        "against": best["name"],
        **versus[best["name"]],
        "beats": beats,
        "as_good": None if as_good is None else as_good["name"],
        "recommend": as_good["name"] if recommend else None,
    }


def paired(
    ours: list[float], theirs: list[float], maximize: bool, correction: float = 0.0
) -> dict[str, float]:
    """The mean difference ours - theirs over the same seeds (signed so that above 0 is better),
    its margin (the one-sided 95 % t quantile times its standard error) and the bound that
    margin leaves."""
    sign = 1.0 if maximize else -1.0
    diffs = [sign * (a - b) for a, b in zip(ours, theirs, strict=True)]
    mean, margin = statistics.mean(diffs), t_margin(diffs, 0.95, correction)
    return {"difference": mean, "margin": margin, "bound": mean - margin}


# the baselines from the simplest: the one a user would try first
SIMPLEST = ("bn_only", "dropout_after_act", "dropout_only", "current")


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


def seed_statistics(
    values: list[float], maximize: bool, correction: float = 0.0
) -> dict[str, float]:
    """mean, standard deviation, and the one-sided 95 % bound of the mean on the side that
    counts against it (lower for a value to maximise)."""
    mean, sd = statistics.mean(values), statistics.stdev(values)
    margin = t_margin(values, 0.95, correction)
    return {"mean": mean, "sd": sd, "bound": mean - margin if maximize else mean + margin}


def t_margin(values: list[float], quantile: float, correction: float = 0.0) -> float:
    """Student's t quantile (n - 1 degrees of freedom) times the standard error of the mean of
    `values`: a one-sided bound's margin at 0.95, half a two-sided 95 % interval at 0.975; 0
    for fewer than two values. `correction`: over resampled folds, whose training sets overlap,
    the variance of the mean is that of n independent values times 1 + n · n_val / n_train
    (Nadeau and Bengio's corrected resampled t, Machine Learning 52, 2003): its n_val/n_train."""
    from scipy import stats

    if len(values) < 2:
        return 0.0
    n = len(values)
    spread = statistics.stdev(values) * math.sqrt(1 / n + correction)
    return float(stats.t.ppf(quantile, len(values) - 1)) * spread


def _keep_weights(spec: Spec, number: int, model: nn.Module, own: str | None) -> str:
    """The run with the spec's own seed trained the trial's network again (exactly, where the
    data come in the same order, as autotune's own datasets do). Where the trial's own weights
    are not here, or cannot be told to be its own (no digest), keep these; return the digest of
    the file kept, which the export checks."""
    from autotune.nn.weights import file_digest, save_tensors  # torch

    path = trial_weights(spec.output_dir, number)
    if path.exists() and own is not None and file_digest(path) == own:
        return own
    return save_tensors(model.state_dict(), path)

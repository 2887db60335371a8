"""A recommendation that is not one lucky trial.

The top_k configurations of the study, and beside them the baselines a user would compare
against, are each trained again over several seeds under the same budget: the same data, epochs,
optimiser and learning rate, only the seed of the initialisation differs (the spec's seed first,
which reproduces the trial itself). The recommendation is the configuration with the best mean,
or the best one-sided 95 % confidence bound of the mean (Student's t). Baselines are reported,
never recommended:

    bn_only            every block without a regulariser: BN alone
    dropout_after_act  plain dropout at rate 0.5 after every activation, the textbook place
    current            the user's own configuration (recommend.current), when given

Dropout without BN is not among them: the templates always have BN.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna

from autotune.space import BlockConfig, TrialConfig, config_from_mapping
from autotune.spec import Spec, read_yaml
from autotune.study import Session, best_trial, top_trials

ROBUST_ATTR = "robust"  # the study user attr that keeps the result
BASELINE_RATE = 0.5  # Srivastava et al. (JMLR 2014) for hidden units


def baselines(spec: Spec, n_blocks: int) -> list[tuple[str, TrialConfig]]:
    """The configurations a tuned one is compared with."""
    rows = [
        ("bn_only", TrialConfig(tuple(BlockConfig() for _ in range(n_blocks)))),
        (
            "dropout_after_act",
            TrialConfig(
                tuple(
                    BlockConfig("after_act", BASELINE_RATE, "dropout", BlockConfig().bn_momentum)
                    for _ in range(n_blocks)
                )
            ),
        ),
    ]
    current = spec.recommend.current
    if current is not None:
        path = current if current.is_absolute() else spec.base_dir / current
        raw = read_yaml(path, what="recommend.current")
        config = config_from_mapping(
            raw, n_blocks=n_blocks, template=spec.model.template, source=str(path)
        )
        rows.append(("current", config))
    return rows


def robust_recommendation(session: Session) -> dict[str, Any] | None:
    """Train the top configurations and the baselines again over the seeds; keep the result in
    the study (computed again only when the top configurations change); None when the spec
    asks for none."""
    from autotune.training import fit

    spec, study = session.spec, session.study
    wanted = spec.recommend
    if wanted.top_k == 0 or best_trial(study) is None:
        return None
    top = top_trials(study, wanted.top_k)
    seeds = [spec.train.seed + i for i in range(wanted.seeds)]
    signature = {"trials": [t.number for t in top], "seeds": seeds, "by": wanted.by}
    stored = study.user_attrs.get(ROBUST_ATTR)
    if stored is not None and stored.get("signature") == signature:
        return stored
    candidates: list[tuple[str, int | None, TrialConfig]] = [
        (f"trial {t.number}", t.number, _config(t)) for t in top
    ]
    if wanted.baselines or wanted.current is not None:
        n_blocks = len(spec.model.resolved_widths)
        chosen = baselines(spec, n_blocks)
        candidates += [
            (name, None, config) for name, config in chosen if wanted.baselines or name == "current"
        ]
    session.tracker.notify(
        f"recommending by the {wanted.by} over {len(seeds)} seeds: training "
        f"{len(candidates)} configurations again, {len(candidates) * len(seeds)} fits"
    )
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = []
    for name, number, config in candidates:
        values = []
        for seed in seeds:
            seeded = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})})
            result = fit(seeded, config, session.datamodule)
            values.append(float(result.value))
            if number is not None and seed == spec.train.seed:
                _keep_weights(spec, number, result.model)
        rows.append(
            {
                "name": name,
                "trial": number,
                "blocks": config.to_dicts(),
                "recalibrate_bn": config.recalibrate_bn,
                "values": values,
                **summary(values, maximize),
            }
        )
    tuned = [row for row in rows if row["trial"] is not None]
    key = "mean" if wanted.by == "mean" else "bound"
    pick = (max if maximize else min)(tuned, key=lambda row: row[key])
    result = {"by": wanted.by, "seeds": seeds, "signature": signature, "choice": pick["trial"]}
    result["rows"] = rows
    study.set_user_attr(ROBUST_ATTR, result)
    return result


def summary(values: list[float], maximize: bool) -> dict[str, float]:
    """mean, standard deviation, and the one-sided 95 % bound of the mean on the side that
    counts against it (lower for a value to maximise)."""
    from scipy import stats

    mean, sd = statistics.mean(values), statistics.stdev(values)
    margin = stats.t.ppf(0.95, len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "sd": sd, "bound": mean - margin if maximize else mean + margin}


def recommended_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial the study recommends: the robust choice when there is one, else the best."""
    robust = study.user_attrs.get(ROBUST_ATTR)
    if robust is not None and robust.get("choice") is not None:
        return study.trials[robust["choice"]]
    return best_trial(study)


def _config(trial: optuna.trial.FrozenTrial) -> TrialConfig:
    return TrialConfig.from_dicts(
        trial.user_attrs["config"], recalibrate_bn=trial.user_attrs.get("recalibrate_bn", False)
    )


def _keep_weights(spec: Spec, number: int, model: Any) -> None:
    """A top trial that was never the best so far had its weights unsaved; the run with the
    spec's own seed trained the same network again (exactly, where the data come in the same
    order, as autotune's own datasets do): keep it where the export looks."""
    import torch

    path = spec.output_dir / "weights" / f"trial_{number}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)

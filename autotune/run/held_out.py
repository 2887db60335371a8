"""The test split, scored once, at the end of a study, after every choice was made.

No trial, pruner or re-ranking sees the test split (data.test_fraction): the trials train and
are ranked on the training and validation splits, and the robust recommendation chooses on
validation too. Then two things are scored on it, once each:

- the recommended trial's own saved weights, the network a user gets, with a 95 % interval over
  the test rows: Wilson's for the accuracy, the normal one of the mean for the loss;
- where the robust recommendation trained configurations again (autotune.run.robust), each fit
  of each configuration and baseline, right after it trained: a mean over the fits with a 95 %
  interval (`seed_interval`). For an accuracy the interval holds both of its noises: the fits'
  spread (Student's t) and the test rows' own sampling, which every fit shares and no number of
  seeds averages away (the binomial's normal approximation); they add in quadrature.

The result is kept in the study (names.TEST_ATTR), where recommended.yaml, the summary, the
report and the parent run read it. torch is imported by the functions that score.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

from autotune.core.names import ROBUST_ATTR, TEST_ATTR
from autotune.core.space import TrialConfig
from autotune.search.queries import (
    current_ranking,
    current_scores,
    held_out_key,
    recommended_config,
    recommended_weights,
)

if TYPE_CHECKING:
    from torch import nn

    from autotune.run.session import Session

Z95 = 1.959964  # the two-sided 95 % quantile of the standard normal


def score_recommendation(session: Session) -> dict[str, Any] | None:
    """The recommended trial's saved weights and the robust ranking's fits on the test split,
    kept in the study; None where there is no test split or nothing to score."""
    from autotune.nn.data import test_batches  # torch

    study, spec = session.study, session.spec
    batches = test_batches(session.datamodule)
    chosen = recommended_config(study, spec)
    if batches is None or chosen is None:
        return None
    name, config = chosen
    result: dict[str, Any] = {"recommended": name, **_score_weights(session, config, batches)}
    val_rows = len(getattr(session.datamodule, "y_val", ()))
    if val_rows:  # what one validation row is worth: the noise floor of a validation score
        result["val_rows"] = val_rows
    robust = study.user_attrs.get(ROBUST_ATTR) or {}
    rows = [row for row in robust.get("rows", []) if row.get("test_values")]
    if rows and current_ranking(study, spec) is not None:
        accuracy = held_out_key(spec.study.metric) == "acc"
        test_rows = result.get("rows") or sum(len(y) for _, y, *_ in batches)
        result["robust"] = [
            {
                "name": row["name"],
                "trial": row["trial"],
                **seed_interval(
                    row["test_values"],
                    (0.0, 1.0) if accuracy else None,
                    rows=test_rows if accuracy else None,
                ),
            }
            for row in rows
        ]
    study.set_user_attr(TEST_ATTR, result)
    return result


def _score_weights(session: Session, config: TrialConfig, batches: Any) -> dict[str, Any]:
    """accuracy and loss of the recommendation's own weights on the test rows, with their
    intervals; or why they could not be scored (trained on another node)."""
    import torch

    from autotune.nn.models import build_model
    from autotune.nn.weights import own_weights

    spec = session.spec
    path, absent = own_weights(*recommended_weights(session.study, spec))
    if path is None:
        return {"scored": False, "why": absent}
    datamodule = session.datamodule
    model = build_model(
        spec.model,
        config,
        datamodule.input_shape,
        datamodule.n_classes,
        base_dir=spec.base_dir,
    )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return {"scored": True, **row_scores(model, batches)}


def row_scores(model: nn.Module, batches: Any) -> dict[str, Any]:
    """accuracy and mean cross-entropy of `model` in eval mode over labelled batches, each with
    its 95 % interval over the rows (Wilson's; the normal one of the mean)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    correct, losses = [], []
    with torch.no_grad():
        for x, y, *_ in batches:
            model.to(x.device)
            logits = model(x)
            correct.append((logits.argmax(dim=1) == y).double().cpu())
            losses.append(F.cross_entropy(logits, y, reduction="none").double().cpu())
    model.train(was_training)
    hits, loss = torch.cat(correct), torch.cat(losses)
    n = len(hits)
    spread = float(loss.std()) if n > 1 else 0.0
    mean_loss = float(loss.mean())
    return {
        "rows": n,
        "acc": float(hits.mean()),
        "acc_interval": list(wilson(int(hits.sum()), n)),
        "loss": mean_loss,
        "loss_interval": [
            mean_loss - Z95 * spread / math.sqrt(n),
            mean_loss + Z95 * spread / math.sqrt(n),
        ],
    }


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval of a proportion: unlike the normal one, it does not shrink
    to a point at 0 or 100 %."""
    p, z2 = successes / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def seed_interval(
    values: list[float],
    bounds: tuple[float, float] | None = None,
    rows: int | None = None,
) -> dict[str, Any]:
    """The mean over fits and its two-sided 95 % interval, cut to `bounds` (an accuracy's 0 and
    1) where given. Without `rows` that is Student's t over the fits alone. With `rows`, the
    values are accuracies on the same `rows` test rows, and the interval adds the rows' sampling
    to the fits' spread in quadrature: the fits' spread says how much the seed matters, the rows'
    how far this test split is from the next one."""
    from autotune.run.robust import t_margin

    mean, half = statistics.mean(values), t_margin(values, 0.975)
    if rows:
        half = math.hypot(half, Z95 * math.sqrt(mean * (1 - mean) / rows))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "interval": [low, high], "values": values}


def held_out_metrics(study: Any, spec: Any) -> dict[str, float]:
    """The parent run's metrics of the test split: test_acc and test_loss with their bounds."""
    stored = current_scores(study, spec)
    if stored is None or not stored.get("scored"):
        return {}
    metrics = {}
    for key in ("acc", "loss"):
        low, high = stored[f"{key}_interval"]
        metrics.update(
            {f"test_{key}": stored[key], f"test_{key}.low": low, f"test_{key}.high": high}
        )
    return metrics

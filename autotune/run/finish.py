"""The end of a study: the robust recommendation once the study reached its budget, then the
MLflow parent run ended by one function, `end_parent_run`, whether at the end of a run
(`finish_study`) or later by `autotune sync` (`sync_parent_run`, for a parent its run left
RUNNING): the outputs written, the pictures drawn, MLflow made whole, and on the parent the best
value, the robust ranking, the recommendation as tags, how far the study got, the files, the
pictures, and its status (`parent_status`).

The export imports torch (seconds): it is imported when the outputs are written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.core.errors import WriteError
from autotune.core.names import (
    BEST_MODEL,
    BEST_TRIAL_TAG,
    BUDGET_TAG,
    FIGURES_DIR,
    INPUT_STATS,
    RECALIBRATE_ATTR,
    RECOMMENDATION_TAG,
    RECOMMENDED_TAG,
    RECOMMENDED_YAML,
)
from autotune.core.space import TrialConfig
from autotune.core.spec import Spec
from autotune.outputs.report import write_figures
from autotune.run.held_out import held_out_metrics, score_recommendation
from autotune.run.robust import robust_recommendation
from autotune.run.session import Session, StudyOutcome
from autotune.search.mlflow_store import RecommendedModel
from autotune.search.queries import (
    best_trial,
    count_finished,
    current_ranking,
    recommended_config,
    recommended_trial,
    recommended_weights,
)
from autotune.search.sync import sync_study
from autotune.search.tracking import Tracker


def finish_study(session: Session, outcome: StudyOutcome) -> None:
    """The end of a run: the robust recommendation when the study reached its budget, then the
    parent run ended (end_parent_run). The last worker standing also makes MLflow whole: a dead
    worker's trial, a trial that another worker could not log.

    A file that cannot be written (WriteError) ends the parent run FAILED and is raised: the
    same command, once the disk takes writes, writes the outputs again."""
    tracker = session.tracker
    try:
        if not outcome.interrupted and outcome.finished >= outcome.budget:
            try:
                robust_recommendation(session)  # kept in the study, where the end finds it
            except WriteError:
                raise
            except (Exception, KeyboardInterrupt, SystemExit) as exc:  # the study is done
                tracker.notify(f"no robust recommendation ({exc!r}): the best trial is recommended")
            try:  # once every choice is made: the test split, scored once
                score_recommendation(session)
            except WriteError:
                raise
            except Exception as exc:
                tracker.notify(f"the test split was not scored: {exc!r}")
        end_parent_run(session.study, session.spec, tracker, outcome)
    except WriteError:
        tracker.end_study({}, {}, [], status="FAILED")
        raise
    if tracker.fault is not None:  # the local MLflow store's disk, while the parent was ended
        raise tracker.fault
    if tracker.down_since is not None:
        tracker.notify(
            f"MLflow at {tracker.shown_uri} still does not answer: when it does, "
            "`autotune sync` with this spec logs what it missed"
        )


def end_parent_run(
    study: optuna.Study, spec: Spec, tracker: Tracker, outcome: StudyOutcome
) -> None:
    """What the end of a study gives its parent run, at the end of a run (finish_study) or
    later by `autotune sync` (sync_parent_run): the recommendation written from the trials that
    completed (write_outputs: weights trained on another node are said to be absent), the
    pictures drawn, MLflow made whole from the storage when no trial is running, then on the
    parent run the best value, the robust ranking, the recommendation as tags, how far the study
    got, the files, the pictures, and its status (parent_status). `outcome.outputs` is set to
    the files written.

    Raises WriteError, before the parent run is touched, when a file cannot be written."""
    from autotune.outputs.export import Unverified, rewrite_if_run_moved, write_outputs  # torch

    def files_written(write: Callable[[], list[Path]]) -> list[Path]:
        """The files `write` wrote; what the user's factory left unverified is said, not
        raised."""
        try:
            return list(write())
        except Unverified as exc:
            tracker.notify(str(exc))
            return exc.written

    best = best_trial(study)
    if best is not None:
        outcome.outputs = files_written(lambda: write_outputs(study, spec))
    try:  # pictures are a courtesy: a run that finished must still end in MLflow
        figures = write_figures(study, spec.output_dir / FIGURES_DIR, spec.study.metric)
    except WriteError:
        raise
    except Exception as exc:
        tracker.notify(f"the study's pictures were not drawn: {exc!r}")
        figures = []
    if tracker.enabled and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            sync_study(tracker, study, spec.study.metric)
            tracker.answered()
        except Exception as exc:
            tracker.went_down(exc)
        if outcome.outputs:  # the recommended trial's run may be one sync just replaced
            outcome.outputs = (
                files_written(lambda: rewrite_if_run_moved(study, spec)) or outcome.outputs
            )
    metrics = {} if best is None else {f"best_{spec.study.metric}": best.value}
    for row in (current_ranking(study, spec) or {}).get("rows", []):  # baselines beside
        name = row["name"].replace(" ", "_")
        kept = [key for key in ("mean", "sd", "bound") if key in row]  # none: it failed
        metrics.update({f"robust.{name}.{key}": row[key] for key in kept})
    chosen = recommended_trial(study, spec)
    metrics.update(held_out_metrics(study, spec))
    recommended = recommended_config(study, spec)
    tags = (
        {} if chosen is None or recommended is None else recommendation_tags(chosen, *recommended)
    )
    tags[BUDGET_TAG] = f"{outcome.finished}/{outcome.budget}"
    tracker.end_study(
        {**metrics, "finished_trials": outcome.finished},
        tags,
        outcome.outputs,
        status=parent_status(outcome),
        figures=figures,
        model=recommended_model(study, spec) if outcome.outputs else None,
    )
    outcome.experiment_id = tracker.experiment_id


def recommended_model(study: optuna.Study, spec: Spec) -> RecommendedModel | None:
    """What the parent run logs as its model: the files a production model needs from the
    output folder (best_model.py, recommended.yaml, the weights, the input statistics), in the
    folder's layout, and the recommended configuration as params."""
    chosen = recommended_config(study, spec)
    if chosen is None:
        return None
    from autotune.nn.weights import own_weights  # torch, loaded by the export already
    from autotune.outputs.export import relative_to_output

    name, config = chosen
    # the weights best_model.py's load() reads: the recommendation's own, checked by digest
    weights = relative_to_output(own_weights(*recommended_weights(study, spec))[0], spec.output_dir)
    files = (BEST_MODEL, RECOMMENDED_YAML, INPUT_STATS, *([weights] if weights else []))
    params = {**config.to_params(), RECALIBRATE_ATTR: config.recalibrate_bn}
    return RecommendedModel(name, spec.output_dir, files, params)


def sync_parent_run(study: optuna.Study, spec: Spec, tracker: Tracker) -> StudyOutcome | None:
    """`autotune sync`, after the trials: a parent run that its run left RUNNING (MLflow did not
    answer at its end) is ended as that run would have ended it (end_parent_run), against the
    spec's budget, when no trial is running. Returns the outcome it ended the parent with, or
    None when there was nothing to end."""
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return None  # a run is going on: its own end ends the parent
    if tracker.client.get_run(tracker.parent_run_id).info.status != "RUNNING":
        return None
    outcome = StudyOutcome(study, count_finished(study), spec.study.n_trials)
    end_parent_run(study, spec, tracker, outcome)
    return outcome


def parent_status(outcome: StudyOutcome) -> str:
    """The MLflow status the study's parent run ends with. FINISHED only for a study that has
    reached its budget; KILLED for one cut short (interrupted, a timeout, workers that were
    killed), which a rerun sets RUNNING again; FAILED for one that failures in a row stopped."""
    if outcome.interrupted:
        return "KILLED"
    if outcome.finished >= outcome.budget:
        return "FINISHED"
    return "FAILED" if outcome.stopped_by_failures else "KILLED"


def recommendation_tags(best: FrozenTrial, name: str, config: TrialConfig) -> dict[str, Any]:
    """The recommendation on the parent run, under the names the child runs use for their
    params (`autotune.recommended.block0.placement`, ...), with the best trial and what is
    recommended ("trial 7", or a baseline such as "bn_only"): tags, since a resumed study may
    come to recommend another configuration and MLflow params cannot change."""
    tags: dict[str, Any] = {BEST_TRIAL_TAG: best.number, RECOMMENDATION_TAG: name}
    tags.update({RECOMMENDED_TAG.format(k): v for k, v in config.to_params().items()})
    return tags

"""The `study` section of spec.yaml: the study's name, metric, budget, sampler and storage, and
its `pruner`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from autotune.core.spec_fields import Float, Int, Section, file_url_fits, shorthand

METRICS = {"val_acc": "maximize", "val_loss": "minimize", "train_loss": "minimize"}
# the longest a heartbeat setting may be: a worker silent for a day is dead; Optuna turns the
# grace into a datetime.timedelta and its thread waits on the interval, both of bounded range
MAX_HEARTBEAT = 86_400


class PrunerSpec(Section):
    # variance_shift: autotune's pruner (autotune.pruners.VarianceShiftPruner): a gate before
    # training and after the first epoch, on the predicted Δ until trials have trained and on
    # the predicted metric after, then `base` during training, stricter far from Δ = 1.
    # none: every trial trains to the end; median, percentile, hyperband, successive_halving:
    # Optuna's pruners of those names, with epochs as the steps
    name: Literal[
        "variance_shift", "none", "median", "percentile", "hyperband", "successive_halving"
    ] = "variance_shift"
    # variance_shift: the pruner that decides during training
    base: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = "median"
    # variance_shift: what the gate decides on once `learn_after` trials have trained. cost:
    # the final metric predicted from the trials that trained (from the predicted factors and
    # the parameters; after an epoch, also that epoch's metric); delta: the predicted Δ alone
    gate: Literal["cost", "delta"] = "cost"
    # variance_shift, gate cost: keep a trial predicted to land in this top share of the
    # trials that trained
    quantile: Float = Field(0.25, gt=0, lt=1)
    # variance_shift, gate cost: leave-one-out errors of the model added to a trial's predicted
    # metric before it is compared; higher stops fewer trials, and fewer wrongly
    optimism: Float = Field(0.5, ge=0)
    # variance_shift, gate cost: the first epochs after which the gate decides again, knowing
    # the epoch's metric; 3 is the median base's warm-up, before which it stops nothing
    cost_steps: Int = Field(3, ge=0)
    # variance_shift: the worst predicted Δ past which a trial stops before it trains while there
    # is nothing to learn from yet; 0.5 is dropout at rate 0.5 straight before BN on zero-mean
    # inputs. null: no gate
    threshold: Float | None = Field(0.5, gt=0, lt=1)
    # variance_shift: the share of gated trials that train anyway, so the data can overrule the
    # theory; a tenth costs little and shows whether the gate is right
    exploration: Float = Field(0.1, ge=0, le=1)
    # variance_shift, gate delta: learn the threshold from completed trials (no trial more
    # shifted than the best quarter's widest, with 25 % slack) once `learn_after` have completed
    learn_threshold: bool = True
    # variance_shift: trials that trained (gate cost: completed or pruned during training;
    # gate delta: completed) before the gate learns; a cost model needs 3 or more
    learn_after: Int = Field(10, ge=1)
    # variance_shift: a median or percentile base keeps only the top quarter instead of the top
    # half for trials at the threshold (strictness 0.5)
    strictness: Float = Field(0.5, ge=0, lt=1)
    # variance_shift: extra warm-up epochs before the base may stop a trial predicted at Δ = 1.
    # 0: near Δ = 1 the base acts as it is; in the benchmark 2 trained 14 to 34 % more epochs
    # than 0 for the same best metric. Far from 1 the base is stricter either way
    patience: Int = Field(0, ge=0)
    # variance_shift: enqueue this many first trials, the least shifted of 10 times as many
    # random candidates (predicted, not trained); 0: the sampler starts as it likes
    seed_trials: Int = Field(0, ge=0)
    # median, percentile: trials that always run to the end before any is pruned
    n_startup_trials: Int = Field(5, ge=0)
    # median, percentile: epochs a trial always gets; the first epochs of a small net are noisy
    n_warmup_epochs: Int = Field(3, ge=0)
    # percentile: keep trials in the top `percentile` % at each epoch (50 is the median)
    percentile: Float = Field(50.0, gt=0, lt=100)
    # hyperband, successive_halving: the fewest epochs a trial gets before it can be stopped
    min_epochs: Int = Field(1, ge=1)
    # hyperband, successive_halving: keep 1/reduction_factor of the trials at each rung
    reduction_factor: Int = Field(3, ge=2)

    @model_validator(mode="after")
    def _cost_model_has_rows(self) -> PrunerSpec:
        if self.name == "variance_shift" and self.gate == "cost" and self.learn_after < 3:
            raise ValueError(
                f"learn_after ({self.learn_after}) must be at least 3 with gate cost: the cost "
                "model learns from that many completed trials"
            )
        return self


class StudySpec(Section):
    # the Optuna study name and the MLflow parent run's name; a rerun with the same name resumes
    # letters, digits, '.', '_' and '-': the name goes into storage keys and MLflow filters
    name: str = Field("autotune", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    # what the study optimises, measured at the end of every epoch: val_* on the validation split,
    # train_loss as the mean over the epoch's training batches
    metric: Literal["val_acc", "val_loss", "train_loss"] = "val_acc"
    # maximize or minimize; left out, it follows the metric (accuracy up, loss down)
    direction: Literal["maximize", "minimize"] | None = None
    # the study's total budget of finished (complete or pruned) trials, across reruns
    n_trials: Int = Field(20, ge=1)
    # stop starting new trials after this many seconds of this run; none: no limit
    timeout: Float | None = Field(None, gt=0)
    # tpe copes with the conditional per-block space; random is the honest baseline; gp and cmaes
    # model the numeric parameters (cmaes samples categorical ones at random)
    sampler: Literal["tpe", "random", "gp", "cmaes"] = "tpe"
    pruner: PrunerSpec = PrunerSpec()
    # an Optuna storage URL; none: sqlite in the output folder, so a rerun resumes the study
    storage: str | None = None
    # RDB storages: seconds between a running trial's heartbeats, and the silence after which
    # its worker is taken for dead and the trial is failed and run again
    heartbeat_interval: Int = Field(30, ge=1, le=MAX_HEARTBEAT)
    heartbeat_grace: Int = Field(120, ge=2, le=MAX_HEARTBEAT)

    _pruner_shorthand = field_validator("pruner", mode="before")(shorthand)
    _storage_fits = field_validator("storage")(file_url_fits)

    @model_validator(mode="after")
    def _grace_outlasts_a_beat(self) -> StudySpec:
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ValueError(
                f"heartbeat_grace ({self.heartbeat_grace}) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval})"
            )
        return self

    @model_validator(mode="after")
    def _seed_trials_within_budget(self) -> StudySpec:
        # each one costs 10 predictions up front, and more than the budget would never run
        if self.pruner.seed_trials > self.n_trials:
            raise ValueError(
                f"pruner.seed_trials ({self.pruner.seed_trials}) must not exceed "
                f"n_trials ({self.n_trials})"
            )
        return self

    @property
    def resolved_direction(self) -> Literal["maximize", "minimize"]:
        return self.direction or METRICS[self.metric]  # type: ignore[return-value]

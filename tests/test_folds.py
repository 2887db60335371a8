"""Re-ranking on small data: repeated stratified k-fold over the training and validation rows,
the test split out of every fold, and the corrected paired test over the folds."""

from __future__ import annotations

import math
import statistics

import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_spec

from autotune.cli import main
from autotune.core.names import ROBUST_ATTR
from autotune.core.spec import DataSpec, load_spec, parse_spec
from autotune.nn.data import TensorDataModule, load_data
from autotune.nn.folds import folds, held_out_share
from autotune.run.robust import resampling, t_margin
from autotune.search.storage import spec_storage


def rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row.flatten().tolist()) for row in x}


def test_every_row_is_validated_once_per_repeat_and_the_test_split_in_none():
    data = load_data(DataSpec(name="wine", test_fraction=0.2), seed=0)
    made = folds(data, 4, 2, seed=0)
    assert made is not None and len(made) == 8
    every = rows_of(torch.cat([data.x_train, data.x_val]))
    for repeat in (made[:4], made[4:]):
        validated = [rows_of(fold.x_val) for fold in repeat]
        # the validation folds partition the training and validation rows
        assert set().union(*validated) == every and sum(map(len, validated)) == len(every)
    for fold in made:
        # each fold trains on the rest, stratified: every class in both, the test split kept
        assert rows_of(fold.x_train) | rows_of(fold.x_val) == every
        assert set(fold.y_val.tolist()) == {0, 1, 2}
        assert torch.equal(fold.x_test, data.x_test)
        assert held_out_share(fold) == pytest.approx(len(fold.y_val) / len(fold.y_train))


def test_no_folds_for_data_not_in_memory_or_a_class_too_small():
    assert folds(object(), 5, 1, seed=0) is None
    x, y = torch.randn(12, 3), torch.tensor([0] * 9 + [1] * 3)
    small = TensorDataModule(x[:8], y[:8], x[8:], y[8:], batch_size=4)
    assert folds(small, 5, 1, seed=0) is None  # class 1 has 3 rows for 5 folds


def test_by_default_folds_on_a_few_hundred_rows_seeds_on_more():
    for name, expected in (("breast_cancer", 5), ("digits", None)):
        spec = parse_spec({"data": {"name": name}})
        runs, resampled = resampling(spec, load_data(spec.data, seed=0))
        if expected is None:  # 1,438 rows: seeds on the study's own split
            assert resampled is None and [seed for seed, _ in runs] == [0, 1, 2]
        else:
            assert resampled["folds"] == 5 and len(runs) == 5
    spec = parse_spec({"data": {"name": "breast_cancer"}, "recommend": {"folds": 0}})
    assert resampling(spec, load_data(spec.data, seed=0))[1] is None


def test_the_corrected_margin_is_nadeau_and_bengios():
    values = [0.9, 0.92, 0.95, 0.91, 0.93]
    sd, n = statistics.stdev(values), len(values)
    t = 2.131847  # t(0.95, 4)
    assert t_margin(values, 0.95) == pytest.approx(t * sd / math.sqrt(n), rel=1e-5)
    # overlapping training sets: the variance of the mean grows by n_val / n_train
    assert t_margin(values, 0.95, 0.25) == pytest.approx(t * sd * math.sqrt(1 / n + 0.25), rel=1e-5)


def test_a_small_tabular_study_is_re_ranked_over_folds(write_spec):
    spec = tiny_spec(
        data={"name": "breast_cancer", "batch_size": 32, "test_fraction": None},
        train={"max_epochs": 2},
        recommend={"top_k": 1, "baselines": False},
        study={"n_trials": 2},
    )
    path = write_spec(spec)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "over 5 folds × 1 repeat" in result.output
    study = optuna.load_study(study_name="tiny", storage=spec_storage(load_spec(path)))
    robust = study.user_attrs[ROBUST_ATTR]
    assert robust["folds"]["folds"] == 5 and len(robust["rows"][0]["values"]) == 5
    recommended = yaml.safe_load((load_spec(path).output_dir / "recommended.yaml").read_text())
    assert recommended["robust"]["rows"][0]["values"] == robust["rows"][0]["values"]
    assert np.isfinite(robust["rows"][0]["bound"])

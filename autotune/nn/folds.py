"""Repeated stratified k-fold over the rows a study trains and validates on, for the re-ranking.

On a few hundred rows one validation split is a few dozen: every configuration scores within a
row or two of the others, and seeds re-run on that same split cannot tell them apart. The robust
recommendation (autotune.run.robust) can instead train each configuration on k - 1 folds of the
training and validation rows together and score it on the k-th, k times, repeated with other
shuffles: every row is validated on once per repeat. The test split stays out of every fold.

The rows are autotune's in-memory ones (built-in and file data), already standardised by the
training split's statistics: a fixed transform, which no fold's validation rows chose. A user's
DataModule has no rows here (`folds` gives None) and is re-ranked over seeds.
"""

from __future__ import annotations

import numpy as np
import torch

from autotune.nn.data import TensorDataModule


def folds(
    datamodule: object, n_folds: int, repeats: int, *, seed: int
) -> list[TensorDataModule] | None:
    """n_folds × repeats datamodules, each training on all but one fold of the training and
    validation rows and validating on that fold, stratified and seeded; None for data that is not
    in memory, or too few rows of a class for n_folds folds."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    if not isinstance(datamodule, TensorDataModule):
        return None
    x = torch.cat([datamodule.x_train, datamodule.x_val]).cpu()
    y = torch.cat([datamodule.y_train, datamodule.y_val]).cpu()
    labels = y.numpy()
    if np.bincount(labels).min() < n_folds:
        return None
    splitter = RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=repeats, random_state=seed)
    made = []
    for train, val in splitter.split(np.zeros(len(labels)), labels):
        train_rows, val_rows = torch.from_numpy(train), torch.from_numpy(val)
        made.append(
            TensorDataModule(
                x[train_rows],
                y[train_rows],
                x[val_rows],
                y[val_rows],
                batch_size=datamodule.batch_size,
                seed=datamodule.seed,
                name=datamodule.name,
                n_classes=datamodule.n_classes,
                input_stats=datamodule.input_stats,
                test=(datamodule.x_test.cpu(), datamodule.y_test.cpu()),
            )
        )
    return made


def held_out_share(datamodule: TensorDataModule) -> float:
    """What a fold validates on against what it trains on: Nadeau and Bengio's correction to the
    variance of a mean over resampled splits, whose training sets overlap (Machine Learning
    52, 2003)."""
    return len(datamodule.y_val) / len(datamodule.y_train)

"""A user LightningDataModule for autotune: two interleaved moons, seen through 16 noisy features.

It shows what autotune asks of a datamodule of your own: `train_dataloader()` and
`val_dataloader()` that yield `(x, y)` batches, and an `n_classes` attribute (autotune measures the
input shape from the first batch). Everything else is ordinary Lightning.

Two moons are easy in 2D; a fixed random projection spreads them over 16 features and noise is
added in all 16, so the network has to find the 2D structure again and can overfit the noise:
the kind of problem where dropout and BatchNorm placement matter.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import make_moons
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


class MoonsDataModule(pl.LightningDataModule):
    """make_moons, projected to `n_features` dimensions, split and standardised on train stats."""

    # autotune reads this to size the network's last layer
    n_classes = 2

    def __init__(
        self,
        n_samples: int = 2000,
        n_features: int = 16,
        noise: float = 0.2,
        feature_noise: float = 0.5,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_samples = n_samples
        self.n_features = n_features
        self.noise = noise
        self.feature_noise = feature_noise
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate the data once; Lightning may call setup again, which then does nothing."""
        if self.train_set is not None:
            return
        x, y = self._generate()
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, random_state=self.seed, stratify=y
        )
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
        self.train_set = _tensors((x_train - mean) / std, y_train)
        self.val_set = _tensors((x_val - mean) / std, y_val)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)
        # drop_last: a last batch of one row would break BatchNorm in train mode
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=0,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=0)

    def _generate(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        points, labels = make_moons(
            n_samples=self.n_samples, noise=self.noise, random_state=self.seed
        )
        projection = rng.normal(size=(2, self.n_features))
        features = points @ projection
        features += rng.normal(scale=self.feature_noise, size=features.shape)
        return features, labels


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    )

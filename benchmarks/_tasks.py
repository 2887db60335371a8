"""The tasks the benchmarks train on, each the spec's data and model sections: bundled or
generated data only, so every benchmark runs offline. No test split (data.test_fraction: 0):
the figures in docs/benchmarks.md were measured on the 80/20 train/validation splits of before
test splits, and a rerun reproduces them."""

from __future__ import annotations

# the quickstart's mlp on scikit-learn's 8x8 digits
DIGITS_MLP = {
    "data": {"name": "digits", "batch_size": 64, "test_fraction": 0},
    "model": {"template": "mlp", "widths": [256, 256, 128]},
}
# the cnn template on the same digits, as 1x8x8 images
DIGITS_CNN = {
    "data": {"name": "digits", "batch_size": 64, "test_fraction": 0},
    "model": {"template": "cnn", "widths": [32, 64]},
}
# narrow layers on a synthetic table, where dropout's noise is averaged over few inputs
NARROW_TABULAR = {
    "data": {
        "name": "synthetic_tabular",
        "batch_size": 64,
        "test_fraction": 0,
        "synthetic": {"n_samples": 3000, "n_features": 20, "n_informative": 10},
    },
    "model": {"template": "mlp", "widths": [16, 16, 16]},
}
# scikit-learn's breast cancer table: 569 rows, 30 features
BREAST_CANCER_MLP = {
    "data": {"name": "breast_cancer", "batch_size": 32, "test_fraction": 0},
    "model": {"template": "mlp", "widths": [128, 64]},
}
# generated images: a smooth template per class, shifted, plus noise
SYNTHETIC_IMAGE_CNN = {
    "data": {"name": "synthetic_images", "batch_size": 64, "test_fraction": 0},
    "model": {"template": "cnn", "widths": [16, 32]},
}

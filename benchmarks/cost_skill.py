"""How often the cost gate's model claims skill on noise.

The cost gate (autotune.search.cost) stops nothing where its model predicts the trials that
trained no better than their mean, judged by leave-one-out error. Choosing the best of nine
candidates (eight ridge penalties and the mean alone) on the same error is itself fitted to the
data, so on pure noise some fits beat the mean by chance. This script counts how often: targets
drawn independently of the features, for study sizes and feature counts like a search's.

Run from the repository root:

    .venv/bin/python benchmarks/cost_skill.py          # the numbers in docs/benchmarks.md
    .venv/bin/python benchmarks/cost_skill.py --fits 50

It prints a markdown table: the share of noise fits the model calls skilful.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _report import machine

from autotune.search.cost import CostModel

ROWS = (10, 16, 30, 100)
FEATURES = (2, 10, 40)


def skilful_share(n: int, k: int, fits: int, rng: np.random.Generator) -> float:
    """The share of `fits` models of n noise rows and k noise features that claim skill."""
    claimed = 0
    for _ in range(fits):
        x = rng.normal(size=(n, k))
        rows = [{f"f{j}": float(v) for j, v in enumerate(row)} for row in x]
        claimed += CostModel(rows, list(rng.normal(size=n))).skilful
    return claimed / fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=400, help="noise fits per size")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    start = time.time()
    lines = [
        "| trials | " + " | ".join(f"{k} features" for k in FEATURES) + " |",
        "| --- | " + " | ".join("---" for _ in FEATURES) + " |",
    ]
    for n in ROWS:
        shares = [skilful_share(n, k, args.fits, rng) for k in FEATURES]
        lines.append(f"| {n} | " + " | ".join(f"{100 * s:.0f} %" for s in shares) + " |")
    print(
        f"Command: `.venv/bin/python benchmarks/cost_skill.py --fits {args.fits}` "
        f"({time.time() - start:.0f} s)"
    )
    print(machine())
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()

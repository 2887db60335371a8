"""Per-channel moments of a BN input: moments.channel_moments against the plain float64 way.

Every measurement of the variance shift (the prediction before training, Δ after it, BN
recalibration) takes, for each BN input of each batch, the per-channel count, mean and sum of
squared deviations. Two ways, on the same tensors, timed in turns:

    float64 copy       channels first (transpose, reshape), cast to float64, then mean and
                       squared deviations: what autotune did before
    channel_moments    two float32 passes along the tensor as it lies in memory, corrected for
                       the rounding of the mean (autotune.nn.moments.channel_moments)

and the largest relative difference of their sums of squared deviations. Shapes: BN inputs of
the cnn template on 32x32 images (batch 128) and of a wide mlp (batch 512).

    .venv/bin/python benchmarks/moments.py            # the numbers in docs/benchmarks.md

Writes the rows to benchmarks/results/moments.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import machine, spread

from autotune.nn.moments import channel_moments

RESULTS = Path(__file__).resolve().parent / "results" / "moments.json"
SHAPES = [(128, 32, 32, 32), (128, 64, 16, 16), (512, 512), (512, 256)]


def float64_copy(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The plain way: channels first, every value in float64."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = flat.mean(dim=1)
    return flat.shape[1], mean, ((flat - mean[:, None]) ** 2).sum(dim=1)


def seconds(function: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    start = time.perf_counter()
    function(x)
    return time.perf_counter() - start


def run(repeats: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 1
        float64_copy(x), channel_moments(x)  # first calls: allocator, kernels
        plain, fast = [], []
        for _ in range(repeats):  # in turns, so both see the same machine
            plain.append(seconds(float64_copy, x))
            fast.append(seconds(channel_moments, x))
        m2_plain, m2_fast = float64_copy(x)[2], channel_moments(x)[2]
        rows.append(
            {
                "shape": list(shape),
                "float64_copy_s": plain,
                "channel_moments_s": fast,
                "ratios": [p / f for p, f in zip(plain, fast, strict=True)],
                "largest_relative_difference": float(((m2_fast - m2_plain) / m2_plain).abs().max()),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| BN input | float64 copy, ms | channel_moments, ms | ratio "
        "| largest relative difference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {' x '.join(map(str, row['shape']))} "
            f"| {spread(row['float64_copy_s'], 2, 1e3)} "
            f"| {spread(row['channel_moments_s'], 2, 1e3)} "
            f"| {spread(row['ratios'], 1)} "
            f"| {row['largest_relative_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")
    print(machine())
    print(f"{args.repeats} timings of each, in turns; {args.threads} CPU thread(s).\n")
    print(table(rows))


if __name__ == "__main__":
    main()

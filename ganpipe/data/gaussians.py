"""The 25-Gaussians grid: the standard mode-collapse benchmark for GANs on vector data.

Means on {-4, -2, 0, 2, 4}^2, standard deviation 0.05, equal weights. A sample is high quality
when it lies within 3 standard deviations of a mode; a mode is recovered when it receives at
least 20% of its fair share of high-quality samples (20 of 2,500, as in the PacGAN/VEEGAN
evaluations).

Write the data:  python -m ganpipe.data.gaussians --out gaussians.parquet   (or use
`data.source: builtin:gaussians25`, written once under $GANPIPE_HOME/datasets/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

GRID = (-4.0, -2.0, 0.0, 2.0, 4.0)
STD = 0.05
NUM_SAMPLES = 50_000


def grid_means() -> np.ndarray:
    return np.array([(x, y) for x in GRID for y in GRID], dtype=np.float64)


def sample_grid(n: int = NUM_SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(points float32 n x 2, mode ids)."""
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, 25, n)
    points = grid_means()[modes] + rng.normal(0.0, STD, (n, 2))
    return points.astype(np.float32), modes


def mode_quality(samples: np.ndarray, min_share: float = 0.2) -> dict[str, float | int | list[int]]:
    """Modes recovered and the fraction of high-quality samples (within 3 std of a mode)."""
    distances = np.linalg.norm(samples[:, None, :] - grid_means()[None], axis=2)
    nearest, closest = distances.argmin(axis=1), distances.min(axis=1)
    high_quality = closest < 3 * STD
    counts = np.bincount(nearest[high_quality], minlength=25)
    fair_share = len(samples) / 25
    return {"modes_recovered": int((counts >= min_share * fair_share).sum()),
            "high_quality_fraction": float(high_quality.mean()),
            "per_mode": counts.tolist()}


def dataset(n: int = NUM_SAMPLES, seed: int = 0):
    import datasets

    points, modes = sample_grid(n, seed)
    return datasets.Dataset.from_dict({"x": points[:, 0], "y": points[:, 1], "mode": modes.astype(np.int64)})


def write_gaussians(target: Path) -> None:
    from ganpipe import storage

    with storage.atomic_directory(target) as tmp:
        dataset().save_to_disk(str(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the 25-Gaussians grid as a parquet file.")
    parser.add_argument("--out", required=True, help="parquet file to write")
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset(args.num_samples, args.seed).to_parquet(args.out)
    print(f"wrote {args.num_samples} points to {args.out}")


if __name__ == "__main__":
    main()

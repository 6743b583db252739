"""Pictures of what a generator makes: an image grid, or a scatter of vectors over real data.
Training writes them as previews, registration logs a grid with each version, `generate` writes
a grid to a .png; an uplift result becomes an accuracy-versus-ratio plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_grid(images: torch.Tensor, path: Path) -> None:
    """uint8 NHWC -> one PNG grid, ceil(sqrt(N)) images a row with 2 black pixels between
    (torchvision's make_grid layout, without importing torchvision: seconds on every CLI call)."""
    array = images.numpy()
    n, h, w, c = array.shape
    columns = min(n, int(math.ceil(math.sqrt(n))))
    rows, pad = int(math.ceil(n / columns)), 2
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(array):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[y:y + h, x:x + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)  # greyscale stays greyscale


def save_scatter(samples: np.ndarray, real: np.ndarray, path: Path, size: int = 400) -> None:
    """Generated points (black) over real ones (light blue), first two columns, to one PNG."""
    both = np.concatenate([samples[:, :2], real[:, :2]]) if samples.shape[1] > 1 else None
    if both is None:  # one column: plot it against the sample index
        samples = np.stack([np.arange(len(samples)), samples[:, 0]], axis=1)
        real = np.stack([np.arange(len(real)), real[:, 0]], axis=1)
        both = np.concatenate([samples, real])
    low, high = np.nanpercentile(both, 0.5, axis=0), np.nanpercentile(both, 99.5, axis=0)
    span = np.where(high > low, high - low, 1.0) * 1.1
    centre = (high + low) / 2

    def pixels(points: np.ndarray) -> np.ndarray:
        scaled = (points[:, :2] - centre) / span + 0.5
        return np.stack([scaled[:, 0] * size, (1 - scaled[:, 1]) * size], axis=1)

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for colour, points in (((150, 190, 255), real), ((0, 0, 0), samples)):
        for x, y in pixels(points):
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_uplift_plot(result: dict[str, Any], path: Path, title: str = "augmentation value (uplift)") -> None:
    """Held-out accuracy against synthetic rows per real row, from an `uplift` result: real only at
    0, each ratio with its standard error, the best ratio marked. matplotlib (installed with
    mlflow) draws it, through its object API: no pyplot, no global figure state, no display."""
    from matplotlib.figure import Figure

    rows = result["ratios"]
    real = result["real_only"]
    figure = Figure(figsize=(5.5, 3.6), dpi=100, layout="tight")
    axes = figure.subplots()
    positions = np.arange(len(rows) + 1)
    means = [real["mean"]] + [row["accuracy_mean"] for row in rows]
    errors = [real["std_error"]] + [row["accuracy_std_error"] for row in rows]
    axes.errorbar(positions[:1], means[:1], yerr=errors[:1], marker="s", capsize=4, color="grey")
    axes.errorbar(positions[1:], means[1:], yerr=errors[1:], marker="o", capsize=4, color="#1f5fa8",
                  label="real + synthetic")
    axes.axhline(real["mean"], color="grey", linestyle="--", linewidth=1, label="real only")
    best = next(i for i, row in enumerate(rows, start=1) if row["ratio"] == result["best_ratio"])
    axes.plot([best], [means[best]], marker="*", markersize=14, color="#d0661c", linestyle="none",
              label=f"best: {result['best_ratio']:g} (uplift {result['value']:+.3f} ± {result['uncertainty']:.3f})")
    axes.set_xticks(positions, ["real\nonly"] + [f"{row['ratio']:g}" for row in rows])
    axes.set_xlabel("synthetic rows per real row")
    axes.set_ylabel("accuracy on held-out real rows")
    axes.set_title(f"{title}: {result.get('classifier', '')} classifier, {result.get('num_real', '?')} real rows, "
                   f"{result.get('repeats', '?')} repeats", fontsize=10)
    axes.legend(fontsize=8, loc="best", framealpha=0.8)
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)

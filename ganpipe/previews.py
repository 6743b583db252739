"""Pictures of what a generator makes: an image grid, or a scatter of vectors over real data.
Training writes them as previews, registration logs a grid with each version, `generate` writes
a grid to a .png; the `uplift` metric is drawn as accuracy against the synthetic ratio."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


# The accuracy-versus-ratio plot's colours; tests find the plot in a screenshot by them.
SERIES, BASELINE, BAND, BEST = (31, 119, 180), (230, 110, 0), (255, 226, 196), (44, 160, 44)


def save_uplift_plot(ratios: list[dict], real_only: dict, path: Path, size: tuple[int, int] = (480, 300)) -> None:
    """The `uplift` metric as a picture, so a reader sees at which mix synthetic data helps and by
    how much against the noise: held-out accuracy (mean ± standard error over repeats) at each
    synthetic-to-real ratio, the real-only accuracy at ratio 0 and as a band across, the best
    ratio in green. Rows without an `accuracy_mean` (a failed ratio) are left out."""
    base = real_only.get("mean")
    base_se = real_only.get("std_error") or 0.0
    points = [(0.0, base, base_se)] if base is not None else []
    points += sorted((float(r["ratio"]), r["accuracy_mean"], r.get("accuracy_std_error") or 0.0)
                     for r in ratios if r.get("accuracy_mean") is not None)
    width, height = size
    left, right, top, bottom = 62, 16, 30, 44
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(12)
    draw.text((left, 8), "held-out accuracy vs synthetic rows per real row", fill="black", font=font)
    draw.rectangle((left, top, width - right, height - bottom), outline=(120, 120, 120))
    if not points:
        draw.text((left + 10, top + 10), "no accuracies", fill="black", font=font)
        _save(image, path)
        return
    low = min(m - se for _, m, se in points)
    high = max(m + se for _, m, se in points)
    pad = max(high - low, 0.002) * 0.15
    low, high = low - pad, high + pad

    def y_of(value: float) -> float:
        return top + (high - value) / (high - low) * (height - bottom - top)

    def x_of(index: int) -> float:  # ratios evenly spaced: the grid is 0, 0.5, 1, 2, 4 (x real)
        return left + 30 + index * (width - right - left - 60) / max(len(points) - 1, 1)

    for tick in np.linspace(low + pad, high - pad, 4):
        y = y_of(tick)
        draw.line((left - 4, y, left, y), fill=(120, 120, 120))
        draw.text((4, y - 7), f"{tick:.1%}", fill="black", font=font)
    if base is not None:
        draw.rectangle((left + 1, y_of(base + base_se), width - right - 1, y_of(base - base_se)), fill=BAND)
        for x in range(left + 1, width - right - 1, 10):  # dashed: the baseline, not a measurement
            draw.line((x, y_of(base), min(x + 5, width - right - 1), y_of(base)), fill=BASELINE, width=2)
    best = max(points[1:] if base is not None else points, key=lambda p: p[1], default=None)
    xy = [(x_of(i), y_of(m)) for i, (_, m, _) in enumerate(points)]
    if len(xy) > 1:
        draw.line(xy, fill=SERIES, width=2)
    for i, (ratio, mean, se) in enumerate(points):
        x, y = xy[i]
        colour = BEST if (ratio, mean, se) == best else (BASELINE if ratio == 0 and base is not None else SERIES)
        draw.line((x, y_of(mean - se), x, y_of(mean + se)), fill=colour, width=2)
        for end in (mean - se, mean + se):
            draw.line((x - 5, y_of(end), x + 5, y_of(end)), fill=colour, width=2)
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        label = "real only" if ratio == 0 and base is not None else f"{ratio:g}x"
        draw.text((x - draw.textlength(label, font=font) / 2, height - bottom + 6), label, fill="black", font=font)
    draw.text((left, height - 18), "synthetic rows per real row (best in green; band: real only ± s.e.)",
              fill="black", font=font)
    _save(image, path)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def png_data_uri(path: Path, max_side: int = 512, min_side: int = 256, max_bytes: int = 200_000) -> str:
    """A picture as a `data:image/png;base64,...` URI: Prefect's UI renders such URIs in markdown
    artifacts but serves no files. Every artifact is stored in Prefect's database and sent whole
    to each browser that opens it, so the picture is shrunk to at most `max_side` pixels a side,
    and further (by 3/4 at a time) until its PNG is at most `max_bytes`: detailed colour samples
    compress poorly. A browser shows it at its own size, so a smaller one is enlarged by a whole
    factor to `min_side` (nearest neighbour: a 16 px sample stays sharp, and PNG compresses the
    repeats)."""
    import base64
    import io

    image = Image.open(path)
    image.load()
    if max(image.size) < min_side:
        factor = math.ceil(min_side / max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    side = min(max(image.size), max_side)
    while True:
        if max(image.size) > side:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes or side <= 64:
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        side = side * 3 // 4

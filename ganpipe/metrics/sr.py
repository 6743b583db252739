"""Super-resolution quality: PSNR and SSIM of a generator's outputs on held-out images, beside
the same numbers for bicubic upscaling of the same inputs, with MATLAB's and BasicSR's conventions:

- `scale` pixels of border are cropped from every side before measuring;
- with `y_channel`, RGB images are compared on their Y channel (ITU-R BT.601, as MATLAB's
  rgb2ycbcr: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 on 0..255 values, not rounded);
- PSNR on the 0..255 scale; SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, over the 'valid' window positions, averaged over channels (Wang et al. 2004).

LPIPS (ganpipe.metrics.lpips, when its weights are supplied) is measured on the same pixels, in RGB.
Each metric is the mean over images, its uncertainty the standard error of that mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ganpipe.data.pairs import bicubic_upscale, centre_pair, evaluation_pair
from ganpipe.data.prepared import PreparedData
from ganpipe.networks import NetworkSpec, from_network_space, images_to_network_space

Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0


def prepare(image: np.ndarray, border: int, y_channel: bool) -> np.ndarray:
    """uint8 H x W x C -> float64 H' x W' x C' as measured: Y channel (of RGB), border cropped."""
    x = image.astype(np.float64)
    if y_channel and x.shape[2] == 3:
        x = (x @ Y_WEIGHTS + 16.0)[:, :, None]
    return x[border:x.shape[0] - border, border:x.shape[1] - border] if border else x


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when they are equal)."""
    mse = float(np.mean((prepare(a, border, y_channel) - prepare(b, border, y_channel)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2-D array by the 1-D window `g` on both axes."""
    rows = np.apply_along_axis(lambda r: np.convolve(r, g[::-1], mode="valid"), 1, x)
    return np.apply_along_axis(lambda c: np.convolve(c, g[::-1], mode="valid"), 0, rows)


# A measure of two uint8 H x W x C images: (output, reference, border, y_channel) -> value.
Measure = Callable[[np.ndarray, np.ndarray, int, bool], float]


class ImageTooSmall(ValueError):
    """The image has too few pixels for this measure (SSIM's window, LPIPS's backbone): the
    measure is unavailable for the run, the other measures are not. A distinct type, so that a
    ValueError from a real fault still stops the evaluation."""


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity of two uint8 images (1 when equal), averaged over channels."""
    x, y = prepare(a, border, y_channel), prepare(b, border, y_channel)
    if min(x.shape[:2]) < 11:
        raise ImageTooSmall(f"SSIM needs at least 11x11 pixels after the border crop, got {x.shape[1]}x{x.shape[0]}")
    c1, c2, g = (0.01 * 255) ** 2, (0.03 * 255) ** 2, gaussian_window()
    values = []
    for ch in range(x.shape[2]):
        p, q = x[:, :, ch], y[:, :, ch]
        mu_p, mu_q = _filter_valid(p, g), _filter_valid(q, g)
        var_p = _filter_valid(p * p, g) - mu_p**2
        var_q = _filter_valid(q * q, g) - mu_q**2
        cov = _filter_valid(p * q, g) - mu_p * mu_q
        ssim_map = ((2 * mu_p * mu_q + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_q**2 + c1) * (var_p + var_q + c2))
        values.append(float(ssim_map.mean()))
    return float(np.mean(values))


def summary(values: list[float]) -> dict[str, Any]:
    """Mean over images and the standard error of the mean (0 for one image)."""
    array = np.asarray(values, dtype=np.float64)
    error = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
    return {"value": float(array.mean()), "uncertainty": error, "num_images": len(array)}


@torch.no_grad()
def super_resolve(generator: torch.nn.Module, spec: NetworkSpec, lr: np.ndarray,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """One uint8 H x W x C image, `spec.scale` times larger (the whole image in one pass)."""
    x = images_to_network_space(torch.from_numpy(np.ascontiguousarray(lr))[None]).to(device)
    return from_network_space(generator(x), spec)[0].numpy()


def evaluate_super_resolution(generator: torch.nn.Module, spec: NetworkSpec, data: PreparedData,
                              indices: np.ndarray, degradation: str, names: list[str], y_channel: bool = True,
                              device: torch.device | str = "cpu", lpips: Measure | None = None
                              ) -> dict[str, dict[str, Any]]:
    """`names` (psnr, ssim; lpips when `lpips` is given) of the generator on the held-out images
    at `indices`, each with `bicubic` (the same metric for PIL's bicubic upscale of the same
    inputs) beside it. A metric that cannot measure an image (too small for it) is reported
    with `value` None and the `error`; the others still are."""
    measures: dict[str, Measure] = {"psnr": psnr, "ssim": ssim}
    if lpips is not None:
        measures["lpips"] = lpips
    per_image: dict[str, list[float]] = {f"{n}{side}": [] for n in names for side in ("", "_bicubic")}
    errors: dict[str, str] = {}
    for index in indices:
        hr, lr = evaluation_pair(data, int(index), spec.scale, degradation)
        outputs = {"": super_resolve(generator, spec, lr, device), "_bicubic": bicubic_upscale(lr, spec.scale)}
        for name in (n for n in names if n not in errors):
            try:
                for side, output in outputs.items():
                    per_image[f"{name}{side}"].append(measures[name](output, hr, spec.scale, y_channel))
            except ImageTooSmall as exc:
                errors[name] = f"held-out image {int(index)}: {exc}"
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in errors:
            results[name] = {"value": None, "uncertainty": None, "error": errors[name]}
            continue
        bicubic = summary(per_image[f"{name}_bicubic"])
        on_y = y_channel and spec.sample_shape[0] == 3 and name != "lpips"  # LPIPS is defined on RGB
        results[name] = summary(per_image[name]) | {
            "bicubic": bicubic["value"], "bicubic_uncertainty": bicubic["uncertainty"],
            "y_channel": on_y, "border": spec.scale}
    return results


@torch.no_grad()
def comparison_rows(generator: torch.nn.Module, spec: NetworkSpec, data: PreparedData, indices: np.ndarray,
                    degradation: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(bicubic, super-resolved, original) uint8 NHWC triples of a centre crop (the training
    crop's size) of each held-out image at `indices`: the training previews' and a registered
    version's picture of what the generator does."""
    size, scale, rows = spec.sample_shape[1], spec.scale, []
    for index in indices:
        crop, lr = centre_pair(data, int(index), size, scale, degradation)
        sr = from_network_space(generator(images_to_network_space(torch.from_numpy(lr[None])).to(device)), spec)
        rows += [torch.from_numpy(bicubic_upscale(lr, scale)), sr[0], torch.from_numpy(crop)]
    return torch.stack(rows)

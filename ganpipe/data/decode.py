"""Decode and preprocess images: the per-record work of ingest, run in worker processes.

Kept free of torch and datasets imports so pool workers start fast.

Preprocessing policy (documented in the README):
- mode: converted to L (1 channel) or RGB (3 channels); palette and alpha images go through RGBA,
  and alpha is dropped (colour values kept), so L, RGB, RGBA and P inputs mix freely.
- size: `center_crop` scales the shorter side to the resolution (bicubic, anti-aliased when
  shrinking) and crops the centre square; `pad` scales the longer side and pads with black;
  `stretch` scales both sides, ignoring the aspect ratio.
- values: stored as uint8 0..255; the training loader maps them to [-1, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class ImageSpec:
    resolution: int
    channels: int
    resize: str  # center_crop | pad | stretch


def open_image(data: bytes | None, path: str | None) -> Image.Image:
    if data is not None:
        image = Image.open(io.BytesIO(data))
    elif path:
        image = Image.open(path)
    else:
        raise ValueError("no image data")
    image.load()
    return image


def is_grayscale(image: Image.Image) -> bool:
    return image.mode in GRAYSCALE_MODES


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    target_mode = "L" if spec.channels == 1 else "RGB"
    if image.mode == "P" or (image.mode not in ("L", "RGB") and image.mode not in GRAYSCALE_MODES):
        image = image.convert("RGBA")
    if image.mode in ("I", "I;16", "F"):
        # 16-bit and float greyscale: scale the full range into 8 bits rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode != target_mode:
        image = image.convert(target_mode)
    image = resize(image, spec)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def resize(image: Image.Image, spec: ImageSpec) -> Image.Image:
    size = spec.resolution
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if spec.resize == "stretch":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    if spec.resize == "center_crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))
    scale = size / max(width, height)  # pad
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def decode_chunk(records: list[tuple[bytes | None, str | None]], spec: ImageSpec
                 ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk. Returns the stacked images of the good records (in order) and, for the bad
    ones, (position in chunk, reason)."""
    out = np.empty((len(records), spec.resolution, spec.resolution, spec.channels), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    kept = 0
    for position, (data, path) in enumerate(records):
        try:
            out[kept] = preprocess(open_image(data, path), spec)
            kept += 1
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            bad.append((position, f"undecodable image: {exc}"))
    return out[:kept], bad

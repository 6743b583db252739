"""Super-resolution pairs, made on the fly from high-resolution images kept at their own sizes:
the held-out split, random training crops (with flips and 90-degree rotations), the
low-resolution input made from each crop (`data.degradation`), and the evaluation pairs.

Paired data (data.lr_column) brings its own LR images: a training crop is then cut from both
images at aligned places (the HR crop at `scale` times the LR crop's position), with the same flip
and rotation, and nothing is degraded.

Every random choice is drawn from a generator keyed by (seed, a batch counter, the sample's
position): a function of those numbers alone, so a resumed run draws exactly the crops and
degradations an uninterrupted one would, with no generator state to checkpoint.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter

from ganpipe.data.prepared import PreparedData
from ganpipe.errors import UserError

HOLDOUT_SEED = 20_170_915  # fixed: the held-out images do not change with the training seed
EVAL_KEY = 7  # the key's first word for evaluation pairs (training keys start with the seed, < 2**31)


def holdout_split(num_records: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), both sorted: ceil(fraction x N) images chosen by a
    fixed permutation are held out. Refused when either side would be empty."""
    held = math.ceil(num_records * fraction)
    if held >= num_records:
        raise UserError(f"data.holdout_fraction {fraction}: holding out {held} of the {num_records} images "
                        "leaves none to train on")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(num_records)
    return np.sort(order[held:]), np.sort(order[:held])


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 H x W x C (C = 1 or 3) as a PIL image (L or RGB)."""
    return Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")


def from_pil(image: Image.Image) -> np.ndarray:
    """uint8 H x W x C, writable (torch refuses read-only arrays)."""
    array = np.array(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """PIL's bicubic downscale by `scale` of uint8 H x W x C (H, W multiples of it), as users make
    their low-resolution images."""
    height, width = image.shape[:2]
    return from_pil(to_pil(image).resize((width // scale, height // scale), Image.Resampling.BICUBIC))


def bicubic_upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """The baseline every super-resolution metric is reported beside: PIL's bicubic upscale."""
    height, width = image.shape[:2]
    return from_pil(to_pil(image).resize((width * scale, height * scale), Image.Resampling.BICUBIC))


def degrade(hr: np.ndarray, scale: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The low-resolution input for a high-resolution uint8 image. bicubic: the downscale alone.
    crappify (fastai's idea, BSRGAN's order): a Gaussian blur of radius in [0, 1.5) px before it,
    Gaussian noise of sigma in [0, 8) grey levels and a JPEG round trip at quality 30-95 after it."""
    if kind == "bicubic":
        return bicubic_downscale(hr, scale)
    radius, sigma, quality = rng.uniform(0, 1.5), rng.uniform(0, 8), int(rng.integers(30, 96))
    blurred = from_pil(to_pil(hr).filter(ImageFilter.GaussianBlur(radius)))
    lr = bicubic_downscale(blurred, scale).astype(np.float64)
    lr = np.clip(np.round(lr + rng.normal(0, sigma, lr.shape)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    to_pil(lr).save(buffer, format="JPEG", quality=quality)
    return from_pil(Image.open(io.BytesIO(buffer.getvalue())))


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop at a random place, randomly flipped and rotated by a multiple of 90
    degrees (the eight symmetries of the square), as a new contiguous array."""
    return random_pair_crop(image, None, size, 1, rng)[0]


def random_pair_crop(hr: np.ndarray, lr: np.ndarray | None, size: int, scale: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """A size x size crop of `hr` and the size/scale crop of `lr` that it covers (the LR crop at
    a random place p, the HR one at p x scale), both with the same random flip and rotation. With
    `lr` None: the HR crop alone, at any place (scale 1)."""
    small = size // scale
    height, width = (lr if lr is not None else hr).shape[:2]
    top, left = int(rng.integers(0, height - small + 1)), int(rng.integers(0, width - small + 1))
    crops = [hr[top * scale:top * scale + size, left * scale:left * scale + size]]
    if lr is not None:
        crops.append(lr[top:top + small, left:left + small])
    flip, turns = rng.integers(0, 2), int(rng.integers(0, 4))
    crops = [np.ascontiguousarray(np.rot90(c[:, ::-1] if flip else c, turns)) for c in crops]
    return crops[0], crops[1] if lr is not None else None


def training_pairs(data: PreparedData, indices: np.ndarray, size: int, scale: int, kind: str,
                   key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(HR crops uint8 N x size x size x C, their LR inputs N x size/scale x size/scale x C) for
    the images at `indices`; sample i's randomness is keyed by (*key, i)."""
    hr, lr = [], []
    for i, index in enumerate(indices):
        rng = np.random.default_rng((*key, i))
        if data.paired:
            crop, small = random_pair_crop(data.image(int(index)), data.lr_image(int(index)), size, scale, rng)
        else:
            crop = random_crop(data.image(int(index)), size, rng)
            small = degrade(crop, scale, kind, rng)
        hr.append(crop)
        lr.append(small)
    return np.stack(hr), np.stack(lr)


def evaluation_pair(data: PreparedData, index: int, scale: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) for a held-out image, the BasicSR way: the whole image, cropped at the bottom and
    right to a multiple of the scale, and its degradation (keyed by the image's index alone) or,
    for paired data, its own LR image."""
    image = data.image(index)
    height, width = (image.shape[0] // scale) * scale, (image.shape[1] // scale) * scale
    hr = np.ascontiguousarray(image[:height, :width])
    if data.paired:
        return hr, np.array(data.lr_image(index))
    return hr, evaluation_input(hr, scale, kind, index)


def centre_pair(data: PreparedData, index: int, size: int, scale: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) of the centre size x size crop of a held-out image (previews), aligned as
    `evaluation_pair`'s."""
    hr, lr = evaluation_pair(data, index, scale, kind)
    top, left = (hr.shape[0] - size) // 2 // scale, (hr.shape[1] - size) // 2 // scale
    crop = np.ascontiguousarray(hr[top * scale:top * scale + size, left * scale:left * scale + size])
    if data.paired:
        return crop, np.ascontiguousarray(lr[top:top + size // scale, left:left + size // scale])
    return crop, evaluation_input(crop, scale, kind, index)


def evaluation_input(hr: np.ndarray, scale: int, kind: str, index: int) -> np.ndarray:
    """The LR input of held-out image `index` (or a crop of it): its randomness keyed by the index."""
    return degrade(hr, scale, kind, np.random.default_rng((EVAL_KEY, index)))

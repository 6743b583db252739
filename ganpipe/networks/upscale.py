"""Super-resolving whole images of any size with an image-to-image generator, in overlapping
tiles: what the registered pyfunc, `ganpipe export --input` and the benchmarks share (this module
ships with registered models, so it needs torch and numpy only).

Tiles. The low-resolution image is cut into `tile` x `tile` cores; each core is run with a margin
of `receptive_radius(spec)` input pixels of real context on every side where the image has any
(none past the image's edges, where the generator's own zero padding applies, as it does for the
whole image). An output pixel depends only on input pixels within that radius, so every kept
pixel sees exactly the inputs it sees when the whole image runs at once: tiled output equals
untiled output up to float rounding (convolutions of other shapes may sum in another order, last
bits; after rounding to uint8 an output value can differ by one grey level, rarely). The bicubic
input skip (model.sr_input_skip) reaches 2 input pixels, within the radius. Memory is bounded by
one tile's activations plus the input and the uint8 output, whatever the image's size.

Channels. The output has the input's layout: greyscale in, greyscale out; RGB in, RGB out; an
alpha channel (LA, RGBA) is upscaled bicubically and kept. A 3-channel generator super-resolves a
greyscale image as grey RGB and returns its luma (ITU-R BT.601, as PIL's convert("L")); a
1-channel generator super-resolves a colour image channel by channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .space import from_network_space, images_to_network_space
from .spec import NetworkSpec

DEFAULT_TILE = 128  # input pixels per tile side: a 3x-scaled 64-wide SRResNet tile needs ~0.4 GB of activations
LUMA = (19595, 38470, 7471)  # PIL's RGB -> L weights (/65536): ITU-R BT.601


def receptive_radius(spec: NetworkSpec) -> int:
    """Input pixels on each side that an output pixel of the SRResNet generator can depend on
    (ganpipe.networks.srgan): the 9x9 head (4), two 3x3 convolutions per residual block, the 3x3
    fuse (1), a 3x3 convolution per x2 stage at 2^i times the input's resolution (1/2^i input
    pixels) and the 9x9 output convolution at `scale` times it (4/scale), rounded up, plus one
    for the pixel shuffle's rounding to whole input pixels."""
    stages = spec.scale.bit_length() - 1
    upsampling = sum(1.0 / 2**i for i in range(stages)) + 4.0 / spec.scale
    return 4 + 2 * spec.sr_blocks + 1 + math.ceil(upsampling) + 1


Box = tuple[int, int, int, int]  # top, bottom, left, right (input pixels, end exclusive)


def tile_boxes(height: int, width: int, tile: int, margin: int) -> Iterator[tuple[Box, Box]]:
    """(core, context) for every tile: the core's output is kept, the context (the core plus up
    to `margin` pixels on each side, within the image) is what the generator sees."""
    for top in range(0, height, tile):
        bottom = min(height, top + tile)
        for left in range(0, width, tile):
            right = min(width, left + tile)
            yield (top, bottom, left, right), (max(0, top - margin), min(height, bottom + margin),
                                               max(0, left - margin), min(width, right + margin))


@torch.no_grad()
def upscaled_tiles(generator: nn.Module, spec: NetworkSpec, x: torch.Tensor, tile: int = DEFAULT_TILE
                   ) -> Iterator[tuple[Box, torch.Tensor]]:
    """(core box, float N x C x core*s output) for each tile of the N x C x h x w network-space
    input `x` (see module doc); an input no larger than one tile runs whole, as one tile."""
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    height, width = x.shape[2:]
    s = spec.scale
    if height <= tile and width <= tile:
        yield (0, height, 0, width), generator(x).float()
        return
    for (top, bottom, left, right), (t, b, lo, hi) in tile_boxes(height, width, tile, receptive_radius(spec)):
        y = generator(x[:, :, t:b, lo:hi])
        yield (top, bottom, left, right), y[:, :, (top - t) * s:(bottom - t) * s, (left - lo) * s:(right - lo) * s].float()


def upscale_to_images(generator: nn.Module, spec: NetworkSpec, x: torch.Tensor, tile: int = DEFAULT_TILE
                      ) -> np.ndarray:
    """N x C x h x w network-space input -> uint8 N x h*s x w*s x C images, each tile converted as
    soon as it is made: memory holds the uint8 result and one tile's floats, not a whole float
    output (4x the result's size)."""
    n, _, height, width = x.shape
    s = spec.scale
    out = np.empty((n, height * s, width * s, spec.sample_shape[0]), dtype=np.uint8)
    for (top, bottom, left, right), y in upscaled_tiles(generator, spec, x, tile):
        out[:, top * s:bottom * s, left * s:right * s] = from_network_space(y, spec).numpy()
    return out


@torch.no_grad()
def super_resolve_image(generator: nn.Module, spec: NetworkSpec, image: np.ndarray, tile: int = DEFAULT_TILE,
                        device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 H x W x K (K: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) -> uint8 H*s x W*s x K."""
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 1-4 image, got {image.dtype} {tuple(image.shape)}")
    channels = image.shape[2]
    colour = image[:, :, :3] if channels >= 3 else image[:, :, :1]
    grey = colour.shape[2] == 1
    model_channels = spec.sample_shape[0]
    if model_channels == 3 and grey:
        batch = np.repeat(colour, 3, axis=2)[None]
    elif model_channels == 1 and not grey:
        batch = np.ascontiguousarray(np.moveaxis(colour, 2, 0)[..., None])  # each colour channel alone
    else:
        batch = colour[None]
    x = images_to_network_space(torch.from_numpy(np.array(batch))).to(device)  # a copy: decoded arrays are read-only
    sr = upscale_to_images(generator, spec, x, tile)
    if model_channels == 3 and grey:
        weights = np.asarray(LUMA, dtype=np.uint32)
        result = ((sr[0].astype(np.uint32) @ weights + 0x8000) >> 16).astype(np.uint8)[:, :, None]
    elif model_channels == 1 and not grey:
        result = np.moveaxis(sr[..., 0], 0, 2)
    else:
        result = sr[0]
    if channels in (2, 4):
        result = np.concatenate([result, bicubic_upscale_channel(image[:, :, -1], spec.scale)[:, :, None]], axis=2)
    return np.ascontiguousarray(result)


def bicubic_upscale_channel(channel: np.ndarray, scale: int) -> np.ndarray:
    """A uint8 H x W plane, bicubically upscaled (how alpha travels beside the super-resolved colour)."""
    x = torch.from_numpy(np.ascontiguousarray(channel)).float()[None, None]
    y = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    return y[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def image_array(image: Any) -> np.ndarray:
    """A decoded PIL image as uint8 H x W x K in the layout super_resolve_image takes: L, LA, RGB
    and RGBA as they are; palettes as RGBA when they have transparency, else RGB; 1-bit as L;
    16-bit greyscale scaled to 8 bits (65535 -> 255), 32-bit integer and float greyscale clipped
    to 0..255; other colour spaces (CMYK, YCbCr, ...) as RGB. Takes the image object only (no PIL
    import here: the caller decoded it)."""
    mode = image.mode
    if mode.startswith("I;16"):
        array = (np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8)
    elif mode in ("I", "F"):
        array = np.clip(np.asarray(image, dtype=np.float64).round(), 0, 255).astype(np.uint8)
    else:
        if mode in ("P", "PA"):
            target = "RGBA" if mode == "PA" or "transparency" in image.info else "RGB"
        else:
            target = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "RGB": "RGB", "RGBA": "RGBA",
                      "RGBa": "RGBA"}.get(mode, "RGB")
        array = np.asarray(image if mode == target else image.convert(target), dtype=np.uint8)
    return np.ascontiguousarray(array[:, :, None] if array.ndim == 2 else array)

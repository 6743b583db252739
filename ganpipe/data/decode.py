"""Decode and preprocess images: the per-record work of ingest, run in worker processes.

Kept free of torch and datasets imports so pool workers start fast.

Preprocessing policy (documented in the README):
- mode: converted to L (1 channel) or RGB (3 channels); palette and alpha images go through RGBA,
  and alpha is dropped (colour values kept), so L, RGB, RGBA and P inputs mix freely; 16-bit
  greyscale is scaled into 8 bits (65535 -> 255) rather than clipped.
- size: `center_crop` scales the shorter side to the resolution (bicubic, anti-aliased when
  shrinking) and crops the centre square; `pad` scales the longer side and pads with black;
  `stretch` scales both sides, ignoring the aspect ratio. With no resolution given (native),
  images keep their own size, untouched: they must then be square and all of one size.
- native (model.family srgan, data.resize: native): mode converted as above, any size kept
  (decode_native_chunk); paired data (data.lr_column) decodes both images of each row, and an LR
  image that is not its HR image's size divided by the scale is a bad record (decode_paired_chunk).
- values: stored as uint8 0..255; the training loader maps them to [-1, 1].
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F"}  # and the 16-bit modes, I;16*
CHANNEL_SAMPLE = 64  # records looked at to choose 1 or 3 channels when data.channels is not set


OTHER_SIZE = "image size "  # a bad-record reason beginning so: a native-size image of another size


@dataclass(frozen=True)
class ImageSpec:
    resolution: int
    channels: int
    resize: str  # center_crop | pad | stretch
    native: bool = False  # the resolution is the images' own: one of another size is not resized
    pair_scale: int = 0  # paired data (records are (HR, LR) pairs): each LR is the HR's size // this


Record = tuple[bytes | None, str | None]  # encoded bytes, or a local path the worker reads


def open_image(data: bytes | None, path: str | None) -> Image.Image:
    if data is not None:
        image = plain_png(data) or Image.open(io.BytesIO(data))
    elif path:
        image = Image.open(path)
    else:
        raise ValueError("missing image")
    image.load()
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit colour types -> PIL mode (= raw mode)


def plain_png(data: bytes) -> Image.Image | None:
    """A plain PNG (8-bit grey, grey+alpha, RGB or RGBA; not interlaced; no transparency chunk),
    decoded by PIL's own PNG decoder without going through `Image.open`, or None for anything else
    (which `Image.open` then handles, errors included).

    For small images `Image.open` is mostly Python overhead (format detection, chunk handling):
    this is about twice as fast for 28x28 greyscale digits, with the same pixels."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    header, idat, pos = None, [], len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunk = data[pos + 8:pos + 8 + length]
        if len(chunk) != length or zlib.crc32(kind + chunk) != struct.unpack_from(">I", data, pos + 8 + length)[0]:
            return None
        if kind == b"IHDR" and length == 13:
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind in (b"tRNS", b"PLTE"):
            return None
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        return None
    width, height, depth, colour, compression, filtering, interlace = header
    mode = PNG_MODES.get(colour)
    if depth != 8 or mode is None or (compression, filtering, interlace) != (0, 0, 0):
        return None
    if not 0 < width * height <= (Image.MAX_IMAGE_PIXELS or width * height):
        return None  # Image.open refuses decompression bombs (and empty images) with its own error
    return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)


def is_grayscale(image: Image.Image) -> bool:
    return image.mode in GRAYSCALE_MODES or image.mode.startswith("I;16")


def detect_channels(records: list[Record]) -> int:
    """1 when the first decodable records are all greyscale, else 3."""
    for record in records[:CHANNEL_SAMPLE]:
        try:
            if not is_grayscale(open_image(*record)):
                return 3
        except Exception:  # noqa: BLE001 - bad records are reported by the main pass
            continue
    return 1


def detect_size(records: list[Record]) -> tuple[int, int, int] | None:
    """(position, width, height) of the first decodable record, or None when none decodes."""
    for position, record in enumerate(records):
        try:
            image = open_image(*record)
        except Exception:  # noqa: BLE001 - bad records are reported by the main pass
            continue
        return position, image.width, image.height
    return None


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: 65535 -> 255, rather than PIL's clipping at 255.
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64).round(), 0, 255).astype(np.uint8), mode="L")
    elif not is_grayscale(image) and image.mode != "RGB":
        image = image.convert("RGBA")  # palettes (with transparency) and other modes; alpha dropped below
    return image.convert(target)


def preprocess(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """The image in the target mode and size."""
    return resize(to_mode(image, spec.channels), spec)


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


def _of(data: bytes | None, path: str | None) -> str:
    return f" {path}" if data is None and path else ""


def warm_up() -> None:
    """A worker's first task: importing this module is the work."""


def _decode_error(data: bytes | None, path: str | None, exc: Exception) -> str:
    """Why a record could not be decoded, for the bad-record report."""
    if isinstance(exc, FileNotFoundError):
        return f"image file not found: {path}"
    if isinstance(exc, UnidentifiedImageError):
        return f"undecodable image{_of(data, path)}: not an image format PIL can read"
    return f"undecodable image{_of(data, path)}: {type(exc).__name__}: {exc}"


def native_image(record: Record, spec: ImageSpec) -> tuple[Image.Image | None, str | None]:
    """One record decoded at its own size in the target mode, or (None, why it is a bad record)."""
    data, path = record
    if data is None and not path:
        return None, "missing image"
    try:
        return to_mode(open_image(data, path), spec.channels), None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is this record's fault
        return None, _decode_error(data, path, exc)


def too_small(image: Image.Image, record: Record, spec: ImageSpec) -> str | None:
    """Why an image cannot give a training crop (smaller than spec.resolution on a side), or None."""
    width, height = image.size
    if min(width, height) >= spec.resolution:
        return None
    return f"image of {width}x{height} px{_of(*record)} is smaller than the data.resolution crop ({spec.resolution} px)"


NativeImages = tuple[np.ndarray, np.ndarray]  # flat uint8 pixels of images in order; their (H, W, C), int64 N x 3


def _stacked(images: list[Image.Image], channels: int) -> NativeImages:
    pixels = [np.asarray(image, dtype=np.uint8).reshape(-1) for image in images]
    sizes = np.asarray([(image.height, image.width, channels) for image in images], dtype=np.int64).reshape(-1, 3)
    return (np.concatenate(pixels) if pixels else np.zeros(0, np.uint8)), sizes


def decode_native_chunk(records: list[Record], spec: ImageSpec) -> tuple[NativeImages, list[tuple[int, str]]]:
    """Decode a chunk at the images' own sizes (data.resize: native, for super-resolution).
    Returns (the good images, bad records). An image smaller than spec.resolution on either side
    cannot give a training crop: a bad record naming both sizes."""
    kept: list[Image.Image] = []
    bad: list[tuple[int, str]] = []
    for position, record in enumerate(records):
        image, reason = native_image(record, spec)
        reason = reason or too_small(image, record, spec)
        if reason:
            bad.append((position, reason))
        else:
            kept.append(image)
    return _stacked(kept, spec.channels), bad


def decode_paired_chunk(records: list[tuple[Record, Record]], spec: ImageSpec
                        ) -> tuple[tuple[NativeImages, NativeImages], list[tuple[int, str]]]:
    """Decode (HR, LR) pairs at their own sizes: ((good HR images, their LR images), bad records).
    Bad, besides an undecodable image or an HR image smaller than the crop: an LR image that is not
    the HR's size divided by spec.pair_scale, rounded down (as `PIL.resize(size // scale)` and
    DIV2K's bicubic sets make them; an HR side up to scale - 1 px longer is cropped when used)."""
    hr_kept: list[Image.Image] = []
    lr_kept: list[Image.Image] = []
    bad: list[tuple[int, str]] = []
    scale = spec.pair_scale
    for position, (hr_record, lr_record) in enumerate(records):
        hr, reason = native_image(hr_record, spec)
        reason = reason or too_small(hr, hr_record, spec)
        lr, lr_reason = native_image(lr_record, spec) if not reason else (None, None)
        reason = reason or (f"LR {lr_reason}" if lr_reason else None)
        if not reason and lr.size != (hr.width // scale, hr.height // scale):
            reason = (f"LR image of {lr.width}x{lr.height} px{_of(*lr_record)} does not match its HR image of "
                      f"{hr.width}x{hr.height} px at model.scale {scale} (expected "
                      f"{hr.width // scale}x{hr.height // scale} px)")
        if reason:
            bad.append((position, reason))
        else:
            hr_kept.append(hr)
            lr_kept.append(lr)
    return (_stacked(hr_kept, spec.channels), _stacked(lr_kept, spec.channels)), bad


def decode_chunk(records: list[Record], spec: ImageSpec) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk. Returns the stacked images of the good records (in order), uint8
    N x H x W x C, and for the bad ones (position in chunk, reason)."""
    size = spec.resolution
    # The images are pasted one under the other onto one canvas, copied out once at the end:
    # cheaper than a conversion to numpy per image, which costs as much as decoding a small PNG.
    canvas = Image.new("L" if spec.channels == 1 else "RGB", (size, size * max(len(records), 1)))
    bad: list[tuple[int, str]] = []
    kept = 0
    for position, (data, path) in enumerate(records):
        if data is None and not path:
            bad.append((position, "missing image"))
            continue
        try:
            image = open_image(data, path)
            if spec.native and image.size != (size, size):
                bad.append((position, f"{OTHER_SIZE}{image.width}x{image.height}"))
                continue
            canvas.paste(preprocess(image, spec), (0, size * kept))
            kept += 1
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is this record's fault
            bad.append((position, _decode_error(data, path, exc)))
    images = np.frombuffer(canvas.tobytes(), dtype=np.uint8).reshape(-1, size, size, spec.channels)
    return images[:kept], bad

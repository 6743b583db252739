"""`builtin:photos`: real photographs that work offline, for super-resolution. scikit-learn ships
two (china.jpg and flower.jpg, 640 x 427); they are cut into tiles of several sizes (48 to 112 px
on a side, so the data really has many sizes) and written once as a local Hugging Face dataset
under $GANPIPE_HOME/datasets/photos, then read like any user's dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ganpipe import storage

TILE_SIZES = (48, 64, 80, 96, 112)


def photo_tiles() -> list[np.ndarray]:
    """uint8 RGB tiles of the sample photographs, left to right and top to bottom, their sides
    cycling through TILE_SIZES (a deterministic list)."""
    from sklearn.datasets import load_sample_images

    tiles, k = [], 0
    for image in load_sample_images().images:
        top = 0
        while top + min(TILE_SIZES) <= image.shape[0]:
            row_height, left = 0, 0
            while True:
                height, width = TILE_SIZES[k % len(TILE_SIZES)], TILE_SIZES[(k * 2 + 1) % len(TILE_SIZES)]
                if top + height > image.shape[0] or left + width > image.shape[1]:
                    break
                tiles.append(np.ascontiguousarray(image[top:top + height, left:left + width]))
                left, row_height, k = left + width, max(row_height, height), k + 1
            if not row_height:
                break
            top += row_height
    return tiles


def write_photos(target: Path) -> None:
    import datasets  # here, not at the top: a cache hit need not import it

    encoded = []
    for tile in photo_tiles():
        buffer = io.BytesIO()
        Image.fromarray(tile, mode="RGB").save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    dataset = datasets.Dataset.from_dict({"image": encoded}, features=datasets.Features({"image": datasets.Image()}))
    with storage.atomic_directory(target) as tmp:
        dataset.save_to_disk(str(tmp))

"""scikit-learn's 8x8 digits as a local Hugging Face dataset: real images that work offline.

Written once under $GANPIPE_HOME/datasets/digits with `save_to_disk` and then read back through
`datasets.load_from_disk` like any user's dataset.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ganpipe import storage
from ganpipe.errors import UserError

BUILTINS = ("digits",)


def builtin_dataset_path(source: str) -> Path:
    name = source.removeprefix("builtin:")
    if name not in BUILTINS:
        raise UserError(f"data.source: unknown builtin dataset {name!r} (available: {', '.join(BUILTINS)})")
    target = storage.ganpipe_home() / "datasets" / name
    if not (target / "dataset_info.json").exists():
        write_digits(target)
    return target


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8, labels int64 N): the 1,797 digits, 0..16 grey levels scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def write_digits(target: Path) -> None:
    import datasets  # here, not at the top: a cache hit on builtin:digits need not import it

    images, labels = digits_arrays()
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
    })
    dataset = datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)
    with storage.atomic_directory(target) as tmp:
        dataset.save_to_disk(str(tmp))

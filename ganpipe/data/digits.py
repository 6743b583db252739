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

BUILTINS = ("digits", "gaussians25", "photos")


def builtin_dataset_path(source: str) -> Path:
    name = source.removeprefix("builtin:")
    if name not in BUILTINS:
        raise UserError(f"data.source: unknown builtin dataset {name!r} (available: {', '.join(BUILTINS)})")
    target = storage.ganpipe_home() / "datasets" / name
    if not (target / "dataset_info.json").exists():
        if name == "gaussians25":
            from ganpipe.data.gaussians import write_gaussians

            write_gaussians(target)
        elif name == "photos":
            from ganpipe.data.photos import write_photos

            write_photos(target)
        else:
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


def recognition_rates(images: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class, the fraction of generated digits (uint8 N x H x W x 1, any resolution) that an
    SVM trained on the real 8x8 digits recognises as the class they were generated for.

    The judge never sees ganpipe's preprocessing: samples are box-filtered back to 8x8 and
    mapped to the digits' 0..16 scale."""
    from sklearn.svm import SVC

    real, targets = digits_arrays()
    judge = SVC(gamma=0.001).fit(real.reshape(len(real), -1) / 255.0 * 16.0, targets)
    small = np.stack([np.asarray(Image.fromarray(img[:, :, 0]).resize((8, 8), Image.Resampling.BOX))
                      for img in images])
    predicted = judge.predict(small.reshape(len(small), -1) / 255.0 * 16.0)
    return {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}

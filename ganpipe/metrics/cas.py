"""CAS, the Classification Accuracy Score (Ravuri & Vinyals, 2019): a classifier trained only on
a conditional generator's samples, tested on real data it never saw. Reported beside the same
classifier (architecture, recipe, training-set size, seed) trained on real data, which is the
ceiling: a generator that captured every class would score close to it.

The real data is split once, by seed: a held-out test set (20%, at most 5,000 records) that
neither classifier trains on, and the real training set.
"""

from __future__ import annotations

import numpy as np
import torch

from ganpipe.data import PreparedData
from ganpipe.metrics.domain import accuracy, train_classifier, training_steps
from ganpipe.metrics.precision_recall import binomial_std
from ganpipe.metrics.samples import GeneratedSamples

HELD_OUT_FRACTION = 0.2
MAX_HELD_OUT = 5000


def held_out_count(num_records: int) -> int:
    return min(max(1, int(num_records * HELD_OUT_FRACTION)), MAX_HELD_OUT)


def split_real(num_records: int, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out test indices, real training indices): disjoint, deterministic for a seed."""
    order = np.random.default_rng(seed).permutation(num_records)
    num_test = held_out_count(num_records)
    return np.sort(order[:num_test]), np.sort(order[num_test:num_test + num_train])


def _tensors(images: np.ndarray, labels: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert labels is not None
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def cas(real: PreparedData, fake: GeneratedSamples, seed: int = 0, steps: int | None = None) -> dict:
    num_train = min(fake.num_samples, real.num_records - held_out_count(real.num_records))
    test_idx, train_idx = split_real(real.num_records, num_train, seed)
    x_test, y_test = _tensors(*real.gather(test_idx))
    x_real, y_real = _tensors(*real.gather(train_idx))
    batches = list(fake.batches(stop=num_train))
    x_fake, y_fake = torch.cat([b for b, _ in batches]), torch.cat([labels for _, labels in batches])
    steps = steps or training_steps(num_train)
    on_synthetic, _ = train_classifier(x_fake, y_fake, fake.spec.num_classes, steps, seed)
    on_real, _ = train_classifier(x_real, y_real, fake.spec.num_classes, steps, seed)
    synthetic_accuracy, real_accuracy = accuracy(on_synthetic, x_test, y_test), accuracy(on_real, x_test, y_test)
    return {"value": synthetic_accuracy, "uncertainty": binomial_std(synthetic_accuracy, len(test_idx)),
            "real_accuracy": real_accuracy, "real_accuracy_uncertainty": binomial_std(real_accuracy, len(test_idx)),
            "ratio": synthetic_accuracy / real_accuracy if real_accuracy > 0 else None,
            "num_train": num_train, "num_test": len(test_idx), "steps": steps}

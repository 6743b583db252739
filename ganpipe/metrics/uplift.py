"""uplift: how much a downstream classifier gains from a conditional generator's samples, and at
which mix of synthetic to real rows.

The real (labelled) data is split once, by `seed`, stratified by class: of each class's rows, a
seeded permutation (numpy's default_rng(seed)) puts the first round(uplift_holdout_fraction x
count) in the held-out part, the rest in the training part. No classifier ever trains on a
held-out row; every accuracy is measured on all of them. Each repeat r then draws the real
training set from the training part (per class, a seeded permutation, default_rng([seed, r + 1]):
uplift_real_per_class rows, else uplift_real_fraction of them), which simulates a small labelled
set, the regime where augmentation can matter.

In each repeat the same classifier, from the same seed, is trained on the real rows alone and on
the real rows plus round(ratio x real rows) class-balanced synthetic rows for each ratio of
uplift_ratios (fresh latent seeds per repeat; one pool per repeat, of which each ratio takes a
prefix). uplift at a ratio is the mean over repeats of (mixed accuracy - real-only accuracy), its
uncertainty the standard error of those paired differences (one repeat: the two binomial standard
errors combined). `value` is the best ratio's uplift; choosing the best of several ratios favours
noise a little, which is why the per-ratio table is reported beside it.

The generator itself was usually trained on all of its run's prepared data, held-out rows
included: its samples may carry information from rows the classifier is scored on. A strict
measurement evaluates the generator against labelled real data it did not train on: `ganpipe
evaluate --real` naming a parquet file or image folder kept apart from its training data (then
every row the metric uses, held out or not, is unseen by the generator). data.max_records alone
does not give such a split: --real would prepare the whole source again.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import numpy as np
import torch

from ganpipe.data import PreparedData
from ganpipe.generators import LoadedGenerator
from ganpipe.metric_settings import MetricSettings
from ganpipe.metrics.downstream import cnn_steps, fit_and_score, resolve_classifier
from ganpipe.metrics.precision_recall import binomial_std
from ganpipe.networks import generate

HOLDOUT_RULE = ("stratified by class: each class's rows in a seeded permutation (numpy default_rng(seed)), "
                "the first round(fraction x count) held out (at least 1, never all)")
CAVEAT = ("the generator may have been trained on the held-out rows (a run trains on all its prepared data); "
          "for a strict split evaluate it with --real naming data it did not train on")
MAX_LISTED_ROWS = 20_000  # row indices are listed in the result for datasets up to this size


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out rows, training-part rows), sorted and disjoint; see the module doc for the rule."""
    rng = np.random.default_rng(seed)
    held, rest = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1) if len(rows) > 1 else 0
        held.append(rows[:count])
        rest.append(rows[count:])
    return np.sort(np.concatenate(held)), np.sort(np.concatenate(rest))


def real_training_rows(labels: np.ndarray, train_part: np.ndarray, settings: MetricSettings, seed: int,
                       repeat: int) -> np.ndarray:
    """Repeat `repeat`'s real training rows: a per-class seeded draw from the training part."""
    rng = np.random.default_rng([seed, repeat + 1])
    chosen = []
    for label in np.unique(labels[train_part]):
        rows = rng.permutation(train_part[labels[train_part] == label])
        count = settings.uplift_real_per_class or max(1, int(round(settings.uplift_real_fraction * len(rows))))
        chosen.append(rows[:count])
    return np.sort(np.concatenate(chosen))


def synthetic_pool(loaded: LoadedGenerator, count: int, seed: int, repeat: int, device: torch.device | str,
                   shuffle_labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`count` class-balanced samples (labels cycle through the classes, so every prefix is balanced
    within one row per class) on latent seeds of their own for each repeat. `shuffle_labels`
    (tests) pairs the samples with a random permutation of their labels: data that cannot help."""
    labels = np.arange(count) % loaded.spec.num_classes
    first = (seed * 1_000 + repeat + 1) * 10_000_019  # far from export's and evaluate's seeds 0, 1, ...
    samples = generate(loaded.generator, loaded.spec, list(range(first, first + count)), labels.tolist(),
                       batch_size=500, device=device).numpy()
    if shuffle_labels:
        labels = np.random.default_rng([seed, repeat + 1, 2]).permutation(labels)
    return samples, labels


def _mean_and_error(values: list[float], num_test: int) -> tuple[float, float]:
    mean = float(np.mean(values))
    if len(values) > 1:
        return mean, float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, binomial_std(mean, num_test)


def _rows_listing(rows: np.ndarray, num_records: int) -> list[int] | None:
    return rows.tolist() if num_records <= MAX_LISTED_ROWS else None


def uplift(data: PreparedData, loaded: LoadedGenerator, settings: MetricSettings, seed: int = 0,
           device: torch.device | str = "cpu", shuffle_synthetic_labels: bool = False) -> dict[str, Any]:
    """The uplift result (see the module doc and README's Evaluation section for its keys)."""
    started = time.perf_counter()
    classifier = resolve_classifier(settings.uplift_classifier, data.kind)
    labels = data.all_labels()
    assert labels is not None, "uplift needs labelled data (checked by the caller)"
    held, train_part = holdout_split(labels, settings.uplift_holdout_fraction, seed)
    test = data.gather(held)
    test = (test[0], labels[held])
    ratios = settings.uplift_ratios
    num_classes = data.num_classes
    real_only: list[float] = []
    mixed: dict[float, list[float]] = {r: [] for r in ratios}
    real_rows_per_repeat, steps = [], None
    for repeat in range(settings.uplift_repeats):
        rows = real_training_rows(labels, train_part, settings, seed, repeat)
        real_rows_per_repeat.append(rows)
        x_real, y_real = data.gather(rows)[0], labels[rows]
        pool_x, pool_y = synthetic_pool(loaded, int(round(max(ratios) * len(rows))), seed, repeat, device,
                                        shuffle_synthetic_labels)
        steps = cnn_steps(len(rows) + len(pool_x), settings.uplift_cnn_steps) if classifier == "cnn" else None

        def score(x: np.ndarray, y: np.ndarray, repeat: int = repeat, steps: int | None = steps) -> float:
            return fit_and_score(classifier, (x, y), test, num_classes, seed * 1_000 + repeat,
                                 steps=steps or 0, flip=settings.uplift_flip, device=device)

        real_only.append(score(x_real, y_real))
        for ratio in ratios:
            n = int(round(ratio * len(rows)))
            mixed[ratio].append(score(np.concatenate([x_real, pool_x[:n]]), np.concatenate([y_real, pool_y[:n]])))
    real_mean, real_error = _mean_and_error(real_only, len(held))
    table = []
    for ratio in ratios:
        mean, error = _mean_and_error(mixed[ratio], len(held))
        differences = [m - r for m, r in zip(mixed[ratio], real_only, strict=True)]
        gain, gain_error = _mean_and_error(differences, len(held))
        if len(differences) == 1:  # no spread to measure: the two accuracies' binomial errors combined
            gain_error = math.hypot(error, real_error)
        table.append({"ratio": ratio, "num_synthetic": int(round(ratio * len(real_rows_per_repeat[0]))),
                      "accuracy_mean": mean, "accuracy_std_error": error, "uplift": gain,
                      "uplift_std_error": gain_error, "accuracies": mixed[ratio]})
    best = max(table, key=lambda row: (row["uplift"], -row["ratio"]))  # ties: the smaller mix
    return {
        "value": best["uplift"], "uncertainty": best["uplift_std_error"], "best_ratio": best["ratio"],
        "real_only": {"mean": real_mean, "std_error": real_error, "accuracies": real_only},
        "ratios": table, "classifier": classifier, "steps": steps, "repeats": settings.uplift_repeats,
        "num_real": int(np.mean([len(r) for r in real_rows_per_repeat])), "num_classes": num_classes,
        "holdout": {"fraction": settings.uplift_holdout_fraction, "seed": seed, "num_rows": len(held),
                    "rule": HOLDOUT_RULE, "rows_sha256": hashlib.sha256(held.astype(np.int64).tobytes()).hexdigest(),
                    "rows": _rows_listing(held, data.num_records), "caveat": CAVEAT},
        "real_rows": [_rows_listing(rows, data.num_records) for rows in real_rows_per_repeat],
        "synthetic_labels": "shuffled (test of a useless generator)" if shuffle_synthetic_labels else "class-balanced",
        "seconds": time.perf_counter() - started,
    }

"""Rows of a synthetic dataset, each a pure function of (generator, export seed, row index).

Row i's latent comes from the seed `row_seed(seed, i)` (stored in its `seed` column), its label
(conditional models) from the label plan, so any row can be regenerated from its seed alone.
`ganpipe export`, `ganpipe augment` and `ganpipe generate` number and label rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ganpipe.errors import UserError
from ganpipe.networks import NetworkSpec
from ganpipe.shards import dataset_features, encode_pngs, image_column


def row_seed(seed: int, index: np.ndarray | int) -> np.ndarray:
    """The latent seed of row `index`: unique per (export seed, row), fits in int64."""
    return np.int64(seed) * np.int64(2**32) + np.asarray(index, dtype=np.int64)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed integer hash (SplitMix64 finaliser): deterministic labels without an RNG per row."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class LabelPlan:
    """How rows get labels: balanced (i mod K), explicit counts (consecutive blocks), or drawn
    from the training distribution by a hash of the row seed."""

    num_classes: int
    mode: str  # balanced | counts | weighted | none
    counts: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def labels(self, seed: int, indices: np.ndarray) -> np.ndarray | None:
        if self.mode == "none":
            return None
        if self.mode == "balanced":
            return (indices % self.num_classes).astype(np.int64)
        if self.mode == "counts":
            bounds = np.cumsum(self.counts)
            return np.searchsorted(bounds, indices, side="right").astype(np.int64)
        cdf = np.cumsum(np.asarray(self.weights) / np.sum(self.weights))
        u = (_splitmix64(row_seed(seed, indices)) >> np.uint64(11)).astype(np.float64) / float(2**53)
        return np.minimum(np.searchsorted(cdf, u, side="right"), self.num_classes - 1).astype(np.int64)

    def per_class(self, seed: int, num_images: int) -> dict[str, int]:
        if self.mode == "none":
            return {}
        totals = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(0, num_images, 1_000_000):
            labels = self.labels(seed, np.arange(start, min(num_images, start + 1_000_000)))
            totals += np.bincount(labels, minlength=self.num_classes)
        return {str(i): int(c) for i, c in enumerate(totals)}

    def to_json(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "mode": self.mode, "counts": list(self.counts),
                "weights": list(self.weights)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelPlan:
        return cls(data["num_classes"], data["mode"], tuple(data["counts"]), tuple(data["weights"]))


def label_plan(spec: NetworkSpec, num_images: int, class_balance: bool, class_counts: dict[str, int] | None,
               training_counts: dict[str, int] | None) -> LabelPlan:
    if not spec.conditional:
        if class_balance or class_counts:
            raise UserError("--class-balance / --class-counts need a conditional model")
        return LabelPlan(0, "none")
    if class_balance and class_counts:
        raise UserError("--class-balance and --class-counts: choose one")
    k = spec.num_classes
    if class_counts:
        names = class_names(spec)
        unknown = [c for c in class_counts if c not in names]
        if unknown:
            raise UserError(f"--class-counts: unknown class(es) {unknown} (classes: {', '.join(names)})")
        negative = [c for c, v in class_counts.items() if v < 0]
        if negative:
            raise UserError(f"--class-counts: negative count for class(es) {negative}")
        counts = tuple(int(class_counts.get(name, 0)) for name in names)
        if sum(counts) != num_images:
            raise UserError(f"--class-counts add up to {sum(counts)}, not --num-images {num_images}")
        return LabelPlan(k, "counts", counts=counts)
    if class_balance:
        return LabelPlan(k, "balanced")
    weights = tuple(float(v) for v in training_counts.values()) if training_counts and \
        len(training_counts) == k else (1.0,) * k
    return LabelPlan(k, "weighted", weights=weights)


def class_names(spec: NetworkSpec) -> list[str]:
    return list(spec.classes) or [str(i) for i in range(spec.num_classes)]


def hf_features(spec: NetworkSpec) -> Any:
    """The columns of this generator's rows: `image` or the vector's columns, `label`, `seed`, `index`."""
    import datasets

    if spec.is_image:
        values: dict[str, Any] = {"image": datasets.Image()}
    else:
        values = {name: datasets.Value("float32")
                  for name in spec.columns or [f"x{i}" for i in range(spec.sample_shape[0])]}
    return dataset_features(values, class_names(spec) if spec.conditional else None)


def shard_table(spec: NetworkSpec, samples: torch.Tensor, labels: np.ndarray | None, seeds: np.ndarray,
                indices: np.ndarray, encoded: list[bytes] | None = None, level: int = 1) -> Any:
    """Rows as an arrow table with the HF features in its schema; images are PNG-encoded here
    unless `encoded` is given."""
    import pyarrow as pa

    features = hf_features(spec)
    columns: dict[str, Any] = {}
    if spec.is_image:
        columns["image"] = image_column(encoded if encoded is not None else encode_pngs(samples.numpy(), level))
    else:
        names = [n for n in features if n not in ("label", "seed", "index")]
        values = samples.numpy().astype(np.float32)
        for j, name in enumerate(names):
            columns[name] = pa.array(values[:, j])
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    columns["seed"] = pa.array(seeds, pa.int64())
    columns["index"] = pa.array(indices, pa.int64())
    return pa.table(columns, schema=features.arrow_schema)


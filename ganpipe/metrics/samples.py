"""Where evaluation samples come from: prepared real data, or a generator sampled on the fly.

Both yield batches in user units (uint8 NHWC images, or vectors in data units) with labels, so
every metric sees real and generated data the same way, and nothing is round-tripped through PNG.
Generated images can stay on the generator's device: evaluation feeds them to Inception there,
so they never travel to the host and back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ganpipe.data import PreparedData
from ganpipe.generators import LoadedGenerator
from ganpipe.networks import NetworkSpec, generate

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class RealSamples:
    data: PreparedData
    num_samples: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.num_samples = min(self.num_samples, self.data.num_records)
        rng = np.random.default_rng(self.seed)
        self.indices = np.sort(rng.permutation(self.data.num_records)[: self.num_samples])

    @property
    def cache_key(self) -> str:
        return f"{self.data.fingerprint}-n{self.num_samples}-s{self.seed}"

    def batches(self, batch_size: int = 500, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Samples [start, stop) in order; processes of a distributed evaluation each take a range."""
        stop = self.num_samples if stop is None else stop
        for first in range(start, stop, batch_size):
            raw, labels = self.data.gather(self.indices[first:min(first + batch_size, stop)])
            yield torch.from_numpy(np.ascontiguousarray(raw)), \
                torch.from_numpy(labels) if labels is not None else None


@dataclass
class GeneratedSamples:
    loaded: LoadedGenerator
    num_samples: int
    seed: int = 0
    label_weights: np.ndarray | None = None  # class frequencies to draw labels from (default uniform)
    device: str | torch.device = "cpu"

    @property
    def spec(self) -> NetworkSpec:
        return self.loaded.spec

    def labels(self) -> list[int] | None:
        if not self.spec.conditional:
            return None
        k = self.spec.num_classes
        weights = self.label_weights if self.label_weights is not None else np.full(k, 1.0 / k)
        rng = np.random.default_rng(self.seed + 1)
        return rng.choice(k, size=self.num_samples, p=weights / weights.sum()).tolist()

    def batches(self, batch_size: int = 500, start: int = 0, stop: int | None = None,
                on_device: bool = False) -> Iterator[Batch]:
        """Samples [start, stop): sample i depends on i alone (its seed and label), never on the range.
        With `on_device`, images stay on the generator's device (for a feature network there)."""
        stop = self.num_samples if stop is None else stop
        labels = self.labels()
        seeds = list(range(self.seed * 1_000_003, self.seed * 1_000_003 + self.num_samples))
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            chunk_labels = labels[first:last] if labels is not None else None
            out = generate(self.loaded.generator, self.spec, seeds[first:last], chunk_labels,
                           batch_size=batch_size, device=self.device, on_device=on_device)
            yield out, torch.tensor(chunk_labels) if chunk_labels is not None else None

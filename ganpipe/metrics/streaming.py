"""Mean and covariance of a feature stream, in float64 on the device, in memory that does not
grow with the number of samples: FID of 50,000 generated images holds (1 + B) x d x d numbers
(d = 2048, B bootstrap replicates), never the 50,000 x 2048 features.

Each batch's weighted mean and centred scatter matrix are merged into the running ones with
Chan et al.'s pairwise update (stable: no sum of squares minus a squared sum), so the result is
the two-pass covariance to rounding, whatever the batch boundaries, and ranges processed apart
(one per Accelerate process) merge the same way.

The bootstrap cannot resample a stream, so it reweights it (the Poisson bootstrap, Hanley &
MacGibbon 2006; Chamandy et al. 2012): replicate b gives sample i the weight w_bi ~ Poisson(1),
the count a resample with replacement would have drawn it in the limit of many samples, and
keeps its own weighted moments. Row 0 weighs every sample 1: the statistics themselves. A
weight is a hash of (seed, replicate, sample index) put through Poisson(1)'s inverse CDF,
computed on the device in integer arithmetic: the same on every device and for every batching
or split into ranges, and nothing is copied from the host per batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MASK32 = 0xFFFFFFFF
# P(X <= k) for X ~ Poisson(1), k = 0..17; beyond, 1 - 1e-16 is rounding.
POISSON_CDF = [sum(math.exp(-1.0) / math.factorial(j) for j in range(k + 1)) for k in range(18)]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for 32-bit values held in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Chris Wellons' "lowbias32")."""
    x = x & MASK32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def poisson_weights(seed: int, replicates: int, first: int, count: int, device: torch.device | str,
                    cdf: torch.Tensor | None = None) -> torch.Tensor:
    """(replicates, count) float64 Poisson(1) weights of samples first .. first + count - 1
    (`cdf`: POISSON_CDF already on the device, so no host copy is made per batch)."""
    index = torch.arange(first, first + count, device=device, dtype=torch.int64)[None, :]
    replicate = torch.arange(1, replicates + 1, device=device, dtype=torch.int64)[:, None]
    h = hash32(hash32(hash32(torch.full_like(replicate, seed)) ^ replicate) ^ hash32(index))
    uniform = (h.double() + 0.5) / 2.0**32
    if cdf is None:
        cdf = torch.tensor(POISSON_CDF, dtype=torch.float64, device=device)
    return (uniform[..., None] > cdf).sum(dim=-1).double()


class GaussianMoments:
    """Running float64 (weight, mean, scatter matrix) of a feature stream for the statistics
    (row 0) and each of `replicates` Poisson-bootstrap replicates (rows 1..)."""

    def __init__(self, dims: int, replicates: int = 0, seed: int = 0, device: torch.device | str = "cpu"):
        self.replicates, self.seed, self.device = replicates, seed, torch.device(device)
        rows = 1 + replicates
        self.weight = torch.zeros(rows, dtype=torch.float64, device=self.device)
        self.mean = torch.zeros(rows, dims, dtype=torch.float64, device=self.device)
        self.scatter = torch.zeros(rows, dims, dims, dtype=torch.float64, device=self.device)
        # Non-blocking: a blocking copy to a GPU would wait for all the work queued before it.
        self.cdf = torch.tensor(POISSON_CDF, dtype=torch.float64).to(self.device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.mean, self.scatter))

    def update(self, features: torch.Tensor, first: int) -> None:
        """Add samples first .. first + len(features) - 1 (their index fixes their bootstrap weights)."""
        x = features.to(device=self.device, dtype=torch.float64)
        weights = torch.ones(1 + self.replicates, len(x), dtype=torch.float64, device=self.device)
        if self.replicates:
            weights[1:] = poisson_weights(self.seed, self.replicates, first, len(x), self.device, self.cdf)
        for row, w in enumerate(weights):
            total = w.sum()
            mean = (w @ x) / total.clamp(min=1e-300)
            centred = x - mean
            self._merge(row, total, mean, (centred * w[:, None]).T @ centred)

    def _merge(self, row: int, weight: torch.Tensor, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Chan's update of row `row` with another part's weight, mean and scatter (no host sync:
        an empty part has weight 0 and changes nothing)."""
        total = self.weight[row] + weight
        share = weight / total.clamp(min=1e-300)
        delta = mean - self.mean[row]
        self.mean[row] += delta * share
        self.scatter[row] += scatter + torch.outer(delta, delta) * (self.weight[row] * share)
        self.weight[row] = total

    def merge(self, other: GaussianMoments) -> None:
        """Fold in the moments of another range of the same stream (another process's)."""
        for row in range(1 + self.replicates):
            self._merge(row, other.weight[row], other.mean[row], other.scatter[row])

    def row(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of one row: the statistics (0) or a bootstrap replicate; the
        covariance with frequency weights, as np.cov of the samples repeated by their weights."""
        return self.mean[row], self.scatter[row] / (self.weight[row] - 1).clamp(min=1.0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.mean, self.scatter]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], replicates: int, seed: int = 0) -> GaussianMoments:
        weight, mean, scatter = tensors
        moments = cls(mean.shape[1], replicates, seed, weight.device)
        moments.weight, moments.mean, moments.scatter = weight.clone(), mean.clone(), scatter.clone()
        return moments


def gather_moments(accelerator: Any, local: GaussianMoments) -> GaussianMoments:
    """Every process's moments merged in rank order (equal shapes: `accelerator.gather` stacks them)."""
    rows = 1 + local.replicates
    gathered = [accelerator.gather(t) for t in local.tensors()]
    merged = GaussianMoments.from_tensors([t[:rows] for t in gathered], local.replicates, local.seed)
    for rank in range(1, accelerator.num_processes):
        merged.merge(GaussianMoments.from_tensors([t[rank * rows:(rank + 1) * rows] for t in gathered],
                                                  local.replicates, local.seed))
    return merged

"""Improved precision and recall (Kynkaanniemi et al., 2019): each feature set spans a manifold,
the union of balls around its points reaching their k-th nearest neighbour (k = 3). Precision is
the share of generated samples inside the real manifold (fidelity); recall, the share of real
samples inside the generated one (coverage). Distances are computed in blocks, so 50,000 x
50,000 never needs to be in memory at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NEIGHBOURHOOD = 3
BLOCK_ELEMENTS = 50_000_000  # distances held at once (200 MB in float32)


def _row_blocks(rows: torch.Tensor, columns: int) -> list[torch.Tensor]:
    return list(rows.split(max(1, BLOCK_ELEMENTS // max(columns, 1))))


def kth_neighbour_distances(points: torch.Tensor, k: int = NEIGHBOURHOOD) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point (the nearest, at 0, is itself)."""
    return torch.cat([torch.cdist(block, points).kthvalue(k + 1, dim=1).values
                      for block in _row_blocks(points, len(points))])


def inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query: is it within some point's radius?"""
    return torch.cat([(torch.cdist(block, points) <= radii[None]).any(dim=1)
                      for block in _row_blocks(queries, len(points))])


def binomial_std(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = NEIGHBOURHOOD,
                     device: torch.device | str = "cpu") -> dict[str, float | int]:
    """Precision and recall of generated against real features; `value` is their harmonic mean
    (F1), its uncertainty propagated from the two binomial standard errors."""
    if min(len(fake), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples on each side")
    fake_t = torch.from_numpy(np.asarray(fake, dtype=np.float32)).to(device)
    real_t = torch.from_numpy(np.asarray(real, dtype=np.float32)).to(device)
    precision = float(inside_manifold(fake_t, real_t, kth_neighbour_distances(real_t, k)).float().mean())
    recall = float(inside_manifold(real_t, fake_t, kth_neighbour_distances(fake_t, k)).float().mean())
    p_std, r_std = binomial_std(precision, len(fake)), binomial_std(recall, len(real))
    total = precision + recall
    f1 = 2 * precision * recall / total if total > 0 else 0.0
    # dF/dP = 2 R^2 / (P + R)^2 and dF/dR = 2 P^2 / (P + R)^2, errors taken as independent.
    f1_std = math.hypot(2 * recall**2 * p_std, 2 * precision**2 * r_std) / total**2 if total > 0 else 0.0
    return {"value": f1, "uncertainty": f1_std, "precision": precision, "precision_uncertainty": p_std,
            "recall": recall, "recall_uncertainty": r_std, "k": k, "num_samples": len(fake), "num_real": len(real)}

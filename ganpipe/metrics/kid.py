"""KID: the unbiased estimate of the squared MMD between feature sets under the polynomial kernel
k(x, y) = (x.y / d + 1)^3 (Binkowski et al., 2018), averaged over random subsets; its spread over
the subsets is the reported uncertainty. Subsets are drawn as torch-fidelity draws them (generated
first, then real, from one RandomState), so both give the same number for the same seed.
"""

from __future__ import annotations

import numpy as np
import torch

SUBSETS = 100
SUBSET_SIZE = 1000


def polynomial_mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two equal-sized samples (rows): kernel diagonals left out of the within-set terms."""
    m, dims = x.shape
    k_xx = (x @ x.T / dims + 1) ** 3
    k_yy = (y @ y.T / dims + 1) ** 3
    k_xy = (x @ y.T / dims + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(fake: np.ndarray, real: np.ndarray, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
        seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float | int]:
    """KID of generated against real features, in float64 on `device`."""
    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side (got {len(fake)} and {len(real)})")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = torch.from_numpy(np.asarray(fake[np.sort(rng.choice(len(fake), size, replace=False))]))
        y = torch.from_numpy(np.asarray(real[np.sort(rng.choice(len(real), size, replace=False))]))
        values.append(polynomial_mmd2_unbiased(x.to(device, torch.float64), y.to(device, torch.float64)))
    return {"value": float(np.mean(values)), "uncertainty": float(np.std(values)), "subsets": subsets,
            "subset_size": size, "num_samples": len(fake)}

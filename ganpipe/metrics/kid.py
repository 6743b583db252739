"""KID: the unbiased estimate of the squared MMD between feature sets under the polynomial kernel
k(x, y) = (x.y / d + 1)^3 (Binkowski et al., 2018), averaged over random subsets; its spread over
the subsets is the reported uncertainty.

torch-fidelity computes it (`kid_features_to_metric`, on the CPU, in the features' float32), so
the value is torch-fidelity's for the same features and seed. It replaced a float64 torch
re-implementation: on 10,000 x 2048 pool3-like features (2 CPU cores, best of 3 runs) it takes
5.6 s and 195 MB above the inputs against 15.3 s and 170 MB, and the two values differ by 2e-9 at
KID 0.009 (at most 3e-8 for KIDs from 1e-5 to 1e-3: float32 rounding, a thousandth of the spread
over subsets).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

SUBSETS = 100
SUBSET_SIZE = 1000


def kid(fake: np.ndarray, real: np.ndarray, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
        seed: int = 0) -> dict[str, float | int]:
    """KID of generated against real features; subsets shrink to the smaller side when it has fewer
    samples than `subset_size`."""
    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side (got {len(fake)} and {len(real)})")
    # np.require copies only what torch cannot wrap as is: a read-only (memory-mapped, cached) array.
    result = kid_features_to_metric(torch.from_numpy(np.require(fake, np.float32, "CW")),
                                    torch.from_numpy(np.require(real, np.float32, "CW")),
                                    kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"value": result[KEY_METRIC_KID_MEAN], "uncertainty": result[KEY_METRIC_KID_STD], "subsets": subsets,
            "subset_size": size, "num_samples": len(fake)}

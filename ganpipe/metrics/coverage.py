"""Coverage and density (Naeem et al., 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"), on features standardised with the real side's per-dimension mean and std.

Around each real sample, a ball reaching its k-th nearest real neighbour. Coverage is the share
of real samples whose ball holds at least one generated sample: a generator that drops modes
leaves their balls empty, whatever its samples look like. Density is the mean, over generated
samples, of the number of real balls holding it, divided by k (about 1 when the two sides match;
below 1 for samples off the real data, above for samples crowding where real data is dense).
Both equal the reference implementation's (`prdc.compute_prdc`) on the same features.

Distances are computed in BLOCK-row tiles on the evaluation's device, so memory grows with the
sample counts, not with their product.
"""

from __future__ import annotations

import numpy as np
import torch

from ganpipe.metrics.precision_recall import binomial_std

BLOCK = 1000


def standardise(real: np.ndarray, fake: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides scaled by the real side's float64 statistics (constant dimensions left as they are)."""
    real64, fake64 = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    mean, std = real64.mean(axis=0), real64.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return torch.from_numpy((real64 - mean) / std), torch.from_numpy((fake64 - mean) / std)


def real_radii(real: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each real sample to its k-th nearest real neighbour (itself excluded)."""
    return torch.cat([torch.cdist(real[i:i + BLOCK], real).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(real), BLOCK)])


def coverage_density(real: np.ndarray, fake: np.ndarray, k: int = 5, device: torch.device | str = "cpu",
                     standardised: bool = True) -> dict[str, float | int]:
    """Coverage and density of generated against real features, with their standard errors:
    coverage's binomial over the real samples, density's from the spread of its per-sample terms."""
    if len(real) <= k or len(fake) < 1:
        raise ValueError(f"coverage/density with k={k} needs more than {k} real samples and some generated ones")
    if standardised:
        real_t, fake_t = standardise(real, fake)
    else:
        real_t, fake_t = torch.from_numpy(np.asarray(real, np.float64)), torch.from_numpy(np.asarray(fake, np.float64))
    real_t, fake_t = real_t.to(device), fake_t.to(device)
    radii = real_radii(real_t, k)
    covered = torch.zeros(len(real_t), dtype=torch.bool, device=device)
    inside = []  # per generated sample: how many real balls hold it
    for i in range(0, len(fake_t), BLOCK):
        within = torch.cdist(fake_t[i:i + BLOCK], real_t) < radii[None, :]  # block x real
        inside.append(within.sum(dim=1))
        covered |= within.any(dim=0)
    per_sample = torch.cat(inside).double().cpu().numpy() / k
    coverage = float(covered.double().mean())
    return {"coverage": coverage, "coverage_uncertainty": binomial_std(coverage, len(real_t)),
            "density": float(per_sample.mean()),
            "density_uncertainty": float(per_sample.std(ddof=1) / np.sqrt(len(per_sample))) if len(per_sample) > 1
            else 0.0, "k": k, "num_samples": len(fake_t), "num_real": len(real_t)}

"""Fréchet distance between Gaussians fitted to feature sets, with a bootstrap uncertainty.

d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

tr((S_1 S_2)^(1/2)) is the sum of square roots of the eigenvalues of a symmetric positive
semi-definite matrix with the same nonzero spectrum as S_1 S_2: R S_2 R^T, or (R F^T)(R F^T)^T,
where S_1 = R^T R and S_2 = F^T F. Stable where the non-symmetric product's `sqrtm` returns
complex noise, and the same number in exact arithmetic. R is the symmetric square root of S_1,
or, with fewer samples than dimensions, the centred samples themselves (then F too): the
matrices are then samples x samples, so small evaluations and their bootstrap cost little.

Statistics are float64 throughout, and the linear algebra runs in torch on the evaluation's
device: at 2048 dimensions each symmetric eigen-decomposition costs about a second on a CPU
core and a fraction of that on a GPU, and FID with a bootstrap needs one per replicate. Should
the device's solver fail to converge (cuSOLVER can, on a near-singular matrix), that
decomposition is done again on the CPU (LAPACK).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ganpipe.metrics.streaming import GaussianMoments

Device = torch.device | str


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False) if len(features) > 1 else np.zeros((features.shape[1],) * 2)
    return mu, np.atleast_2d(sigma)


def as_float64(values: Any, device: Device = "cpu") -> torch.Tensor:
    """A float64 tensor on `device` (numpy arrays, memory-mapped ones included, or tensors)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)


def eigh(matrix: torch.Tensor, values_only: bool = False) -> Any:
    """Eigenvalues (and vectors) of a symmetric matrix on its device, or on the CPU when the
    device's solver fails, handed back on the matrix's device."""
    solve = torch.linalg.eigvalsh if values_only else torch.linalg.eigh
    try:
        return solve(matrix)
    except torch.linalg.LinAlgError:
        if matrix.device.type == "cpu":
            raise
        result = solve(matrix.cpu())
        return result.to(matrix.device) if values_only else tuple(t.to(matrix.device) for t in result)


def centred_factor(features: Any, device: Device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, F) with F^T F equal to the sample covariance: centred rows scaled by 1/sqrt(n - 1)."""
    features = as_float64(features, device)
    mu = features.mean(dim=0)
    return mu, (features - mu) / np.sqrt(max(len(features) - 1, 1))


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (rounding's negative eigenvalues as 0)."""
    values, vectors = eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def reference_factor(sigma: Any, features: Any | None = None, device: Device = "cpu") -> torch.Tensor:
    """R with R^T R = sigma: the centred reference samples when there are fewer of them than
    dimensions (no d x d decomposition needed), else the symmetric square root."""
    if features is not None and len(features) < sigma.shape[0]:
        return centred_factor(features, device)[1]
    return psd_sqrt(as_float64(sigma, device))


def trace_sqrt_product(r: torch.Tensor, sigma2: torch.Tensor | None = None, f: torch.Tensor | None = None) -> float:
    """tr((S_1 S_2)^(1/2)) for S_1 = r^T r, with S_2 given as its covariance or as a factor f."""
    if f is not None:
        m = r @ f.T
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    else:
        gram = r @ sigma2 @ r.T
    values = eigh((gram + gram.T) / 2, values_only=True)
    return float(values.clamp(min=0).sqrt().sum())


def distance_to_gaussian(mu_ref: torch.Tensor, sigma_ref: torch.Tensor, r: torch.Tensor, mu: torch.Tensor,
                         sigma: torch.Tensor) -> float:
    """FD between the reference Gaussian (mean, covariance, factor r) and another, all on one device."""
    diff = mu_ref - mu
    value = float(diff @ diff + torch.trace(sigma_ref) + torch.trace(sigma)) - 2.0 * trace_sqrt_product(r, sigma2=sigma)
    return max(value, 0.0)


def distance_to_features(mu_ref: Any, sigma_ref: Any, r: Any, features: Any) -> float:
    """FD between the reference Gaussian (mean, covariance, factor r) and the one fitted to
    `features`, on the device `r` is on."""
    device = r.device if isinstance(r, torch.Tensor) else torch.device("cpu")
    mu_ref, sigma_ref, r = (as_float64(x, device) for x in (mu_ref, sigma_ref, r))
    mu, f = centred_factor(features, device)
    if len(f) >= f.shape[1]:
        return distance_to_gaussian(mu_ref, sigma_ref, r, mu, f.T @ f)
    diff = mu_ref - mu
    value = float(diff @ diff + torch.trace(sigma_ref) + (f * f).sum()) - 2.0 * trace_sqrt_product(r, f=f)
    return max(value, 0.0)


def spread(draws: list[float]) -> dict[str, Any]:
    """The bootstrap's standard deviation and 95% interval over its replicates' distances."""
    values = np.asarray(draws)
    return {"uncertainty": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
            "bootstrap": len(values)}


def frechet_with_uncertainty(reference: tuple[np.ndarray, np.ndarray], features: np.ndarray,
                             bootstrap: int, seed: int = 0, reference_features: np.ndarray | None = None,
                             device: Device = "cpu") -> dict[str, Any]:
    """FD of `features` against reference statistics, and the bootstrap spread over resamples
    of `features` (the reference side is fixed: it comes from cached statistics). Passing the
    reference features too lets a small reference skip the d x d square root."""
    mu_ref, sigma_ref = (as_float64(x, device) for x in reference)
    r = reference_factor(sigma_ref, reference_features, device)
    features = as_float64(features, device)
    value = distance_to_features(mu_ref, sigma_ref, r, features)
    result: dict[str, Any] = {"value": value, "uncertainty": 0.0, "num_samples": len(features)}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = [distance_to_features(mu_ref, sigma_ref, r,
                                      features[torch.from_numpy(rng.integers(0, len(features), len(features)))
                                               .to(device)])
                 for _ in range(bootstrap)]
        result |= spread(draws)
    return result


def frechet_of_moments(reference: tuple[np.ndarray, np.ndarray], moments: GaussianMoments,
                       reference_features: np.ndarray | None = None, device: Device = "cpu") -> dict[str, Any]:
    """FD of streamed statistics (ganpipe.metrics.streaming) against reference statistics; the
    uncertainty is the spread over the moments' Poisson-bootstrap replicates."""
    mu_ref, sigma_ref = (as_float64(x, device) for x in reference)
    r = reference_factor(sigma_ref, reference_features, device)
    draws = [distance_to_gaussian(mu_ref, sigma_ref, r, *(t.to(device) for t in moments.row(row)))
             for row in range(1 + moments.replicates)]
    result: dict[str, Any] = {"value": draws[0], "uncertainty": 0.0, "num_samples": round(float(moments.weight[0]))}
    if moments.replicates:
        result |= spread(draws[1:]) | {"bootstrap_method": "poisson"}
    return result

"""Fréchet distance between Gaussians fitted to feature sets, with a bootstrap uncertainty.

d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

tr((S_1 S_2)^(1/2)) is computed as the sum of square roots of the eigenvalues of
S_1^(1/2) S_2 S_1^(1/2), a symmetric positive semi-definite matrix: stable where the
non-symmetric product's `sqrtm` returns complex noise, and the same number in exact arithmetic.
Statistics are float64 throughout.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False) if len(features) > 1 else np.zeros((features.shape[1],) * 2)
    return mu, np.atleast_2d(sigma)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sqrt_sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     sqrt_sigma1: np.ndarray | None = None) -> float:
    if sqrt_sigma1 is None:
        sqrt_sigma1 = _psd_sqrt(sigma1)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sqrt_sigma1, sigma2)
    return float(max(value, 0.0))


def frechet_with_uncertainty(reference: tuple[np.ndarray, np.ndarray], features: np.ndarray,
                             bootstrap: int, seed: int = 0) -> dict[str, float | list[float] | int]:
    """FD of `features` against reference statistics, and the bootstrap spread over resamples
    of `features` (the reference side is fixed: it comes from cached statistics)."""
    mu_ref, sigma_ref = reference
    sqrt_ref = _psd_sqrt(sigma_ref)
    mu, sigma = gaussian_stats(features)
    value = frechet_distance(mu_ref, sigma_ref, mu, sigma, sqrt_ref)
    result: dict[str, float | list[float] | int] = {"value": value, "uncertainty": 0.0,
                                                    "num_samples": len(features)}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            resample = features[rng.integers(0, len(features), len(features))]
            draws.append(frechet_distance(mu_ref, sigma_ref, *gaussian_stats(resample), sqrt_ref))
        draws_array = np.asarray(draws)
        result["uncertainty"] = float(draws_array.std(ddof=1)) if bootstrap > 1 else 0.0
        result["ci95"] = [float(np.percentile(draws_array, 2.5)), float(np.percentile(draws_array, 97.5))]
        result["bootstrap"] = bootstrap
    return result

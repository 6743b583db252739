"""Fréchet distance between Gaussians fitted to feature sets, with a bootstrap uncertainty.

d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

tr((S_1 S_2)^(1/2)) is the sum of square roots of the eigenvalues of a symmetric positive
semi-definite matrix with the same nonzero spectrum as S_1 S_2: R S_2 R^T, or (R F^T)(R F^T)^T,
where S_1 = R^T R and S_2 = F^T F. Stable where the non-symmetric product's `sqrtm` returns
complex noise, and the same number in exact arithmetic. R is the symmetric square root of S_1,
or, with fewer samples than dimensions, the centred samples themselves (then F too): the
matrices are then samples x samples, so small evaluations and their bootstrap cost little.
Statistics are float64 throughout.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False) if len(features) > 1 else np.zeros((features.shape[1],) * 2)
    return mu, np.atleast_2d(sigma)


def centred_factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, F) with F^T F equal to the sample covariance: centred rows scaled by 1/sqrt(n - 1)."""
    features = np.asarray(features, dtype=np.float64)
    mu = features.mean(axis=0)
    return mu, (features - mu) / np.sqrt(max(len(features) - 1, 1))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def reference_factor(sigma: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
    """R with R^T R = sigma: the centred reference samples when there are fewer of them than
    dimensions (no d x d decomposition needed), else the symmetric square root."""
    if features is not None and len(features) < sigma.shape[0]:
        return centred_factor(features)[1]
    return _psd_sqrt(sigma)


def trace_sqrt_product(r: np.ndarray, sigma2: np.ndarray | None = None, f: np.ndarray | None = None) -> float:
    """tr((S_1 S_2)^(1/2)) for S_1 = r^T r, with S_2 given as its covariance or as a factor f."""
    if f is not None:
        m = r @ f.T
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    else:
        gram = r @ sigma2 @ r.T
    values = np.linalg.eigvalsh((gram + gram.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def distance_to_features(mu_ref: np.ndarray, sigma_ref: np.ndarray, r: np.ndarray, features: np.ndarray) -> float:
    """FD between the reference Gaussian (mean, covariance, factor r) and the one fitted to `features`."""
    mu, f = centred_factor(features)
    diff = mu_ref - mu
    if len(f) < f.shape[1]:
        trace2, cross = float((f * f).sum()), trace_sqrt_product(r, f=f)
    else:
        sigma = f.T @ f
        trace2, cross = float(np.trace(sigma)), trace_sqrt_product(r, sigma2=sigma)
    return float(max(diff @ diff + np.trace(sigma_ref) + trace2 - 2.0 * cross, 0.0))


def frechet_with_uncertainty(reference: tuple[np.ndarray, np.ndarray], features: np.ndarray,
                             bootstrap: int, seed: int = 0, reference_features: np.ndarray | None = None
                             ) -> dict[str, float | list[float] | int]:
    """FD of `features` against reference statistics, and the bootstrap spread over resamples
    of `features` (the reference side is fixed: it comes from cached statistics). Passing the
    reference features too lets a small reference skip the d x d square root."""
    mu_ref, sigma_ref = reference
    r = reference_factor(sigma_ref, reference_features)
    features = np.asarray(features, dtype=np.float64)
    value = distance_to_features(mu_ref, sigma_ref, r, features)
    result: dict[str, float | list[float] | int] = {"value": value, "uncertainty": 0.0,
                                                    "num_samples": len(features)}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = np.asarray([distance_to_features(mu_ref, sigma_ref, r, features[rng.integers(0, len(features),
                                                                                             len(features))])
                            for _ in range(bootstrap)])
        result["uncertainty"] = float(draws.std(ddof=1)) if bootstrap > 1 else 0.0
        result["ci95"] = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
        result["bootstrap"] = bootstrap
    return result

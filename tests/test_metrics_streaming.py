"""FID at scale, the arithmetic: the torch float64 matrix square root against scipy's `sqrtm`
(random and near-singular covariances), streamed mean and covariance against the two-pass ones
for any batching, their memory independent of the sample count, and the Poisson bootstrap
against resampling. Fast: small feature dimensions, no networks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import scipy.linalg
import torch

from ganpipe.metrics.frechet import (
    as_float64,
    distance_to_gaussian,
    frechet_of_moments,
    frechet_with_uncertainty,
    gaussian_stats,
    psd_sqrt,
)
from ganpipe.metrics.streaming import GaussianMoments, gather_moments, poisson_weights


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Matrices of 8 to 64 dimensions: threads only add hand-offs, which on a loaded machine cost
    a hundred times the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scipy_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """FID as pytorch-fid and torch-fidelity compute it."""
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def _torch_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    mu1_t, s1_t, mu2_t, s2_t = (as_float64(a) for a in (mu1, s1, mu2, s2))
    return distance_to_gaussian(mu1_t, s1_t, psd_sqrt(s1_t), mu2_t, s2_t)


def _features(n: int, dims: int, seed: int = 0, shift: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(shift, 1.0, size=(n, dims)) @ rng.normal(size=(dims, dims)) / np.sqrt(dims)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_float64_fid_equals_scipy_sqrtm_on_random_covariances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dims = 64
    a, b = rng.normal(size=(dims, 2 * dims)), rng.normal(size=(dims, 2 * dims)) + 0.3
    s1, s2 = a @ a.T / (2 * dims), b @ b.T / (2 * dims)
    mu1 = rng.normal(size=dims)
    mu2 = mu1 + 0.1 * rng.normal(size=dims)
    expected = _scipy_fd(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert _torch_fd(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_torch_float64_fid_on_a_near_singular_covariance_is_as_exact_as_scipy() -> None:
    """Rank 12 of 64 (eigenvalues 1e-13 and 0 elsewhere), the covariances commuting so the exact
    distance is known: sum (sqrt(l1) - sqrt(l2))^2. Both square roots are off by the rounding of
    the near-zero eigenvalues (about 1e-8 of the trace); ganpipe's no more than scipy's."""
    rng = np.random.default_rng(1)
    dims, rank = 64, 12
    q, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    l1 = np.where(np.arange(dims) < rank, rng.uniform(0.5, 2, dims), 1e-13)
    l2 = np.where(np.arange(dims) < rank, l1 * rng.uniform(0.8, 1.25, dims), 0.0)
    s1, s2, mu = (q * l1) @ q.T, (q * l2) @ q.T, np.zeros(dims)
    exact = float(((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum())
    ours, theirs = _torch_fd(mu, s1, mu, s2), _scipy_fd(mu, s1, mu, s2)
    scale = np.trace(s1) + np.trace(s2)
    assert abs(ours - theirs) < 1e-7 * scale
    assert abs(ours - exact) <= max(abs(theirs - exact), 1e-12 * scale)
    assert exact > 1e-2  # the distance itself is resolved: it is 5e5 times the error


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streamed_moments_equal_the_two_pass_statistics_for_any_batching(batch: int) -> None:
    features = _features(300, 24)
    moments = GaussianMoments(24)
    for first in range(0, len(features), batch):
        moments.update(torch.from_numpy(features[first:first + batch]), first)
    mu, sigma = gaussian_stats(features)
    streamed_mu, streamed_sigma = moments.row(0)
    np.testing.assert_allclose(streamed_mu.numpy(), mu, rtol=0, atol=1e-12 * np.abs(mu).max())
    np.testing.assert_allclose(streamed_sigma.numpy(), sigma, rtol=0, atol=1e-12 * np.abs(sigma).max())
    assert float(moments.weight[0]) == 300


def test_ranges_merged_in_order_equal_one_pass_and_the_bootstrap_weights_follow_the_sample() -> None:
    """What two Accelerate processes do: each streams its own range, then the moments merge.
    Each sample keeps its bootstrap weights whatever range or batch it arrives in."""
    features = torch.from_numpy(_features(101, 8, seed=3))
    whole = GaussianMoments(8, replicates=4, seed=9)
    whole.update(features, 0)
    first_half, second_half = GaussianMoments(8, 4, seed=9), GaussianMoments(8, 4, seed=9)
    for start in range(0, 51, 10):
        first_half.update(features[start:min(start + 10, 51)], start)
    second_half.update(features[51:], 51)
    first_half.merge(second_half)
    for mine, theirs in zip(first_half.tensors(), whole.tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(poisson_weights(9, 4, 40, 20, "cpu"), poisson_weights(9, 4, 0, 100, "cpu")[:, 40:60])
    assert not torch.equal(poisson_weights(9, 4, 0, 100, "cpu"), poisson_weights(10, 4, 0, 100, "cpu"))
    # Replicate 1 equals the plain statistics of the samples repeated by their weights.
    counts = poisson_weights(9, 4, 0, 101, "cpu")[0].long()
    repeated = features.double().repeat_interleave(counts, dim=0).numpy()
    mu, sigma = gaussian_stats(repeated)
    np.testing.assert_allclose(whole.row(1)[0].numpy(), mu, atol=1e-12)
    np.testing.assert_allclose(whole.row(1)[1].numpy(), sigma, atol=1e-12)


def test_poisson_weights_have_the_poisson_distribution() -> None:
    weights = poisson_weights(0, 50, 0, 4000, "cpu").numpy()
    assert weights.mean() == pytest.approx(1.0, abs=0.01) and weights.var() == pytest.approx(1.0, abs=0.02)
    assert (weights == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    assert (weights == 3).mean() == pytest.approx(np.exp(-1) / 6, abs=0.003)
    correlation = np.corrcoef(weights[0], weights[1])[0, 1]
    assert abs(correlation) < 0.05  # replicates independent


def test_streamed_memory_does_not_grow_with_the_sample_count() -> None:
    sizes = []
    for n in (50, 5000):
        moments = GaussianMoments(32, replicates=3)
        for first in range(0, n, 500):
            moments.update(torch.from_numpy(_features(min(500, n - first), 32, seed=first)), first)
        sizes.append(moments.nbytes)
        assert float(moments.weight[0]) == n
    assert sizes[0] == sizes[1] == 4 * (1 + 32 + 32 * 32) * 8


def test_fid_of_streamed_moments_equals_fid_of_the_features_with_a_comparable_bootstrap() -> None:
    real, fake = _features(400, 16, seed=1), _features(600, 16, seed=2, shift=3.2)
    reference = gaussian_stats(real)
    moments = GaussianMoments(16, replicates=200, seed=5)
    for first in range(0, 600, 128):
        moments.update(torch.from_numpy(fake[first:first + 128]), first)
    streamed = frechet_of_moments(reference, moments)
    held = frechet_with_uncertainty(reference, fake, bootstrap=200, seed=5)
    assert streamed["value"] == pytest.approx(held["value"], rel=1e-10)
    assert streamed["num_samples"] == 600 and streamed["bootstrap"] == 200
    assert streamed["bootstrap_method"] == "poisson"
    # Two estimates of one spread, 200 replicates each: within 25% of each other.
    assert 0.75 < streamed["uncertainty"] / held["uncertainty"] < 1.33
    low, high = streamed["ci95"]
    assert low < streamed["value"] < high
    # Few reference samples (fewer than the dimensions): the samples-as-factor path, the same value.
    few = real[:10]
    assert frechet_of_moments(gaussian_stats(few), moments, few)["value"] == pytest.approx(
        frechet_of_moments(gaussian_stats(few), moments)["value"], rel=1e-8)


class _TwoProcesses:
    """What `accelerator.gather` hands every process: both processes' tensors, rank 0's first."""

    num_processes = 2

    def __init__(self, parts: list[GaussianMoments]):
        self.parts = parts

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        index = next(i for i, t in enumerate(self.parts[0].tensors()) if t is tensor)
        return torch.cat([part.tensors()[index] for part in self.parts])


def test_moments_gathered_from_two_processes_equal_one_pass() -> None:
    features = torch.from_numpy(_features(90, 6, seed=4))
    whole = GaussianMoments(6, replicates=3, seed=2)
    whole.update(features, 0)
    parts = [GaussianMoments(6, 3, seed=2), GaussianMoments(6, 3, seed=2)]
    parts[0].update(features[:45], 0)
    parts[1].update(features[45:], 45)
    merged = gather_moments(_TwoProcesses(parts), parts[0])
    for mine, theirs in zip(merged.tensors(), whole.tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)

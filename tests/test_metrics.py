"""Metric arithmetic against independent references (scipy, torch-fidelity), sample ranges for
distributed extraction, and where the Inception weights come from. Fast: no networks at 299x299."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ganpipe.errors import UserError
from ganpipe.generators import LoadedGenerator
from ganpipe.metrics.frechet import (
    distance_to_features,
    frechet_with_uncertainty,
    gaussian_stats,
    reference_factor,
)
from ganpipe.metrics.inception import WeightsMissing, load_network, resolve_weights
from ganpipe.metrics.kid import kid
from ganpipe.metrics.parallel import shard
from ganpipe.metrics.precision_recall import precision_recall
from ganpipe.metrics.samples import GeneratedSamples
from ganpipe.networks import NetworkSpec, build_generator


def _two_feature_sets(n_real: int, n_fake: int, dims: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, dims)).astype(np.float32)
    mixing = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    fake = (rng.normal(0.4, 1.0, size=(n_fake, dims)) @ mixing).astype(np.float32)
    return real, fake


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


@pytest.mark.parametrize(("n_real", "n_fake"), [(10, 15), (200, 12), (12, 200), (200, 300)])
def test_frechet_distance_matches_scipy_sqrtm_with_few_and_many_samples(n_real: int, n_fake: int) -> None:
    real, fake = _two_feature_sets(n_real, n_fake)
    mu, sigma = gaussian_stats(real)
    expected = _scipy_fd(real, fake)
    # Few samples take the samples-as-factor path; many, the d x d square root; both give the same number.
    for factor in (reference_factor(sigma, real), reference_factor(sigma)):
        assert distance_to_features(mu, sigma, factor, fake) == pytest.approx(expected, rel=1e-6)
    assert expected > 1.0


def test_frechet_bootstrap_gives_an_interval_around_the_value() -> None:
    real, fake = _two_feature_sets(300, 300)
    result = frechet_with_uncertainty(gaussian_stats(real), fake, bootstrap=30, seed=1)
    low, high = result["ci95"]
    assert result["uncertainty"] > 0 and low < result["value"] < high * 1.2
    assert result["bootstrap"] == 30 and result["num_samples"] == 300
    again = frechet_with_uncertainty(gaussian_stats(real), fake, bootstrap=30, seed=1)
    assert again == result  # seeded: the same interval every time


def test_kid_equals_torch_fidelity_on_the_same_features() -> None:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    real, fake = _two_feature_sets(120, 90)
    ours = kid(fake, real, subsets=20, subset_size=50, seed=7)
    theirs = kid_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), kid_subsets=20,
                                    kid_subset_size=50, rng_seed=7, verbose=False)
    assert ours["value"] > 0.05  # clearly different sets
    assert ours["value"] == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=1e-4)
    assert ours["uncertainty"] == pytest.approx(theirs[KEY_METRIC_KID_STD], rel=1e-3)
    same = kid(real[:60], real[60:], subsets=20, subset_size=50, seed=7)
    assert abs(same["value"]) < ours["value"] / 10  # unbiased: near zero for one distribution


def test_precision_recall_equal_torch_fidelity_and_follow_coverage() -> None:
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = _two_feature_sets(150, 100)
    ours = precision_recall(fake, real)
    theirs = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-9)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-9)
    assert ours["value"] == pytest.approx(theirs["f_score"], rel=1e-6)
    # A mode-collapsed generator (near-copies of five real samples): precise, but poor recall.
    rng = np.random.default_rng(3)
    modes = real[np.repeat(np.arange(5), 8)] + rng.normal(0, 0.01, size=(40, real.shape[1])).astype(np.float32)
    collapsed = precision_recall(modes, real)
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.2
    assert 0 < collapsed["recall_uncertainty"] < 0.1


def test_shards_tile_the_samples_exactly_once() -> None:
    for num_samples, world in [(1, 1), (7, 2), (10, 3), (101, 2), (101, 8), (8, 8)]:
        ranges = [shard(num_samples, rank, world) for rank in range(world)]
        covered = np.concatenate([np.arange(start, stop) for start, stop in ranges])
        assert covered.tolist() == list(range(num_samples)), (num_samples, world)
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_generated_samples_in_ranges_equal_one_pass() -> None:
    spec = NetworkSpec(family="dcgan", sample_shape=(1, 16, 16), latent_dim=8, num_classes=3, g_width=4, d_width=4)
    torch.manual_seed(0)
    loaded = LoadedGenerator(build_generator(spec).eval(), spec, {})
    samples = GeneratedSamples(loaded, 11, seed=5)
    whole = [(b, y) for b, y in samples.batches(batch_size=4)]
    parts = [(b, y) for start, stop in (shard(11, r, 2) for r in range(2))
             for b, y in samples.batches(batch_size=4, start=start, stop=stop)]
    assert torch.equal(torch.cat([b for b, _ in whole]), torch.cat([b for b, _ in parts]))
    assert torch.equal(torch.cat([y for _, y in whole]), torch.cat([y for _, y in parts]))
    assert torch.cat([b for b, _ in whole]).shape == (11, 16, 16, 1)


# --- where the FID weights come from -------------------------------------------------------------

def test_weights_come_from_the_flag_then_the_environment_then_the_download_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("GANPIPE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(WeightsMissing) as missing:
        resolve_weights(None)
    message = str(missing.value)
    assert "--inception-weights" in message and "GANPIPE_INCEPTION_WEIGHTS" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "never downloads" in message

    cached = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights(None) == cached
    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"x")
    monkeypatch.setenv("GANPIPE_INCEPTION_WEIGHTS", str(from_env))
    assert resolve_weights(None) == from_env
    explicit = tmp_path / "flag.pth"
    explicit.write_bytes(b"x")
    assert resolve_weights(str(explicit)) == explicit
    with pytest.raises(UserError, match="nope.pth: file not found"):
        resolve_weights(str(tmp_path / "nope.pth"))


class _Payload:
    """Unpickling this would run code (create a file): a weights file must never be able to."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_weights_file_is_never_unpickled_as_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(str(marker))}, f, pickle_module=pickle)
    with pytest.raises(UserError, match="evil.pth: not a pt_inception-2015-12-05 state dict"):
        load_network(evil)
    assert not marker.exists()

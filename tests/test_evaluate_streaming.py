"""FID of a generator at scale, end to end on a CPU: the generated side streams (generated,
resized and passed through Inception on the device, its features folded into float64 mean and
covariance there, never held), gives the FID of the held features, makes no host round trip on
the way (counted with tests.host_syncs as the training step's syncs are), and reads features
another metric needs rather than extracting twice. The streaming threshold is lowered
(`stream_from`) so a handful of samples takes the path 50,000 would; random Inception weights
stand in for the FID file (tests.fixtures)."""

from __future__ import annotations

from functools import partialmethod
from pathlib import Path

import pytest
import torch

from ganpipe.config import DataConfig
from ganpipe.data import PreparedData, ingest, open_prepared
from ganpipe.generators import LoadedGenerator
from ganpipe.metrics import EvalContext, evaluate
from ganpipe.metrics.inception import InceptionFeatures
from ganpipe.metrics.samples import GeneratedSamples, RealSamples
from ganpipe.networks import NetworkSpec, build_generator
from tests.fixtures import accept_as_standard, write_random_weights
from tests.host_syncs import HostSyncCounter

pytestmark = pytest.mark.slow  # InceptionV3 at 299 x 299 on a CPU: a few seconds per context
REAL, FAKE = 6, 7


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("weights") / "random-inception.pth")


@pytest.fixture
def sides(random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[PreparedData, LoadedGenerator]:
    accept_as_standard(monkeypatch, random_weights)
    data = open_prepared(ingest(DataConfig(source="builtin:digits", resolution=16)).location)
    spec = NetworkSpec(family="dcgan", sample_shape=(1, 16, 16), latent_dim=8, g_width=4, d_width=4)
    torch.manual_seed(0)
    return data, LoadedGenerator(build_generator(spec).eval(), spec, {})


def _context(sides: tuple[PreparedData, LoadedGenerator], weights: Path, **options: object) -> EvalContext:
    data, loaded = sides
    return EvalContext(RealSamples(data, REAL), GeneratedSamples(loaded, FAKE, seed=1), inception_weights=str(weights),
                       **options)  # type: ignore[arg-type]


def _count_extracted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    extracted: list[int] = []
    original = InceptionFeatures.tensor

    def counting(self: InceptionFeatures, batch: torch.Tensor) -> torch.Tensor:
        extracted.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(InceptionFeatures, "tensor", counting)
    return extracted


def test_streamed_fid_equals_the_fid_of_held_features_and_holds_no_generated_features(
        sides: tuple[PreparedData, LoadedGenerator], random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extracted = _count_extracted(monkeypatch)
    held_ctx = _context(sides, random_weights, bootstrap=0)
    held = evaluate(held_ctx, ["fid"])["fid"]
    assert held["streamed"] is False and sum(extracted) == REAL + FAKE

    extracted.clear()
    streamed_ctx = _context(sides, random_weights, bootstrap=4, stream_from=0)
    streamed = evaluate(streamed_ctx, ["fid"])["fid"]
    assert sum(extracted) == FAKE, "the reference statistics come from the cache, not a second extraction"
    assert streamed["streamed"] is True and streamed["num_samples"] == FAKE and streamed["num_real"] == REAL
    assert streamed["value"] == pytest.approx(held["value"], rel=1e-9)
    assert held["value"] > 1.0  # digits against an untrained generator's noise
    assert streamed["bootstrap"] == 4 and streamed["bootstrap_method"] == "poisson" and streamed["uncertainty"] > 0
    held_sides = {side for _, side in streamed_ctx._features}
    assert id(streamed_ctx.fake) not in held_sides, "generated features must not be held when streaming"
    assert streamed_ctx._moments[streamed_ctx.extractor("inception").id].nbytes == 5 * (1 + 2048 + 2048**2) * 8


def test_streaming_generates_and_extracts_without_a_host_round_trip(
        sides: tuple[PreparedData, LoadedGenerator], random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, a readback (`.cpu()`, `.numpy()`, `.item()`) or a blocking copy would stall the
    device each batch; on the CPU the hook finds the calls that would (tests/host_syncs.py).
    Batches of 3: the loop runs three times."""
    monkeypatch.setattr(GeneratedSamples, "batches", partialmethod(GeneratedSamples.batches, 3))
    ctx = _context(sides, random_weights, bootstrap=3, stream_from=0)
    ctx.extractor("inception")  # loaded (its weights placed on the device) before counting
    with HostSyncCounter() as syncs:
        moments = ctx.fake_moments("inception")
    assert dict(syncs.events) == {}
    assert float(moments.weight[0]) == FAKE


def test_fid_reads_the_features_kid_needs_instead_of_extracting_twice(
        sides: tuple[PreparedData, LoadedGenerator], random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extracted = _count_extracted(monkeypatch)
    alone = evaluate(_context(sides, random_weights, bootstrap=0, stream_from=0), ["fid"])["fid"]
    extracted.clear()
    both = evaluate(_context(sides, random_weights, bootstrap=0, stream_from=0), ["fid", "kid"])
    assert sum(extracted) == FAKE, "kid holds the generated features; fid folds them in without a second pass"
    assert both["fid"]["streamed"] is True and both["fid"]["value"] == pytest.approx(alone["value"], rel=1e-9)
    assert both["kid"]["num_samples"] == FAKE

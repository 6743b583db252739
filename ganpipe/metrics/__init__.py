"""Quality metrics: one registry, one `evaluate` used by the CLI and the pipeline.

Each metric is a function of an `EvalContext` (the real and generated samples, feature
extractors, cached features) returning a dict with at least `value` and `uncertainty`.

Reference features of real data, and their float64 mean and covariance, are cached under
$GANPIPE_HOME/cache/stats/<key>/ where the key covers the dataset fingerprint (which covers its
preprocessing), the feature extractor (for Inception: the weights file's hash and the input
preprocessing), the sample count and the subset seed. A second evaluation against the same data
reads them instead of extracting again.

The generated side of a Fréchet distance (fid, fd_domain) streams when it has at least as many
samples as the features have dimensions (`EvalContext.stream_from`) and no other requested
metric needs its features whole (kid, pr, coverage, density do): generated on the device,
resized and fed to the feature network there, its features folded into float64 mean and
covariance on the device (ganpipe.metrics.streaming), so FID of 50,000 images holds d x d
matrices, not 50,000 x d features, and only the final statistics reach the host. Below that
count, the features are held and the distance uses them as a factor (cheaper than d x d).

Under `accelerate launch` (`ganpipe evaluate --num-processes N`), every process extracts
features for its own contiguous range of samples, the ranges are gathered in order, and the main
process computes the metrics.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganpipe import storage
from ganpipe.errors import UserError
from ganpipe.metric_settings import MetricSettings
from ganpipe.metrics.frechet import frechet_of_moments, frechet_with_uncertainty, gaussian_stats
from ganpipe.metrics.parallel import gather_rows, shard
from ganpipe.metrics.samples import Batch, GeneratedSamples, RealSamples
from ganpipe.metrics.streaming import GaussianMoments, gather_moments

Samples = RealSamples | GeneratedSamples
CHUNK_ROWS = 4096  # held features folded into streamed statistics this many rows at a time


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (missing weights, no labels); the others still run."""


def default_device(accelerator: Any | None = None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def main_process_first(accelerator: Any | None) -> Iterator[None]:
    """The main process runs the block first (it may train, download or write a cache the others
    then read); the others wait for it, even when it fails."""
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed and not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    try:
        yield
    finally:
        if distributed and accelerator.is_main_process:
            accelerator.wait_for_everyone()


@dataclass
class EvalContext:
    real: RealSamples
    fake: Samples
    bootstrap: int = 20
    seed: int = 0
    inception_weights: str | None = None
    accelerator: Any | None = None  # an accelerate.Accelerator when run under `accelerate launch`
    settings: MetricSettings = field(default_factory=MetricSettings)  # the eval.* keys of single metrics
    stream_from: int | None = None  # generated samples from which FD statistics stream (None: feature dims)
    whole_features: set[str] = field(default_factory=set)  # extractors whose fake features a metric needs whole
    _extractors: dict[str, Any] = field(default_factory=dict)
    _features: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    _shared: dict[Any, dict[str, Any]] = field(default_factory=dict)  # results two metrics share
    _moments: dict[str, GaussianMoments] = field(default_factory=dict)  # streamed fake-side statistics

    @property
    def device(self) -> torch.device:
        return default_device(self.accelerator)

    @property
    def rank_and_world(self) -> tuple[int, int]:
        acc = self.accelerator
        return (acc.process_index, acc.num_processes) if acc is not None else (0, 1)

    @property
    def is_main(self) -> bool:
        return self.rank_and_world[0] == 0

    def extractor(self, name: str) -> Any:
        """A feature function by name ("inception", "domain"), built once per evaluation."""
        if name not in self._extractors:
            self._extractors[name] = EXTRACTORS[name](self)
        return self._extractors[name]

    def features(self, name: str, side: Samples) -> np.ndarray:
        """float32 features of one side; the real side's are read from, or written to, the cache."""
        extractor = self.extractor(name)
        key = (extractor.id, id(side))
        if key not in self._features:
            entry = self.cache_entry(extractor, side) if isinstance(side, RealSamples) else None
            if entry is not None and (entry / "features.npy").exists():
                self._features[key] = np.load(entry / "features.npy", mmap_mode="r")
            else:
                self._features[key] = self._extract(extractor, side)
                if entry is not None:
                    self._store(entry, extractor, side, self._features[key])
        return self._features[key]

    def reference_stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """float64 mean and covariance of the real side's features (cached beside them)."""
        entry = self.cache_entry(self.extractor(name), self.real)
        if not (entry / "stats.npz").exists():
            self.features(name, self.real)
        with np.load(entry / "stats.npz") as stats:
            return stats["mu"], stats["sigma"]

    def streams(self, name: str) -> bool:
        """Whether the fake side's Fréchet statistics stream (see the module doc)."""
        threshold = self.extractor(name).dims if self.stream_from is None else self.stream_from
        return self.fake.num_samples >= threshold

    def fake_moments(self, name: str) -> GaussianMoments:
        """float64 mean and covariance of the fake side's features, with `bootstrap` Poisson
        replicates, accumulated on the device. Extracted for them alone unless the features are
        held anyway (another metric needs them, or the fake side is a dataset, whose features are
        cached): then folded in from those."""
        extractor = self.extractor(name)
        if extractor.id in self._moments:
            return self._moments[extractor.id]
        moments = GaussianMoments(extractor.dims, self.bootstrap, self.seed, self.device)
        if name in self.whole_features or (extractor.id, id(self.fake)) in self._features \
                or isinstance(self.fake, RealSamples):
            features = self.features(name, self.fake)
            for first in range(0, len(features), CHUNK_ROWS):
                moments.update(torch.from_numpy(np.array(features[first:first + CHUNK_ROWS])), first)
        else:
            rank, world = self.rank_and_world
            first, stop = shard(self.fake.num_samples, rank, world)
            for batch, _ in self._batches(self.fake, first, stop):
                moments.update(extractor.tensor(batch), first)
                first += len(batch)
            if world > 1:
                moments = gather_moments(self.accelerator, moments)
        self._moments[extractor.id] = moments
        return moments

    def cache_entry(self, extractor: Any, side: RealSamples) -> Path:
        key = {"extractor": extractor.id, "samples": side.cache_key}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return storage.ganpipe_home() / "cache" / "stats" / digest

    def _extract(self, extractor: Any, side: Samples) -> np.ndarray:
        rank, world = self.rank_and_world
        start, stop = shard(side.num_samples, rank, world)
        local = np.concatenate([extractor(batch) for batch, _ in self._batches(side, start, stop)])
        return gather_rows(self.accelerator, local, side.num_samples) if world > 1 else local

    @staticmethod
    def _batches(side: Samples, start: int, stop: int) -> Iterator[Batch]:
        """Generated images stay on the generator's device: the feature network takes them from
        there (Inception on the same device; fd_domain's small network brings them to the CPU)."""
        if isinstance(side, GeneratedSamples):
            return side.batches(start=start, stop=stop, on_device=True)
        return side.batches(start=start, stop=stop)

    def _store(self, entry: Path, extractor: Any, side: RealSamples, features: np.ndarray) -> None:
        if self.is_main:
            mu, sigma = gaussian_stats(features)
            with storage.atomic_directory(entry) as tmp:
                np.save(tmp / "features.npy", features)
                np.savez(tmp / "stats.npz", mu=mu, sigma=sigma)
                (tmp / "meta.json").write_text(json.dumps(
                    {"extractor": extractor.id, "extractor_info": extractor.info, "samples": side.cache_key,
                     "fingerprint": side.data.fingerprint, "num_samples": side.num_samples, "seed": side.seed,
                     "created_at": time.time()}, indent=2))
        if self.rank_and_world[1] > 1:
            self.accelerator.wait_for_everyone()


# --- feature extractors ----------------------------------------------------------------------------

def _inception(ctx: EvalContext) -> Any:
    from ganpipe.metrics.inception import InceptionFeatures, WeightsUnavailable, standard_weights

    if ctx.real.data.kind != "image":
        raise MetricUnavailable("Inception features need image data")
    with main_process_first(ctx.accelerator):  # hash and load once from a cold disk, then the others
        try:
            weights, sha256 = standard_weights(ctx.inception_weights)
        except WeightsUnavailable as exc:
            raise MetricUnavailable(str(exc)) from None
        return InceptionFeatures(weights, ctx.device, sha256=sha256)


def _domain(ctx: EvalContext) -> Any:
    from ganpipe.metrics.domain import DomainFeatures

    with main_process_first(ctx.accelerator):  # the main process trains and caches the network; the others load it
        return DomainFeatures(ctx.real.data)


EXTRACTORS: dict[str, Callable[[EvalContext], Any]] = {"inception": _inception, "domain": _domain}


# --- metrics ---------------------------------------------------------------------------------------

def rank_warning(num_samples: int, dims: int, what: str) -> str | None:
    if num_samples >= dims:
        return None
    return (f"{what} from {num_samples} samples is unreliable: fewer than the {dims} feature dimensions, "
            f"so the covariance is rank-deficient and the distance biased upwards; use --num-samples {dims} "
            "or more (50,000 for numbers comparable with papers)")


def _frechet(ctx: EvalContext, extractor: str, what: str) -> dict[str, Any]:
    reference = ctx.reference_stats(extractor)
    # A reference smaller than the feature dimension is used as samples: no d x d square root needed.
    few = ctx.real.num_samples < len(reference[0])
    reference_features = ctx.features(extractor, ctx.real) if few else None
    result: dict[str, Any]
    if ctx.streams(extractor):
        result = frechet_of_moments(reference, ctx.fake_moments(extractor), reference_features, ctx.device)
    else:
        result = frechet_with_uncertainty(reference, ctx.features(extractor, ctx.fake), ctx.bootstrap, ctx.seed,
                                          reference_features, ctx.device)
    result["num_real"] = ctx.real.num_samples
    result["streamed"] = ctx.streams(extractor)
    warning = rank_warning(min(ctx.real.num_samples, ctx.fake.num_samples), len(reference[0]), what)
    if warning:
        result["warning"] = warning
    return result


def _fid(ctx: EvalContext) -> dict[str, Any]:
    return _frechet(ctx, "inception", "FID") | ctx.extractor("inception").info


def _fd_domain(ctx: EvalContext) -> dict[str, Any]:
    return _frechet(ctx, "domain", "fd_domain") | {"extractor": ctx.extractor("domain").info.get("kind")}


def _kid(ctx: EvalContext) -> dict[str, Any]:
    from ganpipe.metrics.kid import kid

    # On the CPU whatever the device: torch-fidelity's KID is numpy (100 subsets of 1,000: seconds).
    return kid(ctx.features("inception", ctx.fake), ctx.features("inception", ctx.real), seed=ctx.seed)


def _pr(ctx: EvalContext) -> dict[str, Any]:
    from ganpipe.metrics.precision_recall import precision_recall

    return precision_recall(ctx.features("inception", ctx.fake), ctx.features("inception", ctx.real),
                            device=ctx.device)


def _conditional_generator(ctx: EvalContext, metric: str) -> GeneratedSamples:
    """The generated side, when it is a conditional generator of the real data's classes."""
    fake, data = ctx.fake, ctx.real.data
    if not isinstance(fake, GeneratedSamples) or not fake.spec.conditional:
        raise MetricUnavailable(f"{metric} needs a conditional generator as --fake")
    if data.num_classes != fake.spec.num_classes or (fake.spec.classes and tuple(data.classes or ()) !=
                                                     tuple(fake.spec.classes)):
        raise MetricUnavailable(f"{metric} needs real data labelled with the generator's classes "
                                f"({', '.join(fake.spec.classes) or fake.spec.num_classes}); the real data has "
                                f"{', '.join(data.classes or []) or 'no labels'}")
    return fake


def _cas(ctx: EvalContext) -> dict[str, Any]:
    from ganpipe.metrics.cas import cas

    if ctx.real.data.kind != "image":
        raise MetricUnavailable("CAS is implemented for image data")
    return cas(ctx.real.data, _conditional_generator(ctx, "CAS"), seed=ctx.seed)


def _uplift(ctx: EvalContext) -> dict[str, Any]:
    from ganpipe.metrics.uplift import uplift

    fake = _conditional_generator(ctx, "uplift")
    return uplift(ctx.real.data, fake.loaded, ctx.settings, seed=ctx.seed, device=fake.device)


def _neighbourhood_features(ctx: EvalContext) -> str:
    """coverage/density's features: Inception's when its weights are here, else fd_domain's
    (for vectors: the standardised vectors)."""
    try:
        ctx.extractor("inception")
        return "inception"
    except MetricUnavailable:
        return "domain"


def _coverage_density(ctx: EvalContext) -> dict[str, Any]:
    from ganpipe.metrics.coverage import coverage_density

    features = _neighbourhood_features(ctx)
    key = ("coverage_density", features, ctx.settings.prdc_k)
    if key not in ctx._shared:
        real, fake = ctx.features(features, ctx.real), ctx.features(features, ctx.fake)
        try:
            result = coverage_density(real, fake, ctx.settings.prdc_k, ctx.device)
        except ValueError as exc:
            raise MetricUnavailable(str(exc)) from None
        kind = ctx.extractor(features).info.get("kind", features) if features == "domain" else "inception"
        ctx._shared[key] = result | {"features": kind}
    return ctx._shared[key]


def _coverage(ctx: EvalContext) -> dict[str, Any]:
    result = _coverage_density(ctx)
    return {"value": result["coverage"], "uncertainty": result["coverage_uncertainty"]} | result


def _density(ctx: EvalContext) -> dict[str, Any]:
    result = _coverage_density(ctx)
    return {"value": result["density"], "uncertainty": result["density_uncertainty"]} | result


def _super_resolution(ctx: EvalContext) -> dict[str, Any]:
    raise MetricUnavailable("psnr, ssim and lpips measure a super-resolution model (model.family srgan) on its "
                            "run's held-out images: evaluate the run (the pipeline's evaluate task)")


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    compute: Callable[[EvalContext], dict[str, Any]]
    description: str
    # The features it needs (a name, or a function choosing one): extracted by every process together.
    extractor: str | Callable[[EvalContext], str] | None = None
    streams: bool = False  # needs only the fake side's mean and covariance (EvalContext.fake_moments)

    def features(self, ctx: EvalContext) -> str | None:
        return self.extractor(ctx) if callable(self.extractor) else self.extractor


METRICS: dict[str, Metric] = {
    "fid": Metric("fid", False, _fid, "Fréchet Inception Distance (InceptionV3 pool3, standard FID weights)",
                  "inception", streams=True),
    "kid": Metric("kid", False, _kid, "Kernel Inception Distance (unbiased polynomial-kernel MMD^2)", "inception"),
    "pr": Metric("pr", True, _pr, "improved precision and recall (k-NN manifolds); value: their F1",
                 "inception"),
    "cas": Metric("cas", True, _cas, "Classification Accuracy Score: trained on generated, tested on real"),
    "fd_domain": Metric("fd_domain", False, _fd_domain,
                        "Fréchet distance on features of a small network trained on this dataset (not FID)",
                        "domain", streams=True),
    "psnr": Metric("psnr", True, _super_resolution, "super-resolution: PSNR (dB) on held-out images, border "
                   "cropped by the scale, Y channel by default; psnr_bicubic beside it"),
    "ssim": Metric("ssim", True, _super_resolution, "super-resolution: SSIM on held-out images (as psnr)"),
    "lpips": Metric("lpips", False, _super_resolution, "super-resolution: LPIPS v0.1 (Zhang et al. 2018) on "
                    "held-out images, RGB, border cropped, with eval.lpips_weights; lpips_bicubic beside it"),
    "uplift": Metric("uplift", True, _uplift, "augmentation value: held-out accuracy gained by a downstream "
                     "classifier trained on real + synthetic rows at the best of eval.uplift_ratios"),
    "coverage": Metric("coverage", True, _coverage, "coverage (Naeem et al. 2020): share of real samples with a "
                       "generated one within their k-NN ball; falls when modes are dropped", _neighbourhood_features),
    "density": Metric("density", True, _density, "density (Naeem et al. 2020): mean number of real k-NN balls "
                      "holding a generated sample, over k (about 1 when the sides match)", _neighbourhood_features),
}


def check_metric_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown metric(s) {', '.join(unknown)} (available: {', '.join(METRICS)})")


def whole_features(ctx: EvalContext, names: list[str]) -> set[str]:
    """The extractors whose fake-side features a requested metric needs whole (kid, pr, coverage,
    density): a Fréchet distance on them then reads those rather than extracting twice."""
    needed = set()
    for name in names:
        metric = METRICS[name]
        try:
            features = None if metric.streams else metric.features(ctx)
        except MetricUnavailable:
            continue  # reported when the metric itself runs
        if features:
            needed.add(features)
    return needed


def evaluate(ctx: EvalContext, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every requested metric; one that cannot run here reports why and the others still run.
    Under Accelerate all processes extract features together and only the main one computes
    (the others return an empty dict)."""
    check_metric_names(names)
    rank, world = ctx.rank_and_world
    if ctx.fake.num_samples < world or ctx.real.num_samples < world:
        raise UserError(f"--num-samples: at least one sample per process ({world}) is needed")
    results: dict[str, dict[str, Any]] = {}
    # Both sides have the real data's size (see ganpipe.evaluate): said in every metric's result.
    shown = {"resolution": ctx.real.data.sample_shape[1]} if ctx.real.data.kind == "image" else {}
    ctx.whole_features = whole_features(ctx, names)
    for name in names:
        metric = METRICS[name]
        try:
            features = metric.features(ctx) if world > 1 else None
            if features:
                ctx.features(features, ctx.real)
                if metric.streams and ctx.streams(features):
                    ctx.fake_moments(features)
                else:
                    ctx.features(features, ctx.fake)
            if rank == 0:
                results[name] = metric.compute(ctx) | shown
        except MetricUnavailable as exc:
            if rank == 0:
                print(f"warning: {name} skipped: {exc}", file=sys.stderr)
            results[name] = {"value": None, "uncertainty": None, "error": str(exc)} | shown
    return results if rank == 0 else {}

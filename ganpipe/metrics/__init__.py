"""Quality metrics: one registry, one `evaluate` used by the CLI and the pipeline.

Each metric is a function of an `EvalContext` (the real and generated samples, and cached
features) returning a dict with at least `value` and `uncertainty`. Reference features of real
data are cached under $GANPIPE_HOME/cache/stats, keyed by dataset fingerprint, feature
extractor, sample count and seed, so a second evaluation against the same data reuses them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ganpipe import storage
from ganpipe.errors import UserError
from ganpipe.metrics.frechet import frechet_with_uncertainty, gaussian_stats
from ganpipe.metrics.samples import GeneratedSamples, RealSamples

Samples = RealSamples | GeneratedSamples


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (missing weights, no labels); the others still run."""


@dataclass
class EvalContext:
    real: RealSamples
    fake: Samples
    bootstrap: int = 20
    seed: int = 0
    inception_weights: str | None = None
    _features: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def features(self, extractor: Any, side: Samples) -> np.ndarray:
        """Features of one side, computed once per extractor; real-data features cached on disk."""
        key = (extractor.id, id(side))
        if key in self._features:
            return self._features[key]
        cache_file = None
        if isinstance(side, RealSamples):
            digest = hashlib.sha256(f"{extractor.id}|{side.cache_key}".encode()).hexdigest()[:24]
            cache_file = storage.ganpipe_home() / "cache" / "stats" / f"{digest}.npy"
            if cache_file.exists():
                self._features[key] = np.load(cache_file)
                return self._features[key]
        features = np.concatenate([extractor(batch) for batch, _ in side.batches()])
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npy")
            np.save(tmp, features)
            tmp.replace(cache_file)
        self._features[key] = features
        return features


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    compute: Callable[[EvalContext], dict[str, Any]]
    description: str


def _fd_domain(ctx: EvalContext) -> dict[str, Any]:
    from ganpipe.metrics.domain import DomainFeatures

    extractor = DomainFeatures(ctx.real.data)
    real = ctx.features(extractor, ctx.real)
    fake = ctx.features(extractor, ctx.fake)
    result = frechet_with_uncertainty(gaussian_stats(real), fake, ctx.bootstrap, ctx.seed)
    result["extractor"] = extractor.info.get("kind")
    if min(len(real), len(fake)) < real.shape[1]:
        result["warning"] = (f"fewer samples ({min(len(real), len(fake))}) than feature dimensions "
                             f"({real.shape[1]}): the covariance is rank-deficient")
    return result


METRICS: dict[str, Metric] = {
    "fd_domain": Metric("fd_domain", False, _fd_domain,
                        "Fréchet distance on features of a small network trained on this dataset (not FID)"),
}


def evaluate(ctx: EvalContext, names: list[str]) -> dict[str, dict[str, Any]]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown metric(s) {', '.join(unknown)} (available: {', '.join(METRICS)})")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            results[name] = METRICS[name].compute(ctx)
        except MetricUnavailable as exc:
            print(f"warning: {name} skipped: {exc}", file=sys.stderr)
            results[name] = {"value": None, "uncertainty": None, "error": str(exc)}
    return results

"""Optional quality gates for exports (off by default): judge every candidate row on its own.

- Discriminator gate (`--drop-lowest-d FRACTION`, key export.drop_lowest_d): the run's
  discriminator (from its latest checkpoint) scores each row; rows scoring below a threshold are
  dropped. The threshold is the FRACTION-quantile of the scores of CALIBRATION_ROWS calibration
  rows, one threshold per class for conditional models (the discriminator rates some classes lower
  overall, and a global cut would empty them), computed once per export and kept in the output's
  `.gates.json`, so every rank and every rerun uses the same thresholds.
- Memorisation check (`--memorisation-check report|drop`, export.memorisation_check): each row's
  nearest training example in fd_domain feature space (ganpipe.metrics.domain). Its distance
  divided by the typical distance between a training example and its nearest other training
  example (the median over a sample) is the row's near-copy ratio; below `--near-copy-ratio`
  (export.near_copy_ratio) the row is a near copy of a training example: listed (`report`), or
  listed and dropped (`drop`).

A judgement depends on the row alone (fixed-shape forward passes and distance products, as in
networks.generate), so a gated export is exactly as reproducible as an ungated one. The gated rows,
with their reasons and scores, are returned to the export, which lists them in gated_rows.jsonl.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ganpipe import checkpoint, runs, storage
from ganpipe.config import ExportConfig
from ganpipe.errors import UserError
from ganpipe.networks import NetworkSpec, build_discriminator, pad_rows, to_network_space

CALIBRATION_ROWS = 4096
FIXED_ROWS = 256  # rows per forward pass / distance product, padded: results depend on the row alone
SCALE_SAMPLE = 2000  # training rows whose nearest-neighbour distances set the near-copy scale
DISTANCE_COLUMNS = 8192  # training rows per distance product: bounds memory for large training sets


@dataclass(frozen=True)
class GateSettings:
    """The gate keys of the export config (export.drop_lowest_d, memorisation_check,
    near_copy_ratio), as the export's identity and its .gates.json record them."""

    drop_lowest_d: float  # fraction of rows (by discriminator score) to drop; 0: off
    memorisation: str  # off | report | drop
    near_copy_ratio: float

    @classmethod
    def from_config(cls, settings: ExportConfig) -> GateSettings:
        return cls(settings.drop_lowest_d, settings.memorisation_check, settings.near_copy_ratio)

    @property
    def enabled(self) -> bool:
        return self.drop_lowest_d > 0 or self.memorisation != "off"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def combine_summaries(total: Any, value: Any, key: str = "") -> Any:
    """How per-batch gate summaries add up: counts are summed, `min_*` values take the minimum."""
    if total is None or value is None:
        return value if total is None else total
    if isinstance(value, dict):
        return {k: combine_summaries(total.get(k), value.get(k), k) for k in total | value}
    return min(total, value) if key.startswith("min_") else total + value


# --- what the gates need from the training run ----------------------------------------------------

def training_run_dir(source: dict[str, Any]) -> Path:
    """The run that trained the model: a run directory MODEL, or a registered version's
    ganpipe.run_dir tag."""
    uri, run_dir = source.get("model_uri"), source.get("run_dir")
    if not run_dir:
        raise UserError(f"--model {uri}: quality gates need the model's training run (discriminator, training "
                        "data), but this version has no ganpipe.run_dir tag; export from the run directory")
    if not runs.is_run_dir(Path(run_dir)):
        raise UserError(f"--model {uri}: its training run {run_dir} (version tag ganpipe.run_dir) is not a run "
                        "directory on this machine")
    return Path(run_dir)


def discriminator_checkpoint(run_dir: Path) -> Path:
    # The latest discriminator, also when the run's generator is an earlier (best) checkpoint's
    # EMA: the most-trained critic is the sharpest judge of what looks fake.
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None or not (latest / "D.safetensors").exists():
        raise UserError(f"--drop-lowest-d: no checkpoint with a discriminator in {run_dir / 'checkpoints'}")
    return latest


def load_discriminator(spec: NetworkSpec, folder: Path, device: torch.device | str) -> torch.nn.Module:
    if spec.pack > 1:
        raise UserError(f"--drop-lowest-d: this discriminator judges packs of {spec.pack} samples "
                        "(model.pack), not single rows")
    discriminator = build_discriminator(spec)
    discriminator.load_state_dict(load_file(str(folder / "D.safetensors")))
    return discriminator.to(device).eval()


def training_data(run_dir: Path, endpoint_url: str | None) -> Any:
    from ganpipe.data import open_prepared

    location = runs.read_info(run_dir).get("data", {}).get("location")
    if not location:
        raise UserError(f"--memorisation-check: {run_dir}/run.json records no training data location")
    try:
        return open_prepared(location, endpoint_url)
    except FileNotFoundError:
        raise UserError(f"--memorisation-check: the training data of {run_dir} ({location}) is gone; "
                        "run `ganpipe ingest` with the run's config to prepare it again") from None


# --- fixed-shape computations --------------------------------------------------------------------

def in_fixed_chunks(fn: Callable[..., np.ndarray], *tensors: torch.Tensor) -> np.ndarray:
    """fn over chunks of exactly FIXED_ROWS rows (the last padded), so each row's result is the
    same whichever rows share its batch."""
    n = len(tensors[0])
    out = [fn(*(pad_rows(t[start:start + FIXED_ROWS], FIXED_ROWS) for t in tensors))[:min(FIXED_ROWS, n - start)]
           for start in range(0, n, FIXED_ROWS)]
    return np.concatenate(out) if out else np.empty(0)


def discriminator_scores(discriminator: torch.nn.Module, spec: NetworkSpec, samples: torch.Tensor,
                         labels: np.ndarray | None, device: torch.device | str) -> np.ndarray:
    x = to_network_space(samples, spec)  # the very transform training fed the discriminator with

    @torch.no_grad()
    def score(x: torch.Tensor, y: torch.Tensor | None = None) -> np.ndarray:
        return discriminator(x.to(device), y.to(device) if y is not None else None).double().cpu().numpy()

    if labels is None:
        return in_fixed_chunks(score, x)
    return in_fixed_chunks(score, x, torch.from_numpy(labels))


def nearest_rows(queries: np.ndarray, reference: np.ndarray, exclude: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance to, and index of, each query's nearest reference row (float64, in
    fixed shapes). `exclude[i]`: a reference index query i may not match (itself)."""
    distances, nearest = [], []
    for start in range(0, len(queries), FIXED_ROWS):
        count = min(FIXED_ROWS, len(queries) - start)
        q = np.zeros((FIXED_ROWS, queries.shape[1]))
        q[:count] = queries[start:start + count]
        best = np.full(FIXED_ROWS, np.inf)
        best_index = np.zeros(FIXED_ROWS, dtype=np.int64)
        for first in range(0, len(reference), DISTANCE_COLUMNS):
            r = np.asarray(reference[first:first + DISTANCE_COLUMNS], dtype=np.float64)
            squared = (q * q).sum(axis=1)[:, None] + (r * r).sum(axis=1)[None, :] - 2.0 * (q @ r.T)
            if exclude is not None:
                rows = np.flatnonzero((exclude[start:start + count] >= first) &
                                      (exclude[start:start + count] < first + len(r)))
                squared[rows, exclude[start + rows] - first] = np.inf
            column = squared.argmin(axis=1)
            value = squared[np.arange(FIXED_ROWS), column]
            better = value < best
            best[better], best_index[better] = value[better], column[better] + first
        distances.append(np.sqrt(np.maximum(best[:count], 0.0)))
        nearest.append(best_index[:count])
    return np.concatenate(distances), np.concatenate(nearest)


def training_features(data: Any, extractor: Any) -> np.ndarray:
    """fd_domain features of every training example (float32), cached per extractor."""
    cache = storage.ganpipe_home() / "cache" / "export_gates" / f"{extractor.id}.npy"
    if cache.exists():
        return np.load(cache, mmap_mode="r")
    parts = []
    for start in range(0, data.num_records, 16 * FIXED_ROWS):
        raw, _ = data.gather(np.arange(start, min(data.num_records, start + 16 * FIXED_ROWS)))
        parts.append(in_fixed_chunks(extractor, torch.from_numpy(np.ascontiguousarray(raw))).astype(np.float32))
    features = np.concatenate(parts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, features)
    tmp.replace(cache)
    return np.load(cache, mmap_mode="r")


def near_copy_scale(features: np.ndarray) -> float:
    """The median distance from a training example to its nearest other one (exact duplicates
    in the training set left out): the yardstick for 'near'."""
    sample = np.sort(np.random.default_rng(0).permutation(len(features))[:SCALE_SAMPLE])
    distances, _ = nearest_rows(np.asarray(features[sample]), features, exclude=sample)
    distances = distances[distances > 0]
    if not len(distances):
        raise UserError("--memorisation-check: the training data has fewer than two distinct examples")
    return float(np.median(distances))


# --- planning (once per export) and judging (per row) -------------------------------------------

def prepare_gates(settings: GateSettings, loaded: Any, out: str, endpoint_url: str | None,
                  calibration: Callable[[int], tuple[torch.Tensor, np.ndarray | None]]) -> dict[str, Any]:
    """What the ranks need: thresholds and where the discriminator and training data are. Computed
    once per export and stored in OUT/.gates.json, so reruns and every rank judge alike."""
    stored = storage.join(out, ".gates.json")
    if storage.exists(stored, endpoint_url):
        return storage.read_json(stored, endpoint_url)
    spec = loaded.spec
    run_dir = training_run_dir(loaded.source)
    plan: dict[str, Any] = {"settings": settings.to_json(), "run_dir": str(run_dir)}
    if settings.drop_lowest_d:
        folder = discriminator_checkpoint(run_dir)
        discriminator = load_discriminator(spec, folder, "cpu")
        samples, labels = calibration(CALIBRATION_ROWS)
        scores = discriminator_scores(discriminator, spec, samples, labels, "cpu")
        groups = [scores[labels == c] for c in range(spec.num_classes)] if labels is not None else [scores]
        plan["discriminator"] = {
            "checkpoint": str(folder), "step": checkpoint.read_meta(folder)["step"],
            "fraction": settings.drop_lowest_d, "calibration_rows": len(scores),
            "thresholds": [float(np.quantile(g, settings.drop_lowest_d, method="lower")) for g in groups],
            "rule": f"drop rows whose discriminator logit is below the {settings.drop_lowest_d:g}-quantile of "
                    f"the logits of {len(scores)} calibration rows (latent seeds of rows 0..{len(scores) - 1}"
                    + (", labels balanced), per class" if labels is not None else ")")}
    if settings.memorisation != "off":
        from ganpipe.metrics.domain import DomainFeatures

        data = training_data(run_dir, endpoint_url)
        extractor = DomainFeatures(data)
        features = training_features(data, extractor)
        plan["memorisation"] = {
            "mode": settings.memorisation, "near_copy_ratio": settings.near_copy_ratio,
            "extractor": extractor.id, "extractor_kind": extractor.info.get("kind"),
            "training_rows": len(features), "training_data": runs.read_info(run_dir)["data"]["location"],
            "scale": near_copy_scale(features),
            "rule": "near copy: distance to the nearest training example (fd_domain features) below "
                    f"{settings.near_copy_ratio:g} x scale (median nearest-neighbour distance among "
                    f"{min(SCALE_SAMPLE, len(features))} training examples)"}
    storage.write_json_atomic(stored, plan, endpoint_url)
    return plan


class QualityGates:
    """Judges batches of generated rows against the plan from `prepare_gates`."""

    def __init__(self, plan: dict[str, Any], spec: NetworkSpec, device: torch.device | str,
                 discriminator: torch.nn.Module | None, extractor: Any, features: np.ndarray | None):
        self.plan, self.spec, self.device = plan, spec, device
        self.discriminator, self.extractor, self.features = discriminator, extractor, features

    @classmethod
    def load(cls, plan: dict[str, Any], loaded: Any, device: torch.device | str,
             endpoint_url: str | None) -> QualityGates:
        discriminator = extractor = features = None
        if "discriminator" in plan:
            discriminator = load_discriminator(loaded.spec, Path(plan["discriminator"]["checkpoint"]), device)
        if "memorisation" in plan:
            from ganpipe.metrics.domain import DomainFeatures

            data = training_data(Path(plan["run_dir"]), endpoint_url)
            extractor = DomainFeatures(data)
            features = training_features(data, extractor)
        return cls(plan, loaded.spec, device, discriminator, extractor, features)

    def judge(self, samples: torch.Tensor, labels: np.ndarray | None, indices: np.ndarray, seeds: np.ndarray
              ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """(rows to keep, the gated rows with their reasons, a summary of this batch)."""
        keep = np.ones(len(indices), dtype=bool)
        reasons: list[list[dict[str, Any]]] = [[] for _ in indices]
        summary: dict[str, Any] = {}
        if self.discriminator is not None:
            thresholds = np.asarray(self.plan["discriminator"]["thresholds"])
            threshold = thresholds[labels] if labels is not None else np.full(len(indices), thresholds[0])
            scores = discriminator_scores(self.discriminator, self.spec, samples, labels, self.device)
            low = scores < threshold
            keep &= ~low
            summary["discriminator"] = {"dropped": int(low.sum())}
            for i in np.flatnonzero(low):
                reasons[i].append({"gate": "discriminator", "score": float(scores[i]),
                                   "threshold": float(threshold[i])})
        if self.features is not None:
            memorisation = self.plan["memorisation"]
            queries = in_fixed_chunks(self.extractor, samples).astype(np.float32)
            distances, nearest = nearest_rows(queries, self.features)
            ratios = distances / memorisation["scale"]
            near = ratios < memorisation["near_copy_ratio"]
            if memorisation["mode"] == "drop":
                keep &= ~near
            summary["memorisation"] = {"near_copies": int(near.sum()),
                                       "dropped": int(near.sum()) if memorisation["mode"] == "drop" else 0,
                                       "min_ratio": float(ratios.min()) if len(ratios) else None}
            for i in np.flatnonzero(near):
                reasons[i].append({"gate": "near_copy", "ratio": float(ratios[i]), "distance": float(distances[i]),
                                   "training_index": int(nearest[i])})
        gated = []
        for i in (i for i, r in enumerate(reasons) if r):
            row = {"index": int(indices[i]), "seed": int(seeds[i]), "dropped": bool(not keep[i]), "reasons": reasons[i]}
            if labels is not None:
                row["label"] = int(labels[i])
            gated.append(row)
        return keep, gated, summary

"""Bulk synthetic data: a generator's samples as a Hugging Face-ready dataset.

Row i is a pure function of (model version, export seed, i): its latent comes from the seed
`row_seed(seed, i)` stored in the `seed` column, and for conditional models its label is a
function of i too. So any row can be regenerated alone, and an export killed part way and run
again produces exactly the same rows.

Layout (parquet):            out/data/train-00000-of-00004.parquet, ..., manifest.json, README.md
Layout (imagefolder):        out/train/00000/<index>.png + out/train/00000/metadata.jsonl, ...

Each shard is committed atomically (a local rename, or one complete S3 upload); a rerun skips
shards already there with the right row count; manifest.json (written last) lists every shard
with its rows and checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganpipe import storage
from ganpipe.errors import UserError
from ganpipe.models import NetworkSpec, generate
from ganpipe.registry import LoadedGenerator, load_generator

FORMAT_VERSION = 1


def row_seed(seed: int, index: np.ndarray | int) -> np.ndarray:
    """The latent seed of row `index`: unique per (export seed, row), fits in int64."""
    return np.int64(seed) * np.int64(2**32) + np.asarray(index, dtype=np.int64)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed integer hash (SplitMix64 finaliser): deterministic labels without an RNG per row."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class LabelPlan:
    """How rows get labels: balanced (i mod K), explicit counts (consecutive blocks), or drawn
    from the training distribution by a hash of the row seed."""

    num_classes: int
    mode: str  # balanced | counts | weighted | none
    counts: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def labels(self, seed: int, indices: np.ndarray) -> np.ndarray | None:
        if self.mode == "none":
            return None
        if self.mode == "balanced":
            return (indices % self.num_classes).astype(np.int64)
        if self.mode == "counts":
            bounds = np.cumsum(self.counts)
            return np.searchsorted(bounds, indices, side="right").astype(np.int64)
        cdf = np.cumsum(np.asarray(self.weights) / np.sum(self.weights))
        u = (_splitmix64(row_seed(seed, indices)) >> np.uint64(11)).astype(np.float64) / float(2**53)
        return np.minimum(np.searchsorted(cdf, u, side="right"), self.num_classes - 1).astype(np.int64)

    def per_class(self, seed: int, num_images: int) -> dict[str, int]:
        if self.mode == "none":
            return {}
        totals = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(0, num_images, 1_000_000):
            labels = self.labels(seed, np.arange(start, min(num_images, start + 1_000_000)))
            totals += np.bincount(labels, minlength=self.num_classes)
        return {str(i): int(c) for i, c in enumerate(totals)}


def label_plan(spec: NetworkSpec, num_images: int, class_balance: bool, class_counts: dict[str, int] | None,
               training_counts: dict[str, int] | None) -> LabelPlan:
    if not spec.conditional:
        if class_balance or class_counts:
            raise UserError("--class-balance / class counts need a conditional model")
        return LabelPlan(0, "none")
    k = spec.num_classes
    if class_counts:
        names = list(spec.classes) or [str(i) for i in range(k)]
        unknown = [c for c in class_counts if c not in names]
        if unknown:
            raise UserError(f"class counts: unknown class(es) {unknown} (classes: {', '.join(names)})")
        counts = tuple(int(class_counts.get(name, 0)) for name in names)
        if sum(counts) != num_images:
            raise UserError(f"class counts add up to {sum(counts)}, not --num-images {num_images}")
        return LabelPlan(k, "counts", counts=counts)
    if class_balance:
        return LabelPlan(k, "balanced")
    weights = tuple(float(v) for v in training_counts.values()) if training_counts and \
        len(training_counts) == k else (1.0,) * k
    return LabelPlan(k, "weighted", weights=weights)


# --- encoding ----------------------------------------------------------------------------------

def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    array = image[:, :, 0] if image.shape[2] == 1 else image
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def hf_features(spec: NetworkSpec) -> Any:
    import datasets

    columns: dict[str, Any] = {}
    if spec.is_image:
        columns["image"] = datasets.Image()
    else:
        for name in spec.columns or [f"x{i}" for i in range(spec.sample_shape[0])]:
            columns[name] = datasets.Value("float32")
    if spec.conditional:
        columns["label"] = datasets.ClassLabel(names=list(spec.classes) or [str(i) for i in range(spec.num_classes)])
    columns["seed"] = datasets.Value("int64")
    columns["index"] = datasets.Value("int64")
    return datasets.Features(columns)


def shard_table(spec: NetworkSpec, samples: torch.Tensor, labels: np.ndarray | None, seeds: np.ndarray,
                indices: np.ndarray, encoder: ThreadPoolExecutor | None) -> Any:
    import pyarrow as pa

    features = hf_features(spec)
    columns: dict[str, Any] = {}
    if spec.is_image:
        arrays = samples.numpy()
        encoded = list(encoder.map(encode_png, arrays, chunksize=64) if encoder else map(encode_png, arrays))
        columns["image"] = pa.StructArray.from_arrays(
            [pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())], ["bytes", "path"])
    else:
        names = [n for n in features if n not in ("label", "seed", "index")]
        values = samples.numpy().astype(np.float32)
        for j, name in enumerate(names):
            columns[name] = pa.array(values[:, j])
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    columns["seed"] = pa.array(seeds, pa.int64())
    columns["index"] = pa.array(indices, pa.int64())
    return pa.table(columns, schema=features.arrow_schema)


# --- the export ----------------------------------------------------------------------------------

@dataclass
class ExportPlan:
    out: str
    num_images: int
    shard_size: int
    fmt: str
    seed: int

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_images // self.shard_size))

    def shard_rows(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.num_images, (k + 1) * self.shard_size)

    def shard_name(self, k: int) -> str:
        if self.fmt == "parquet":
            return f"data/train-{k:05d}-of-{self.num_shards:05d}.parquet"
        return f"train/{k:05d}"


def _identity(source: dict[str, Any], plan: ExportPlan, labels: LabelPlan, weights_sha: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "model_uri": source.get("model_uri"), "weights_sha256": weights_sha,
            "num_images": plan.num_images, "shard_size": plan.shard_size, "format": plan.fmt, "seed": plan.seed,
            "labels": {"mode": labels.mode, "counts": list(labels.counts), "weights": list(labels.weights)}}


def _weights_sha(loaded: LoadedGenerator) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_or_claim(plan: ExportPlan, identity: dict[str, Any], endpoint_url: str | None) -> None:
    """An output location holds one export: rerunning the same export resumes it; a different
    one (other model, seed, size) is refused rather than mixed in."""
    marker = storage.join(plan.out, ".ganpipe-export.json")
    if storage.exists(marker, endpoint_url):
        existing = storage.read_json(marker, endpoint_url)
        if existing != identity:
            changed = sorted(k for k in identity if existing.get(k) != identity[k])
            raise UserError(f"--out {plan.out}: holds a different export (differs in {', '.join(changed)}); "
                            "choose another --out")
        return
    storage.write_json_atomic(marker, identity, endpoint_url)


def _finished_shard(plan: ExportPlan, k: int, endpoint_url: str | None) -> dict[str, Any] | None:
    """The committed shard's record (rows, checksum), or None when it must be (re)written."""
    start, stop = plan.shard_rows(k)
    record_uri = storage.join(plan.out, ".shards", f"{k:05d}.json")
    if not storage.exists(record_uri, endpoint_url):
        return None
    record = storage.read_json(record_uri, endpoint_url)
    if record.get("rows") != stop - start or not storage.exists(storage.join(plan.out, record["file"]),
                                                                 endpoint_url):
        return None
    return record


def export(model: str, num_images: int, out: str, fmt: str = "parquet", shard_size: int = 10_000,
           class_balance: bool = False, class_counts: dict[str, int] | None = None, seed: int = 0,
           endpoint_url: str | None = None, batch_size: int = 512, progress: bool = True,
           training_counts: dict[str, int] | None = None, num_processes: int = 1) -> dict[str, Any]:
    if num_images < 1:
        raise UserError("--num-images must be at least 1")
    if fmt not in ("parquet", "imagefolder"):
        raise UserError(f"--format: expected parquet or imagefolder, got {fmt!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_generator(model, device)
    spec = loaded.spec
    if fmt == "imagefolder" and not spec.is_image:
        raise UserError("--format imagefolder needs an image model")
    plan = ExportPlan(out.rstrip("/"), num_images, shard_size, fmt, seed)
    labels = label_plan(spec, num_images, class_balance, class_counts, training_counts)
    identity = _identity(loaded.source, plan, labels, _weights_sha(loaded))
    _check_or_claim(plan, identity, endpoint_url)

    records: list[dict[str, Any]] = []
    started, written_rows = time.time(), 0
    workers = max(1, min(8, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as encoder:
        for k in range(plan.num_shards):
            done = _finished_shard(plan, k, endpoint_url)
            if done is None:
                done = _write_shard(plan, k, loaded, labels, encoder, endpoint_url, batch_size, device)
                written_rows += done["rows"]
            records.append(done)
            if progress:
                _report(k + 1, plan.num_shards, written_rows, started)
    manifest = {
        **identity, "model": {k: loaded.source.get(k) for k in ("name", "version", "run_id", "run_dir")},
        "num_shards": plan.num_shards, "per_class_counts": labels.per_class(seed, num_images),
        "classes": list(spec.classes), "shards": records, "created_at": time.time(),
        "columns": list(hf_features(spec)), "row_seed": "seed * 2**32 + index",
    }
    storage.write_bytes_atomic(storage.join(plan.out, "README.md"), dataset_card(manifest, spec).encode(),
                               endpoint_url)
    storage.write_json_atomic(storage.join(plan.out, "manifest.json"), manifest, endpoint_url)
    return {"out": plan.out, "num_images": sum(r["rows"] for r in records), "num_shards": plan.num_shards,
            "manifest": storage.join(plan.out, "manifest.json"), "per_class_counts": manifest["per_class_counts"]}


def _generate_rows(loaded: LoadedGenerator, labels: LabelPlan, seed: int, start: int, stop: int,
                   batch_size: int, device: str) -> Iterator[tuple[torch.Tensor, np.ndarray | None, np.ndarray,
                                                                   np.ndarray]]:
    for begin in range(start, stop, batch_size):
        indices = np.arange(begin, min(stop, begin + batch_size), dtype=np.int64)
        seeds = row_seed(seed, indices)
        row_labels = labels.labels(seed, indices)
        samples = generate(loaded.generator, loaded.spec, seeds.tolist(),
                           row_labels.tolist() if row_labels is not None else None,
                           batch_size=batch_size, device=device)
        yield samples, row_labels, seeds, indices


def _write_shard(plan: ExportPlan, k: int, loaded: LoadedGenerator, labels: LabelPlan,
                 encoder: ThreadPoolExecutor, endpoint_url: str | None, batch_size: int, device: str
                 ) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    start, stop = plan.shard_rows(k)
    name = plan.shard_name(k)
    with tempfile.TemporaryDirectory(dir=_scratch(plan.out), prefix=".tmp-") as tmp:
        if plan.fmt == "parquet":
            local = Path(tmp) / "shard.parquet"
            tables = [shard_table(loaded.spec, *rows, encoder)
                      for rows in _generate_rows(loaded, labels, plan.seed, start, stop, batch_size, device)]
            pq.write_table(pa.concat_tables(tables), local, row_group_size=1000)
            checksum = storage.sha256_file(local)
            storage.upload_file_atomic(local, storage.join(plan.out, name), endpoint_url)
        else:
            checksum = _write_image_folder_shard(plan, k, loaded, labels, encoder, endpoint_url, batch_size,
                                                 device, Path(tmp))
    record = {"file": name, "rows": stop - start, "first_index": start, "sha256": checksum}
    storage.write_json_atomic(storage.join(plan.out, ".shards", f"{k:05d}.json"), record, endpoint_url)
    return record


def _write_image_folder_shard(plan: ExportPlan, k: int, loaded: LoadedGenerator, labels: LabelPlan,
                              encoder: ThreadPoolExecutor, endpoint_url: str | None, batch_size: int,
                              device: str, tmp: Path) -> str:
    """Images and metadata.jsonl in a shard folder; metadata.jsonl is committed last and marks it done."""
    start, stop = plan.shard_rows(k)
    folder = storage.join(plan.out, plan.shard_name(k))
    names = list(loaded.spec.classes)
    lines = []
    digest = hashlib.sha256()
    for samples, row_labels, seeds, indices in _generate_rows(loaded, labels, plan.seed, start, stop,
                                                              batch_size, device):
        encoded = list(encoder.map(encode_png, samples.numpy(), chunksize=64))
        for j, data in enumerate(encoded):
            file_name = f"{int(indices[j]):09d}.png"
            local = tmp / file_name
            local.write_bytes(data)
            storage.upload_file_atomic(local, storage.join(folder, file_name), endpoint_url)
            digest.update(data)
            row: dict[str, Any] = {"file_name": file_name, "seed": int(seeds[j]), "index": int(indices[j])}
            if row_labels is not None:
                row["label"] = names[row_labels[j]] if names else int(row_labels[j])
            lines.append(json.dumps(row))
    storage.write_bytes_atomic(storage.join(folder, "metadata.jsonl"), ("\n".join(lines) + "\n").encode(),
                               endpoint_url)
    return digest.hexdigest()


def _scratch(out: str) -> str | None:
    if storage.is_remote(out):
        return None
    path = storage.local_path(out)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _report(done: int, total: int, rows: int, started: float) -> None:
    elapsed = time.time() - started
    rate = rows / elapsed if elapsed > 0 else 0.0
    print(f"export: shard {done}/{total}, {rate:.0f} images/s", file=sys.stderr, flush=True)


def dataset_card(manifest: dict[str, Any], spec: NetworkSpec) -> str:
    data_files = "data/train-*.parquet" if manifest["format"] == "parquet" else "train/**"
    counts = "\n".join(f"| {spec.classes[int(k)] if spec.classes else k} | {v} |"
                       for k, v in manifest["per_class_counts"].items())
    class_table = f"\n## Classes\n| class | rows |\n|---|---|\n{counts}\n" if counts else ""
    model = manifest["model"]
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "{data_files}"
tags:
- synthetic
- ganpipe
---
# Synthetic data from {manifest['model_uri']}

{manifest['num_images']} samples generated by ganpipe from model `{manifest['model_uri']}`
(registered name {model.get('name') or '-'}, version {model.get('version') or '-'}, MLflow run
{model.get('run_id') or '-'}), export seed {manifest['seed']}.

Columns: {', '.join(manifest['columns'])}. Row `i` was generated from latent seed `seed`
(= export seed * 2**32 + i); regenerate it with
`mlflow.pyfunc.load_model(MODEL).predict(pd.DataFrame({{"seed": [seed]{', "label": [label]' if spec.conditional else ''}}}))`.
{class_table}
Load with `datasets.load_dataset("parquet", data_files="{data_files}")`. See manifest.json for
per-shard row counts and checksums.
"""

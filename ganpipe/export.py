"""Bulk synthetic data: a generator's samples as a Hugging Face-ready dataset.

Row i is a pure function of (model version, export seed, i): its latent comes from the seed
`row_seed(seed, i)` stored in the `seed` column, its label (conditional models) from the label
plan, and `models.generate` makes every forward pass the same shape, so the row is bit-identical
whether it is generated alone or among millions. Any row can be regenerated from its seed, and an
export killed part way and run again produces exactly the same rows.

Layout (parquet):      out/data/train-00000-of-00004.parquet, ...
Layout (imagefolder):  out/train/00000/<index>.png ... + out/train/00000/metadata.parquet, ...
Both:                  out/manifest.json, out/README.md (dataset card), out/.shards/NNNNN.json,
                       out/.ganpipe-export.json (which export this location holds)

Each shard is built in a local temporary place and committed whole (a rename locally; complete
uploads on S3, the imagefolder's metadata last), then recorded in .shards/; a rerun skips recorded
shards. manifest.json and the card are written last.

Work is split over `--num-processes` ranks started with `accelerate launch` (one per GPU, or CPU
processes), each writing its own shards. In each rank the main thread generates while a writer
thread encodes PNGs and writes the previous batch, so encoding overlaps generation; memory is
bounded by a few batches whatever the number of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganpipe import storage
from ganpipe.errors import UserError
from ganpipe.generators import LoadedGenerator, load_generator
from ganpipe.networks import NetworkSpec, generate
from ganpipe.quality_gates import GateSettings, QualityGates, combine_summaries, prepare_gates

FORMAT_VERSION = 2  # 2: metadata.parquet in image folders, quality gates, candidate rows per shard
GENERATE_ROWS = 256  # rows per generated batch: the default (fixed) forward shape of models.generate
MAX_PENDING_BATCHES = 3  # batches generated but not yet written: bounds memory, keeps the writer busy
PROGRESS_TAG = "ganpipe-export-progress"
GATED_FILE = "gated_rows.jsonl"
# Parquet pages are zstd-compressed, which squeezes raw pixels about as well as per-image deflate
# at a fraction of the CPU; files in an image folder stand alone, so they get deflate level 1.
PNG_LEVEL = {"parquet": 0, "imagefolder": 1}


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

    def to_json(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "mode": self.mode, "counts": list(self.counts),
                "weights": list(self.weights)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelPlan:
        return cls(data["num_classes"], data["mode"], tuple(data["counts"]), tuple(data["weights"]))


def label_plan(spec: NetworkSpec, num_images: int, class_balance: bool, class_counts: dict[str, int] | None,
               training_counts: dict[str, int] | None) -> LabelPlan:
    if not spec.conditional:
        if class_balance or class_counts:
            raise UserError("--class-balance / --class-counts need a conditional model")
        return LabelPlan(0, "none")
    if class_balance and class_counts:
        raise UserError("--class-balance and --class-counts: choose one")
    k = spec.num_classes
    if class_counts:
        names = class_names(spec)
        unknown = [c for c in class_counts if c not in names]
        if unknown:
            raise UserError(f"--class-counts: unknown class(es) {unknown} (classes: {', '.join(names)})")
        negative = [c for c, v in class_counts.items() if v < 0]
        if negative:
            raise UserError(f"--class-counts: negative count for class(es) {negative}")
        counts = tuple(int(class_counts.get(name, 0)) for name in names)
        if sum(counts) != num_images:
            raise UserError(f"--class-counts add up to {sum(counts)}, not --num-images {num_images}")
        return LabelPlan(k, "counts", counts=counts)
    if class_balance:
        return LabelPlan(k, "balanced")
    weights = tuple(float(v) for v in training_counts.values()) if training_counts and \
        len(training_counts) == k else (1.0,) * k
    return LabelPlan(k, "weighted", weights=weights)


def class_names(spec: NetworkSpec) -> list[str]:
    return list(spec.classes) or [str(i) for i in range(spec.num_classes)]


# --- encoding ----------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # greyscale, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


PNG_END = _png_chunk(b"IEND", b"")


def encode_pngs(images: np.ndarray, level: int = 1) -> list[bytes]:
    """uint8 N x H x W x C images -> one PNG file each (8-bit, no interlacing, filter None).

    Written directly rather than through PIL: for small images PIL's per-call overhead costs
    more than generating them. The header is shared by the batch; each image is one zlib stream
    (`level` 0 stores it uncompressed). An image's bytes never depend on its batch."""
    n, h, w, c = images.shape
    scanlines = np.zeros((n, h, 1 + w * c), dtype=np.uint8)  # a leading 0 per row: filter type None
    scanlines[:, :, 1:] = images.reshape(n, h, w * c)
    head = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, PNG_COLOUR_TYPE[c], 0, 0, 0))
    idat_crc = zlib.crc32(b"IDAT")
    encoded = []
    for raw in scanlines:
        data = zlib.compress(raw.data, level)
        encoded.append(b"".join((head, struct.pack(">I", len(data)), b"IDAT", data,
                                 struct.pack(">I", zlib.crc32(data, idat_crc)), PNG_END)))
    return encoded


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    return encode_pngs(image[None], level)[0]


def hf_features(spec: NetworkSpec) -> Any:
    import datasets

    columns: dict[str, Any] = {}
    if spec.is_image:
        columns["image"] = datasets.Image()
    else:
        for name in spec.columns or [f"x{i}" for i in range(spec.sample_shape[0])]:
            columns[name] = datasets.Value("float32")
    if spec.conditional:
        columns["label"] = datasets.ClassLabel(names=class_names(spec))
    columns["seed"] = datasets.Value("int64")
    columns["index"] = datasets.Value("int64")
    return datasets.Features(columns)


def image_column(encoded: list[bytes]) -> Any:
    """The arrow form of a `datasets.Image()` column: struct<bytes, path>."""
    import pyarrow as pa

    return pa.StructArray.from_arrays([pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())],
                                      ["bytes", "path"])


def shard_table(spec: NetworkSpec, samples: torch.Tensor, labels: np.ndarray | None, seeds: np.ndarray,
                indices: np.ndarray, encoded: list[bytes] | None = None, level: int = 1) -> Any:
    """Rows as an arrow table with the HF features in its schema; images are PNG-encoded here
    unless `encoded` is given."""
    import pyarrow as pa

    features = hf_features(spec)
    columns: dict[str, Any] = {}
    if spec.is_image:
        columns["image"] = image_column(encoded if encoded is not None else encode_pngs(samples.numpy(), level))
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


# --- shards: written locally, committed whole ---------------------------------------------------

class ParquetShard:
    """A shard streamed into a local parquet file, one row group per batch; committed whole."""

    def __init__(self, local: Path, schema: Any):
        import pyarrow.parquet as pq

        self.local = local
        self.writer = pq.ParquetWriter(local, schema, compression="zstd")

    def write(self, table: Any) -> None:
        self.writer.write_table(table)

    def commit(self, uri: str, endpoint_url: str | None) -> str:
        self.writer.close()
        checksum = storage.sha256_file(self.local)
        storage.upload_file_atomic(self.local, uri, endpoint_url)
        return checksum


class ImageFolderShard:
    """PNG files plus metadata.parquet (which carries the HF features, so `label` loads as a
    ClassLabel) in a local folder, committed whole: a directory rename locally; on S3 the images
    are uploaded first and metadata.parquet last, so a folder with metadata is complete."""

    def __init__(self, folder: Path, spec: NetworkSpec):
        self.folder, self.spec = folder, spec
        folder.mkdir(parents=True)
        self.metadata: list[Any] = []
        self.digest = hashlib.sha256()

    def write(self, table: Any) -> None:
        import pyarrow as pa

        images = table.column("image").combine_chunks().field("bytes").to_pylist()
        indices = table.column("index").to_pylist()
        names = [f"{index:09d}.png" for index in indices]
        for name, data in zip(names, images, strict=True):
            (self.folder / name).write_bytes(data)
            self.digest.update(data)
        self.metadata.append(table.drop_columns(["image"]).add_column(0, "file_name", pa.array(names, pa.string())))

    def commit(self, uri: str, endpoint_url: str | None) -> str:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        features = datasets.Features({"file_name": datasets.Value("string"),
                                      **{k: v for k, v in hf_features(self.spec).items() if k != "image"}})
        schema = features.arrow_schema
        table = pa.concat_tables([t.select(schema.names).cast(schema) for t in self.metadata]) \
            if self.metadata else schema.empty_table()
        pq.write_table(table, self.folder / "metadata.parquet")
        self.digest.update(storage.sha256_file(self.folder / "metadata.parquet").encode())
        if storage.is_remote(uri):
            fs, root = storage.filesystem(uri, endpoint_url)
            images = sorted(p for p in self.folder.iterdir() if p.suffix == ".png")
            if images:
                fs.put([str(p) for p in images], [f"{root}/{p.name}" for p in images])
            fs.put_file(str(self.folder / "metadata.parquet"), f"{root}/metadata.parquet")
        else:
            target = storage.local_path(uri)
            storage.fsync_tree(self.folder)
            if target.exists():  # committed by a run killed before its record was written
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.folder, target)
        return self.digest.hexdigest()


# --- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportPlan:
    out: str
    num_images: int  # candidate rows; quality gates may drop some
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

    def committed_file(self, k: int) -> str:
        """What exists only once shard k is committed."""
        return self.shard_name(k) + ("/metadata.parquet" if self.fmt == "imagefolder" else "")


@dataclass
class ExportJob:
    """Everything an export process needs; ranks read it as JSON."""

    model: str  # resolved: models:/NAME/VERSION or a run directory
    plan: ExportPlan
    labels: LabelPlan
    shards: list[int]  # the shards still to write
    endpoint_url: str | None = None
    gates: dict[str, Any] | None = None  # see ganpipe.quality_gates.prepare_gates
    parent_pid: int | None = None  # ranks stop when this process is gone

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "plan": asdict(self.plan), "labels": self.labels.to_json(),
                "shards": self.shards, "endpoint_url": self.endpoint_url, "gates": self.gates,
                "parent_pid": self.parent_pid}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportJob:
        return cls(data["model"], ExportPlan(**data["plan"]), LabelPlan.from_json(data["labels"]), data["shards"],
                   data["endpoint_url"], data["gates"], data["parent_pid"])


def claim_output(out: str, identity: dict[str, Any], endpoint_url: str | None, option: str = "--out") -> None:
    """An output location holds one dataset: rerunning the same command resumes it; a different
    one (other model, seed, size) is refused rather than mixed in."""
    marker = storage.join(out, ".ganpipe-export.json")
    if storage.exists(marker, endpoint_url):
        existing = storage.read_json(marker, endpoint_url)
        if existing != identity:
            changed = sorted(k for k in set(identity) | set(existing) if existing.get(k) != identity.get(k))
            raise UserError(f"{option} {out}: holds a different dataset (differs in {', '.join(changed)}); "
                            f"choose another {option}")
        return
    storage.write_json_atomic(marker, identity, endpoint_url)


def record_uri(out: str, k: int) -> str:
    return storage.join(out, ".shards", f"{k:05d}.json")


def finished_shard(out: str, k: int, committed_file: str, first_index: int, endpoint_url: str | None
                   ) -> dict[str, Any] | None:
    """The committed shard's record, or None when it must be (re)written."""
    uri = record_uri(out, k)
    if not storage.exists(uri, endpoint_url):
        return None
    record = storage.read_json(uri, endpoint_url)
    if record.get("first_index") != first_index or not storage.exists(storage.join(out, committed_file),
                                                                      endpoint_url):
        return None
    return record


def scratch_dir(out: str) -> str | None:
    """Build shards beside a local output (so committing is a rename); in a temp dir for S3."""
    if storage.is_remote(out):
        return None
    path = storage.local_path(out)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def remove_stale_scratch(out: str) -> None:
    """Half-built shards of a killed run (one run writes an output at a time)."""
    if not storage.is_remote(out):
        for path in storage.local_path(out).glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


# --- one rank's work ----------------------------------------------------------------------------

class ParentGone(RuntimeError):
    """The `ganpipe export` process that started this rank died (e.g. SIGKILL): stop, don't orphan."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed parent that nobody has reaped yet is a zombie: gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_shards(job: ExportJob, rank: int, world: int, device: torch.device | str,
                 report: Callable[[int], None]) -> None:
    """Write this rank's share of the pending shards (round robin), each committed and recorded."""
    loaded = load_generator(job.model, device)
    gates = QualityGates.load(job.gates, loaded, device, job.endpoint_url) if job.gates else None
    with ThreadPoolExecutor(1, thread_name_prefix="export-writer") as writer:
        for k in job.shards[rank::world]:
            _write_shard(job, k, loaded, gates, writer, device, report)


def _write_shard(job: ExportJob, k: int, loaded: LoadedGenerator, gates: QualityGates | None,
                 writer: ThreadPoolExecutor, device: torch.device | str, report: Callable[[int], None]) -> None:
    plan, spec = job.plan, loaded.spec
    start, stop = plan.shard_rows(k)
    level = PNG_LEVEL[plan.fmt]
    per_class = np.zeros(max(spec.num_classes, 1), dtype=np.int64)
    gated: list[dict[str, Any]] = []
    gate_summary: dict[str, Any] | None = None
    rows = 0
    with tempfile.TemporaryDirectory(dir=scratch_dir(plan.out), prefix=".tmp-") as tmp:
        shard: ParquetShard | ImageFolderShard = \
            ParquetShard(Path(tmp) / "shard.parquet", hf_features(spec).arrow_schema) if plan.fmt == "parquet" \
            else ImageFolderShard(Path(tmp) / "shard", spec)
        pending: deque[Future] = deque()
        for begin in range(start, stop, GENERATE_ROWS):
            if job.parent_pid is not None and not _alive(job.parent_pid):
                raise ParentGone(f"the export process {job.parent_pid} is gone")
            samples, labels, seeds, indices = generate_rows(loaded, job.labels, plan.seed, begin,
                                                            min(stop, begin + GENERATE_ROWS), device)
            candidates = len(indices)
            if gates is not None:
                keep, judged, summary = gates.judge(samples, labels, indices, seeds)
                gated += judged
                gate_summary = combine_summaries(gate_summary, summary)
                samples, seeds, indices = samples[torch.from_numpy(keep)], seeds[keep], indices[keep]
                labels = labels[keep] if labels is not None else None
            if labels is not None:
                per_class += np.bincount(labels, minlength=spec.num_classes)
            rows += len(indices)
            # Encoding and writing happen on the writer thread while the next batch generates.
            pending.append(writer.submit(_encode_and_write, shard, spec, samples, labels, seeds, indices, level))
            while len(pending) > MAX_PENDING_BATCHES:
                pending.popleft().result()
            report(candidates)
        while pending:
            pending.popleft().result()
        checksum = shard.commit(storage.join(plan.out, plan.shard_name(k)), job.endpoint_url)
    record = {"file": plan.shard_name(k), "rows": rows, "candidates": stop - start, "first_index": start,
              "sha256": checksum, "per_class_counts": {str(i): int(c) for i, c in enumerate(per_class)}
              if spec.conditional else {}, "gated": gated}
    if gate_summary is not None:
        record["gate_summary"] = gate_summary
    storage.write_json_atomic(record_uri(plan.out, k), record, job.endpoint_url)


def _encode_and_write(shard: ParquetShard | ImageFolderShard, spec: NetworkSpec, samples: torch.Tensor,
                      labels: np.ndarray | None, seeds: np.ndarray, indices: np.ndarray, level: int) -> None:
    shard.write(shard_table(spec, samples, labels, seeds, indices, level=level))


def generate_rows(loaded: LoadedGenerator, labels: LabelPlan, seed: int, start: int, stop: int,
                  device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray, np.ndarray]:
    """Rows start..stop-1 of an export with this seed and label plan: (samples, labels, seeds, indices)."""
    indices = np.arange(start, stop, dtype=np.int64)
    seeds = row_seed(seed, indices)
    row_labels = labels.labels(seed, indices)
    samples = generate(loaded.generator, loaded.spec, seeds.tolist(),
                       row_labels.tolist() if row_labels is not None else None, device=device)
    return samples, row_labels, seeds, indices


def calibration_rows(loaded: LoadedGenerator, seed: int, n: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """n samples for calibrating quality gates: the latent seeds of rows 0..n-1, labels balanced
    (so every class is calibrated whatever the export's label plan)."""
    spec = loaded.spec
    balanced = LabelPlan(spec.num_classes, "balanced") if spec.conditional else LabelPlan(0, "none")
    samples, labels, _, _ = generate_rows(loaded, balanced, seed, 0, n)
    return samples, labels


# --- progress -----------------------------------------------------------------------------------

class Progress:
    """Rows done of the rows to write, with rate and ETA: a tqdm bar on a terminal, a plain line
    every few seconds otherwise (logs, Prefect)."""

    def __init__(self, total: int, enabled: bool, every: float = 2.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.done, self.started, self.last = 0, time.time(), 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="export", unit="img", dynamic_ncols=True)

    def update(self, rows: int) -> None:
        self.done += rows
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(rows)
            return
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(f"export: {self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.time() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - self.done) / rate)) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done:,}/{self.total:,} rows ({percent:.0f}%), {rate:,.0f} images/s, ETA {eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the export ---------------------------------------------------------------------------------

def _identity(source: dict[str, Any], plan: ExportPlan, labels: LabelPlan, weights_sha: str,
              gates: GateSettings) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "model_uri": source.get("model_uri"), "weights_sha256": weights_sha,
            "num_images": plan.num_images, "shard_size": plan.shard_size, "format": plan.fmt, "seed": plan.seed,
            "labels": {"mode": labels.mode, "counts": list(labels.counts), "weights": list(labels.weights)},
            "gate_settings": gates.to_json()}


def _weights_sha(loaded: LoadedGenerator) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_class_counts(loaded: LoadedGenerator, endpoint_url: str | None) -> dict[str, int] | None:
    """Class counts of the data the model was trained on, when its run directory is known."""
    from ganpipe import runs

    run_dir = loaded.source.get("run_dir")
    if not loaded.spec.conditional or not run_dir or not Path(run_dir).is_dir():
        return None
    location = runs.read_info(Path(run_dir)).get("data", {}).get("location")
    try:
        return storage.read_json(storage.join(location, "meta.json"), endpoint_url).get("class_counts") \
            if location else None
    except (OSError, ValueError):
        return None


def export(model: str, num_images: int, out: str, fmt: str = "parquet", shard_size: int = 10_000,
           class_balance: bool = False, class_counts: dict[str, int] | None = None, seed: int = 0,
           endpoint_url: str | None = None, progress: bool = True,
           training_counts: dict[str, int] | None = None, num_processes: int = 1,
           gates: GateSettings | None = None) -> dict[str, Any]:
    """`ganpipe export`: write (or finish writing) the dataset and return the contract's result."""
    gates = gates or GateSettings()
    if num_images < 1:
        raise UserError("--num-images must be at least 1")
    if shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    if num_processes < 1:
        raise UserError("--num-processes must be at least 1")
    if fmt not in PNG_LEVEL:
        raise UserError(f"--format: expected parquet or imagefolder, got {fmt!r}")
    gates.validate()
    loaded = load_generator(model)
    spec = loaded.spec
    if fmt == "imagefolder" and not spec.is_image:
        raise UserError("--format imagefolder needs an image model")
    plan = ExportPlan(out.rstrip("/"), num_images, shard_size, fmt, seed)
    counts = training_counts if training_counts is not None else training_class_counts(loaded, endpoint_url)
    labels = label_plan(spec, num_images, class_balance, class_counts, counts)
    identity = _identity(loaded.source, plan, labels, _weights_sha(loaded), gates)
    claim_output(plan.out, identity, endpoint_url)
    remove_stale_scratch(plan.out)
    gate_plan = prepare_gates(gates, loaded, plan.out, endpoint_url, lambda n: calibration_rows(loaded, seed, n)) \
        if gates.enabled else None

    pending = [k for k in range(plan.num_shards) if _record(plan, k, endpoint_url) is None]
    if pending:
        job = ExportJob(loaded.source["model_uri"], plan, labels, pending, endpoint_url, gate_plan)
        todo = sum(plan.shard_rows(k)[1] - plan.shard_rows(k)[0] for k in pending)
        meter = Progress(todo, progress)
        try:
            processes = min(num_processes, len(pending))
            if processes == 1:
                write_shards(job, 0, 1, "cuda" if torch.cuda.is_available() else "cpu", meter.update)
            else:
                launch_ranks(job, processes, meter)
        finally:
            meter.close()
    return write_manifest(plan, loaded, labels, identity, gate_plan, endpoint_url, written=len(pending))


def _record(plan: ExportPlan, k: int, endpoint_url: str | None) -> dict[str, Any] | None:
    return finished_shard(plan.out, k, plan.committed_file(k), plan.shard_rows(k)[0], endpoint_url)


def write_manifest(plan: ExportPlan, loaded: LoadedGenerator, labels: LabelPlan, identity: dict[str, Any],
                   gate_plan: dict[str, Any] | None, endpoint_url: str | None, written: int) -> dict[str, Any]:
    """Check every shard is committed, then write the gated-rows list, the card and manifest.json."""
    spec = loaded.spec
    records, per_class = [], np.zeros(max(spec.num_classes, 1), dtype=np.int64)
    gated_lines: list[str] = []
    gate_totals: dict[str, Any] | None = None
    for k in range(plan.num_shards):
        record = _record(plan, k, endpoint_url)
        if record is None:
            raise RuntimeError(f"shard {k} of {plan.out} was not written (see the errors above)")
        gated_lines += [json.dumps(row) for row in record.pop("gated", [])]
        gate_totals = combine_summaries(gate_totals, record.get("gate_summary"))
        for name, count in record["per_class_counts"].items():
            per_class[int(name)] += count
        records.append(record)
    num_rows = sum(r["rows"] for r in records)
    manifest = {
        **identity, "model": {k: loaded.source.get(k) for k in ("name", "version", "run_id", "run_dir")},
        "spec": spec.to_json(), "num_rows": num_rows, "num_shards": plan.num_shards,
        "per_class_counts": {str(i): int(c) for i, c in enumerate(per_class)} if spec.conditional else {},
        "requested_per_class_counts": labels.per_class(plan.seed, plan.num_images),
        "classes": class_names(spec) if spec.conditional else [], "shards": records, "created_at": time.time(),
        "columns": list(hf_features(spec)), "row_seed": "seed * 2**32 + index",
        "png_compression_level": PNG_LEVEL[plan.fmt] if spec.is_image else None,
        "generated_on": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if gate_plan is not None:
        manifest["gates"] = {**gate_plan, "totals": gate_totals or {},
                             "gated_rows": GATED_FILE, "num_dropped": plan.num_images - num_rows}
        storage.write_bytes_atomic(storage.join(plan.out, GATED_FILE),
                                   "".join(line + "\n" for line in gated_lines).encode(), endpoint_url)
    storage.write_bytes_atomic(storage.join(plan.out, "README.md"), dataset_card(manifest, spec).encode(),
                               endpoint_url)
    storage.write_json_atomic(storage.join(plan.out, "manifest.json"), manifest, endpoint_url)
    return {"out": plan.out, "num_images": num_rows, "num_shards": plan.num_shards,
            "manifest": storage.join(plan.out, "manifest.json"), "per_class_counts": manifest["per_class_counts"],
            "num_dropped": plan.num_images - num_rows, "shards_written": written}


# --- several processes: accelerate launch, each rank writing its own shards ---------------------

def launch_ranks(job: ExportJob, processes: int, meter: Progress) -> None:
    """Run `processes` ranks under `accelerate launch` (their own process group, killed with us on
    SIGTERM/Ctrl-C; on SIGKILL they notice we are gone and stop). Their progress lines feed `meter`."""
    from ganpipe.launch import run_process_group

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise UserError(f"--num-processes {processes}: only {torch.cuda.device_count()} GPU(s) here")
    job.parent_pid = os.getpid()
    env = dict(os.environ)
    env["GANPIPE_HOME"] = str(storage.ganpipe_home())
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    errors: deque[str] = deque(maxlen=20)

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_TAG):
            meter.update(int(line.split()[1]))
            return
        if line.startswith("error: "):
            errors.append(line.removeprefix("error: "))
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="ganpipe-export-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job.to_json()))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
               "--module", "ganpipe.export", str(job_file)]
        code = run_process_group(cmd, env, on_line=on_line)
    if code == 2 and errors:
        raise UserError(errors[-1])
    if code != 0:
        raise RuntimeError(f"export processes exited with code {code}" + (f": {errors[-1]}" if errors else ""))


def main(argv: list[str] | None = None) -> int:
    """One rank: `accelerate launch -m ganpipe.export JOB.json` (started by `ganpipe export`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ganpipe.export JOB.json (started by `ganpipe export --num-processes P`)",
              file=sys.stderr)
        return 2
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    job = ExportJob.from_json(json.loads(Path(argv[0]).read_text()))

    def report(rows: int) -> None:
        print(f"{PROGRESS_TAG} {rows}", flush=True)

    try:
        write_shards(job, state.process_index, state.num_processes, state.device, report)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ParentGone as exc:
        print(f"stopping: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def dataset_card(manifest: dict[str, Any], spec: NetworkSpec) -> str:
    parquet = manifest["format"] == "parquet"
    data_files = "data/train-*.parquet" if parquet else "train/**"
    counts = "\n".join(f"| {manifest['classes'][int(k)]} | {v} |" for k, v in manifest["per_class_counts"].items())
    class_table = f"\n## Classes\n| class | rows |\n|---|---|\n{counts}\n" if counts else ""
    model = manifest["model"]
    gates = manifest.get("gates")
    gate_text = (f"\n## Quality gates\n{manifest['num_images'] - manifest['num_rows']} of {manifest['num_images']} "
                 f"candidate rows were dropped (settings: `{json.dumps(gates['settings'])}`); every gated row, "
                 f"with its reason, is listed in `{gates['gated_rows']}`. Indices of dropped rows are "
                 "missing from the `index` column.\n") if gates else ""
    load = (f'load_dataset("parquet", data_files="{data_files}")' if parquet
            else 'load_dataset("imagefolder", data_dir=".")')
    label = ', "label": [label]' if spec.conditional else ""
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

{manifest['num_rows']} samples generated by ganpipe from model `{manifest['model_uri']}`
(registered name {model.get('name') or '-'}, version {model.get('version') or '-'}, MLflow run
{model.get('run_id') or '-'}), export seed {manifest['seed']}.

Columns: {', '.join(manifest['columns'])}. Row `index` was generated from latent seed `seed`
(= export seed * 2**32 + index); regenerate it exactly (same kind of device:
{manifest['generated_on']}) with
`mlflow.pyfunc.load_model(MODEL).predict(pd.DataFrame({{"seed": [seed]{label}}}))`.
{class_table}{gate_text}
Load with `datasets.{load}`. See manifest.json for per-shard row counts and checksums.
"""


if __name__ == "__main__":
    sys.exit(main())

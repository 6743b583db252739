"""Ingest: validate a source, preprocess it once, and cache the result under a content fingerprint.

fingerprint = H(prepared-format version, input content fingerprint, preprocessing parameters).
Unchanged input with unchanged parameters is a cache hit that decodes nothing; any change to the
bytes or the parameters gives a new fingerprint and a new prepared directory.

The prepared form is what training reads fastest: uint8 image shards (N x H x W x C `.npy`,
memory-mapped) or float32 vector shards, int64 label shards, and `meta.json` with class names,
counts, statistics and shard checksums. `report.json` beside it lists the skipped rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ganpipe import storage
from ganpipe.config import DataConfig
from ganpipe.data.decode import ImageSpec, decode_chunk, is_grayscale, open_image
from ganpipe.data.sources import IMAGE_EXTENSIONS, OpenedSource, open_source
from ganpipe.errors import UserError

PREPARED_FORMAT = 1  # bump when the layout or the preprocessing changes
LABEL_NAMES = ("label", "labels", "class", "target", "y", "category")
CHUNK = 512  # records per decode task
PARALLEL_MIN_RECORDS = 4096  # below this, a process pool costs more than it saves


@dataclass
class IngestResult:
    fingerprint: str
    num_records: int
    num_skipped: int
    classes: list[str] | None
    location: str
    cached: bool
    report: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ingest(cfg: DataConfig, endpoint_url: str | None = None, workers: int | None = None) -> IngestResult:
    opened = open_source(cfg, endpoint_url)
    params = preprocessing_params(cfg)
    fingerprint = hashlib.sha256(json.dumps(
        {"format": PREPARED_FORMAT, "input": opened.fingerprint, "params": params}, sort_keys=True
    ).encode()).hexdigest()[:20]
    cache_root = cfg.cache or str(storage.ganpipe_home() / "prepared")
    location = storage.join(cache_root, fingerprint)
    meta_uri = storage.join(location, "meta.json")
    if storage.exists(meta_uri, endpoint_url):
        meta = storage.read_json(meta_uri, endpoint_url)
        return _result(meta, location, cached=True)

    with tempfile.TemporaryDirectory(dir=_scratch_dir(location)) as scratch:
        work = Path(scratch) / "prepared"
        work.mkdir()
        meta = Preparer(cfg, opened, work, workers, endpoint_url).run()
        meta.update({"fingerprint": fingerprint, "input_fingerprint": opened.fingerprint,
                     "params": params, "format": PREPARED_FORMAT})
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(work, location, endpoint_url)
    return _result(meta, location, cached=False)


def preprocessing_params(cfg: DataConfig) -> dict[str, Any]:
    fields = ["kind", "columns", "image_column", "label_column", "classes", "resolution", "channels",
              "resize", "on_bad_record", "split", "config_name", "revision", "max_records", "shard_size"]
    return {f: getattr(cfg, f) for f in fields}


def _scratch_dir(location: str) -> str | None:
    """Build beside a local target (so the final rename is atomic); in a temp dir for S3."""
    if storage.is_remote(location):
        return None
    parent = storage.local_path(location).parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def _publish(work: Path, location: str, endpoint_url: str | None) -> None:
    if not storage.is_remote(location):
        storage.fsync_tree(work)
        target = storage.local_path(location)
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "meta.json").exists():  # lost a race to a concurrent ingest: theirs is equal
                raise
        return
    # meta.json goes last: its presence is what marks the prepared data complete.
    for path in sorted(work.iterdir()):
        if path.name != "meta.json":
            storage.upload_file_atomic(path, storage.join(location, path.name), endpoint_url)
    storage.upload_file_atomic(work / "meta.json", storage.join(location, "meta.json"), endpoint_url)


def _result(meta: dict[str, Any], location: str, cached: bool) -> IngestResult:
    return IngestResult(fingerprint=meta["fingerprint"], num_records=meta["num_records"],
                        num_skipped=meta["num_skipped"], classes=meta.get("classes"), location=location,
                        cached=cached, report=storage.join(location, "report.json"))


class Labels:
    """Validates labels and maps them to contiguous ids, keeping class names.

    ClassLabel columns keep their names and order; strings and integers without declared classes
    get ids in sorted order once every label has been seen (`finalise` remaps the shards)."""

    def __init__(self, feature: Any, declared: list[str] | None):
        self.names: list[str] | None = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self.declared = declared
        self.seen: dict[str, int] = {}  # provisional ids, in order of first appearance
        self.numeric = True

    def provisional_id(self, value: Any) -> tuple[int | None, str | None]:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None, "missing label"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if self.names is not None:
            if not isinstance(value, int) or not 0 <= value < len(self.names):
                return None, f"label {value!r} outside the ClassLabel's {len(self.names)} classes"
            name = self.names[value]
        elif self.declared is not None and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(self.declared):
                return None, f"label {value} outside data.classes (0..{len(self.declared) - 1})"
            name = self.declared[value]
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            self.numeric &= isinstance(value, int)
            name = str(value)
        else:
            return None, f"label {value!r} is not an integer or a string"
        if self.declared is not None and name not in self.declared:
            return None, f"label {name!r} not in data.classes"
        return self.seen.setdefault(name, len(self.seen)), None

    def final_names(self) -> list[str]:
        if self.declared is not None:
            return list(self.declared)
        if self.names is not None:
            return list(self.names)
        return sorted(self.seen, key=int) if self.numeric else sorted(self.seen)

    def remap(self) -> np.ndarray:
        """provisional id -> final id."""
        final = {name: i for i, name in enumerate(self.final_names())}
        remap = np.zeros(max(len(self.seen), 1), dtype=np.int64)
        for name, provisional in self.seen.items():
            remap[provisional] = final[name]
        return remap


class Preparer:
    """One pass over the source: validate, decode in parallel, write shards."""

    def __init__(self, cfg: DataConfig, opened: OpenedSource, out: Path, workers: int | None,
                 endpoint_url: str | None = None):
        self.cfg = cfg
        self.endpoint_url = endpoint_url
        self.opened = opened
        self.out = out
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        self.skipped: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.rows_in_shards = 0

    # --- schema -------------------------------------------------------------------------------
    def _columns(self) -> dict[str, Any]:
        features = self.opened.dataset.features
        if features is None:
            first = next(iter(self.opened.dataset.take(1)), None)
            if first is None:
                raise UserError(f"{self.opened.description}: the dataset is empty")
            return {name: None for name in first}
        return dict(features)

    def _fail(self, message: str) -> UserError:
        return UserError(f"{self.opened.description}: {message}")

    def _image_column(self, columns: dict[str, Any]) -> str:
        if self.cfg.image_column:
            if self.cfg.image_column not in columns:
                raise self._fail(f"data.image_column {self.cfg.image_column!r} not found "
                                 f"(columns: {', '.join(columns)})")
            return self.cfg.image_column
        for name, feature in columns.items():
            if isinstance(feature, datasets.Image):
                return name
        for name, feature in columns.items():
            if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
                return name
            if isinstance(feature, dict) and "bytes" in feature:
                return name
        first = next(iter(self.opened.dataset.take(1)), {})
        for name, value in first.items():
            if isinstance(value, str) and Path(value).suffix.lower() in IMAGE_EXTENSIONS:
                return name
        raise self._fail(f"no image column found (columns: {', '.join(columns)}); set data.image_column")

    def _label_column(self, columns: dict[str, Any]) -> str | None:
        if self.cfg.label_column:
            if self.cfg.label_column not in columns:
                raise self._fail(f"data.label_column {self.cfg.label_column!r} not found "
                                 f"(columns: {', '.join(columns)})")
            return self.cfg.label_column
        features = set(self.cfg.columns or [])  # a vector's own columns are never its label
        for name, feature in columns.items():
            if isinstance(feature, datasets.ClassLabel) and name not in features:
                return name
        return next((name for name in LABEL_NAMES if name in columns and name not in features), None)

    def _records(self, columns: list[str]) -> Iterator[tuple[int, dict[str, list]]]:
        """(first row id, batch) over the source, honouring data.max_records."""
        dataset = self.opened.dataset
        row = 0
        limit = self.cfg.max_records
        for batch in dataset.select_columns(columns).iter(batch_size=CHUNK):
            size = len(batch[columns[0]])
            if limit is not None and row + size > limit:
                batch = {k: v[: limit - row] for k, v in batch.items()}
                size = limit - row
            if size:
                yield row, batch
            row += size
            if limit is not None and row >= limit:
                return

    # --- the pass -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        columns = self._columns()
        label_column = self._label_column(columns)
        labels = Labels(columns.get(label_column), self.cfg.classes) if label_column else None
        if self.cfg.kind == "vector":
            meta = self._run_vectors(columns, label_column, labels)
        else:
            meta = self._run_images(columns, label_column, labels)
        if self.rows_in_shards == 0:
            reason = f" ({len(self.skipped)} bad records skipped)" if self.skipped else ""
            raise self._fail(f"the dataset is empty{reason}")
        classes = None
        if labels is not None:
            classes = labels.final_names()
            counts = self._finalise_labels(labels.remap(), len(classes))
            meta.update({"classes": classes, "class_counts": dict(zip(classes, counts, strict=True)),
                         "label_column": label_column})
        meta.update({"num_records": self.rows_in_shards, "num_skipped": len(self.skipped),
                     "classes": classes, "shards": self.shards, "source": self.cfg.source,
                     "content_sha256": _combined_hash(self.shards)})
        report = {"source": self.cfg.source, "policy": self.cfg.on_bad_record,
                  "num_records": self.rows_in_shards, "num_skipped": len(self.skipped),
                  "skipped": self.skipped}
        (self.out / "report.json").write_text(json.dumps(report, indent=2))
        return meta

    def _bad(self, row: int, reason: str) -> None:
        if self.cfg.on_bad_record == "error":
            raise self._fail(f"row {row}: {reason} (set data.on_bad_record: skip to drop such rows)")
        self.skipped.append({"row": row, "reason": reason})

    def _check_labels(self, labels: Labels | None, values: list | None, first_row: int, keep: list[bool]
                      ) -> list[int]:
        ids = []
        if labels is None or values is None:
            return ids
        for i, value in enumerate(values):
            label_id, problem = labels.provisional_id(value)
            if problem:
                self._bad(first_row + i, problem)
                keep[i] = False
            ids.append(label_id if label_id is not None else -1)
        return ids

    def _run_images(self, columns: dict[str, Any], label_column: str | None, labels: Labels | None
                    ) -> dict[str, Any]:
        image_column = self._image_column(columns)
        if isinstance(columns.get(image_column), datasets.Image):
            self.opened.dataset = self.opened.dataset.cast_column(image_column, datasets.Image(decode=False))
        wanted = [image_column] + ([label_column] if label_column else [])
        spec = ImageSpec(self.cfg.resolution, self.cfg.channels or self._detect_channels(image_column),
                         self.cfg.resize)
        writer = ShardWriter(self.out, "images", self.cfg.shard_size)
        label_writer = ShardWriter(self.out, "labels", self.cfg.shard_size) if labels else None

        def submit(executor: Executor | None, first_row: int, batch: dict[str, list]):
            keep = [True] * len(batch[image_column])
            label_ids = self._check_labels(labels, batch.get(label_column), first_row, keep)
            records = [_raw_record(value) for value in batch[image_column]]
            rows = [first_row + i for i in range(len(records)) if keep[i]]
            records = [r for r, k in zip(records, keep, strict=True) if k]
            records = _fetch_remote(records, self.endpoint_url)
            label_ids = [label_ids[i] for i in range(len(keep)) if keep[i]] if labels else []
            work = (decode_chunk, records, spec)
            pending = executor.submit(*work) if executor else _Done(decode_chunk(records, spec))
            return pending, rows, label_ids

        def collect(pending, rows: list[int], label_ids: list[int]) -> None:
            images, bad = pending.result()
            bad_positions = set()
            for position, reason in bad:
                self._bad(rows[position], reason)
                bad_positions.add(position)
            writer.add(images)
            if label_writer is not None:
                label_writer.add(np.array([lid for i, lid in enumerate(label_ids) if i not in bad_positions],
                                          dtype=np.int64))

        with _maybe_pool(self.workers, self._expected_records()) as executor:
            in_flight: list = []
            for first_row, batch in self._records(wanted):
                in_flight.append(submit(executor, first_row, batch))
                while len(in_flight) > 2 * max(self.workers, 1):
                    collect(*in_flight.pop(0))
            for item in in_flight:
                collect(*item)
        self.shards += writer.close()
        if label_writer is not None:
            self.shards += label_writer.close()
        self.rows_in_shards = writer.rows
        return {"kind": "image", "resolution": spec.resolution, "channels": spec.channels,
                "image_column": image_column}

    def _run_vectors(self, columns: dict[str, Any], label_column: str | None, labels: Labels | None
                     ) -> dict[str, Any]:
        wanted_columns = list(self.cfg.columns or [])
        missing = [c for c in wanted_columns if c not in columns]
        if missing:
            raise self._fail(f"data.columns {missing} not found (columns: {', '.join(columns)})")
        writer = ShardWriter(self.out, "vectors", self.cfg.shard_size)
        label_writer = ShardWriter(self.out, "labels", self.cfg.shard_size) if labels else None
        total = np.zeros(len(wanted_columns))
        total_sq = np.zeros(len(wanted_columns))
        for first_row, batch in self._records(wanted_columns + ([label_column] if label_column else [])):
            size = len(batch[wanted_columns[0]])
            keep = [True] * size
            label_ids = self._check_labels(labels, batch.get(label_column), first_row, keep)
            matrix = np.zeros((size, len(wanted_columns)), dtype=np.float64)
            for j, column in enumerate(wanted_columns):
                for i, value in enumerate(batch[column]):
                    if not keep[i]:
                        continue
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                        self._bad(first_row + i, f"non-numeric value {value!r} in column {column!r}")
                        keep[i] = False
                    else:
                        matrix[i, j] = value
            mask = np.array(keep)
            kept = matrix[mask]
            total += kept.sum(axis=0)
            total_sq += (kept**2).sum(axis=0)
            writer.add(kept.astype(np.float32))
            if label_writer is not None:
                label_writer.add(np.array(label_ids, dtype=np.int64)[mask])
        self.shards += writer.close()
        if label_writer is not None:
            self.shards += label_writer.close()
        self.rows_in_shards = n = writer.rows
        mean = total / max(n, 1)
        std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean**2, 0.0))
        std = np.where(std > 1e-8, std, 1.0)
        return {"kind": "vector", "columns": wanted_columns, "mean": mean.tolist(), "std": std.tolist()}

    def _detect_channels(self, image_column: str) -> int:
        """1 when the first records are all greyscale, else 3."""
        first = next(self.opened.dataset.select_columns([image_column]).iter(batch_size=64), None)
        if not first:
            return 3
        for value in first[image_column]:
            try:
                record = _fetch_remote([_raw_record(value)], self.endpoint_url)[0]
                if not is_grayscale(open_image(*record)):
                    return 3
            except Exception:  # noqa: BLE001 - bad records are reported by the main pass
                continue
        return 1

    def _expected_records(self) -> int | None:
        info = getattr(self.opened.dataset, "info", None)
        split_info = (info.splits or {}).get(self.cfg.split) if info and info.splits else None
        known = getattr(self.opened.dataset, "num_rows", None) or (split_info.num_examples if split_info else None)
        if self.cfg.max_records is not None:
            return min(known, self.cfg.max_records) if known else self.cfg.max_records
        return known

    def _finalise_labels(self, remap: np.ndarray, num_classes: int) -> list[int]:
        counts = np.zeros(num_classes, dtype=np.int64)
        for shard in self.shards:
            if shard["file"].startswith("labels-"):
                path = self.out / shard["file"]
                final = remap[np.load(path)]
                np.save(path, final)
                shard["sha256"] = storage.sha256_file(path)
                counts += np.bincount(final, minlength=num_classes)
        return counts.tolist()


class ShardWriter:
    """Accumulates rows and writes fixed-size `.npy` shards: memory bounded by the shard size."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.rows = 0
        self.written: list[dict[str, Any]] = []

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.shard_size - self.buffered)
            self.buffer.append(rows[:take])
            self.buffered += take
            rows = rows[take:]
            if self.buffered == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        path = self.out / f"{self.prefix}-{len(self.written):05d}.npy"
        np.save(path, np.concatenate(self.buffer))
        self.written.append({"file": path.name, "rows": self.buffered, "sha256": storage.sha256_file(path)})
        self.rows += self.buffered
        self.buffer, self.buffered = [], 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.written


class _Done:
    """A finished result with a Future's `result()`: the inline path needs no pool."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


@contextmanager
def _maybe_pool(workers: int, expected: int | None) -> Iterator[Executor | None]:
    if workers <= 1 or (expected is not None and expected < PARALLEL_MIN_RECORDS):
        yield None
        return
    # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
    executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _raw_record(value: Any) -> tuple[bytes | None, str | None]:
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None


def _fetch_remote(records: list[tuple[bytes | None, str | None]], endpoint_url: str | None
                  ) -> list[tuple[bytes | None, str | None]]:
    """Workers read local files themselves; remote paths (s3://, hf://) are fetched here."""
    remote = [i for i, (data, path) in enumerate(records) if data is None and path and "://" in path]
    if not remote:
        return records
    records = list(records)
    for i in remote:
        path = records[i][1]
        try:
            records[i] = (storage.read_bytes(path, endpoint_url), path)
        except OSError:
            records[i] = (None, None)  # reported as an undecodable record
    return records


def _combined_hash(shards: list[dict[str, Any]]) -> str:
    return hashlib.sha256("".join(s["file"] + s["sha256"] for s in shards).encode()).hexdigest()


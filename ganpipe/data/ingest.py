"""Ingest: validate a source, preprocess it once, and cache the result under a content fingerprint.

fingerprint = H(prepared-format version, input content fingerprint, preprocessing parameters).
Unchanged input with unchanged parameters is a cache hit that opens and decodes nothing; any change
to the bytes or the parameters gives a new fingerprint and a new prepared directory.

The prepared form is what training reads fastest: uint8 image shards (N x H x W x C `.npy`,
memory-mapped) or float32 vector shards, int64 label shards, and `meta.json` with class names,
counts, statistics and shard checksums. `report.json` beside it lists the skipped rows.

Memory is bounded by the shard size, not the dataset size: the source is read in Arrow batches of
BATCH_ROWS rows, at most 2 x workers decode tasks are in flight, and one shard is buffered at a time.

This module does not import `datasets` at the top: decode workers import this package, and a
cache hit should not pay for it either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from ganpipe import storage
from ganpipe.data.decode import ImageSpec, Record, decode_chunk, is_grayscale, open_image, warm_up
from ganpipe.data.sources import (
    BATCH_ROWS,
    IMAGE_EXTENSIONS,
    datasets_without_torch,
    open_dataset,
    resolve_source,
)
from ganpipe.errors import UserError

if TYPE_CHECKING:  # decode workers import this package: keep their start-up light
    from ganpipe.config import DataConfig

PREPARED_FORMAT = 2  # bump when the layout or the preprocessing changes
LABEL_NAMES = ("label", "labels", "class", "target", "y", "category")
CHUNK_BYTES = 16 << 20  # bytes (encoded in + decoded out) per decode task: large images do not pile up
PARALLEL_MIN_RECORDS = 2048  # below this, worker processes cost more than they save
PARALLEL_MIN_BYTES = 1 << 20  # image sources this large start their workers before anything is read
CHANNEL_SAMPLE = 64  # records looked at to choose 1 or 3 channels when data.channels is not set


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
    source = resolve_source(cfg, endpoint_url)
    params = preprocessing_params(cfg)
    fingerprint = prepared_fingerprint(source.fingerprint, params)
    cache_root = cfg.cache or str(storage.ganpipe_home() / "prepared")
    location = storage.join(cache_root, fingerprint)
    meta_uri = storage.join(location, "meta.json")
    if storage.exists(meta_uri, endpoint_url):
        return _result(storage.read_json(meta_uri, endpoint_url), location, cached=True)

    workers = workers if workers is not None else min(available_cpus(), 8)
    # Large image sources start their decode workers first, so that the workers' start-up overlaps
    # with importing `datasets` and opening the source here.
    start_workers = cfg.kind == "image" and source.num_bytes >= PARALLEL_MIN_BYTES
    with tempfile.TemporaryDirectory(dir=_scratch_dir(location)) as scratch, \
            DecodePool(workers, start=start_workers) as pool, datasets_without_torch():
        work = Path(scratch) / "prepared"
        work.mkdir()
        dataset = open_dataset(source, cfg, endpoint_url)
        meta = Preparer(cfg, dataset, source.description, work, pool, endpoint_url, source.root).run()
        meta.update({"fingerprint": fingerprint, "input_fingerprint": source.fingerprint,
                     "params": params, "format": PREPARED_FORMAT})
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(work, location, endpoint_url)
    return _result(meta, location, cached=False)


def preprocessing_params(cfg: DataConfig) -> dict[str, Any]:
    fields = ["kind", "columns", "image_column", "label_column", "classes", "resolution", "channels",
              "resize", "on_bad_record", "split", "config_name", "revision", "max_records", "shard_size"]
    return {f: getattr(cfg, f) for f in fields}


def prepared_fingerprint(input_fingerprint: str, params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(
        {"format": PREPARED_FORMAT, "input": input_fingerprint, "params": params}, sort_keys=True
    ).encode()).hexdigest()[:20]


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _scratch_dir(location: str) -> str:
    """Build beside a local target (so the final rename is atomic); under GANPIPE_HOME for S3
    (the system temp dir may be a small tmpfs)."""
    parent = storage.ganpipe_home() / "tmp" if storage.is_remote(location) else storage.local_path(location).parent
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

    ClassLabel columns keep their names and order; declared `data.classes` win over both; strings and
    integers otherwise get ids in sorted order once every label has been seen (the label shards are
    written with provisional ids and remapped at the end)."""

    def __init__(self, feature: Any, declared: list[str] | None):
        import datasets

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
            if value == -1:  # datasets' ClassLabel marks a missing label with -1
                return None, "missing label (-1)"
            if not isinstance(value, int) or not 0 <= value < len(self.names):
                return None, f"label {value!r} outside the ClassLabel's {len(self.names)} classes"
            name = self.names[value]
        elif self.declared is not None and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(self.declared):
                return None, f"label {value} outside data.classes (ids 0..{len(self.declared) - 1})"
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

    def __init__(self, cfg: DataConfig, dataset: Any, description: str, out: Path, pool: DecodePool,
                 endpoint_url: str | None = None, root: str = ""):
        self.cfg = cfg
        self.dataset = dataset  # datasets.Dataset or IterableDataset
        self.description = description
        self.out = out
        self.pool = pool
        self.endpoint_url = endpoint_url
        self.root = root  # relative image paths in a table are relative to this
        self.skipped: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.rows_in_shards = 0

    def _fail(self, message: str) -> UserError:
        return UserError(f"{self.description}: {message}")

    # --- schema -------------------------------------------------------------------------------
    def _columns(self) -> dict[str, Any]:
        """Column name -> datasets feature; from the first batch when the source declares none."""
        import datasets

        if self.dataset.features is not None:
            return dict(self.dataset.features)
        first = self._first_batch(None)
        if first is None:
            raise self._fail("the dataset is empty (no rows)")
        return dict(datasets.Features.from_arrow_schema(first.schema))

    def _first_batch(self, columns: list[str] | None) -> Any:
        """The first few rows as an Arrow table, or None when there are none."""
        return next(self._batches(columns, batch_rows=CHANNEL_SAMPLE), (0, None))[1]

    def _image_column(self, columns: dict[str, Any]) -> str:
        import datasets

        if self.cfg.image_column:
            return self._require(self.cfg.image_column, columns, "data.image_column")
        for name, feature in columns.items():
            if isinstance(feature, datasets.Image):
                return name
        for name, feature in columns.items():
            if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
                return name
            if isinstance(feature, dict) and "bytes" in feature:
                return name
        strings = [name for name, feature in columns.items()
                   if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]
        first = self._first_batch(strings) if strings else None
        for name in strings:
            values = [v for v in (first.column(name).to_pylist() if first is not None else []) if v]
            if values and all(PurePosixPath(v).suffix.lower() in IMAGE_EXTENSIONS for v in values):
                return name
        raise self._fail(f"no image column found (columns: {', '.join(columns)}); set data.image_column")

    def _label_column(self, columns: dict[str, Any]) -> str | None:
        import datasets

        if self.cfg.label_column:
            return self._require(self.cfg.label_column, columns, "data.label_column")
        data_columns = set(self.cfg.columns or [])  # a vector's own columns are never its label
        for name, feature in columns.items():
            if isinstance(feature, datasets.ClassLabel) and name not in data_columns:
                return name
        for name in LABEL_NAMES:
            feature = columns.get(name)
            # Only integer or string columns are labels; a float `target` is a value to model.
            if name not in data_columns and isinstance(feature, datasets.Value) and (
                    feature.dtype.startswith(("int", "uint")) or "string" in feature.dtype):
                return name
        return None

    def _require(self, column: str, columns: dict[str, Any], key: str) -> str:
        if column not in columns:
            raise self._fail(f"{key}: column {column!r} not found (columns: {', '.join(columns)})")
        return column

    # --- reading ------------------------------------------------------------------------------
    def _batches(self, columns: list[str] | None, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, Any]]:
        """(first row id, Arrow table) over the source, honouring data.max_records. Arrow batches
        skip `datasets`' per-row Python conversion and image decoding."""
        import datasets

        stream = self.dataset.select_columns(columns) if columns is not None else self.dataset
        batches = stream.with_format("arrow").iter(batch_size=batch_rows)
        row, limit = 0, self.cfg.max_records
        while limit is None or row < limit:
            try:
                table = next(batches, None)
            except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
                # Unreadable files, or files whose columns disagree with the first file's.
                raise self._fail(f"cannot read the rows after row {row}: {exc}") from None
            if table is None:
                return
            if limit is not None:
                table = table.slice(0, limit - row)
            if table.num_rows:
                yield row, table
            row += table.num_rows

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
            reason = f": all {len(self.skipped)} rows are bad records" if self.skipped else " (no rows)"
            raise self._fail(f"the dataset is empty{reason}")
        classes = None
        if labels is not None:
            classes = labels.final_names()
            counts = self._finalise_labels(labels.remap(), len(classes))
            meta.update({"class_counts": dict(zip(classes, counts, strict=True)), "label_column": label_column})
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

    def _label_ids(self, labels: Labels | None, table: Any, label_column: str | None, first_row: int,
                   keep: np.ndarray) -> np.ndarray:
        """Provisional label ids of a batch (-1 for no label); bad labels clear `keep`."""
        if labels is None:
            return np.full(len(keep), -1, dtype=np.int64)
        # Each distinct value of the batch is checked once, not each row.
        encoded = table.column(label_column).combine_chunks().dictionary_encode()
        checked = [labels.provisional_id(value) for value in encoded.dictionary.to_pylist()]
        checked.append((None, "missing label"))  # where the column holds a null
        value_ids = np.array([-1 if label_id is None else label_id for label_id, _ in checked], dtype=np.int64)
        index = encoded.indices.fill_null(len(checked) - 1).to_numpy(zero_copy_only=False)
        ids = value_ids[index]
        for i in np.flatnonzero(ids < 0):
            self._bad(first_row + int(i), checked[index[i]][1])
            keep[i] = False
        return ids

    def _run_images(self, columns: dict[str, Any], label_column: str | None, labels: Labels | None
                    ) -> dict[str, Any]:
        image_column = self._image_column(columns)
        wanted = [image_column] + ([label_column] if label_column else [])
        writer = ShardWriter(self.out, "images", self.cfg.shard_size)
        label_writer = ShardWriter(self.out, "labels", self.cfg.shard_size) if labels else None
        spec: ImageSpec | None = None
        in_flight: deque[tuple[Future, list[int], np.ndarray]] = deque()

        def collect() -> None:
            future, rows, label_ids = in_flight.popleft()
            images, bad = future.result()
            good = np.ones(len(rows), dtype=bool)
            for position, reason in bad:
                self._bad(rows[position], reason)
                good[position] = False
            writer.add(images)
            if label_writer is not None:
                label_writer.add(label_ids[good])

        if (getattr(self.dataset, "num_rows", None) or 0) >= PARALLEL_MIN_RECORDS:
            self.pool.start()
        for first_row, table in self._batches(wanted):
            keep = np.ones(table.num_rows, dtype=bool)
            label_ids = self._label_ids(labels, table, label_column, first_row, keep)
            records = self._fetch_remote([self._record(value) for value in table.column(image_column).to_pylist()])
            if spec is None:
                spec = ImageSpec(self.cfg.resolution, self.cfg.channels or _detect_channels(records),
                                 self.cfg.resize)
            kept = np.flatnonzero(keep)
            for part in _decode_tasks(kept, records, spec):
                in_flight.append((self.pool.submit([records[i] for i in part], spec),
                                  (first_row + part).tolist(), label_ids[part]))
                while len(in_flight) > 2 * max(self.pool.workers, 1):
                    collect()
        while in_flight:
            collect()
        self.shards += writer.close()
        if label_writer is not None:
            self.shards += label_writer.close()
        self.rows_in_shards = writer.rows
        return {"kind": "image", "resolution": self.cfg.resolution,
                "channels": spec.channels if spec else self.cfg.channels, "image_column": image_column}

    def _record(self, value: Any) -> Record:
        """An image value (HF Image struct, raw bytes or a path) as (bytes, path); relative paths in
        a table are relative to the source's folder."""
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data, path = bytes(value), None
        elif isinstance(value, str):
            data, path = None, value
        else:
            return None, None
        if data is None and path and "://" not in path and not os.path.isabs(path) and self.root:
            path = storage.join(self.root, path) if storage.is_remote(self.root) else str(Path(self.root) / path)
        return data, path

    def _fetch_remote(self, records: list[Record]) -> list[Record]:
        """Workers read local files themselves; remote paths (s3://, hf://) are fetched here, all of
        a batch at once (s3fs fetches them concurrently). A failed fetch leaves (None, path), which
        the worker reports as a missing file."""
        remote = [i for i, (data, path) in enumerate(records) if data is None and path and "://" in path]
        if not remote:
            return records
        located = [storage.filesystem(records[i][1], self.endpoint_url) for i in remote]
        fs = located[0][0]
        fetched = fs.cat([key for _, key in located], on_error="return")
        records = list(records)
        for i, (_, key) in zip(remote, located, strict=True):
            if isinstance(fetched.get(key), bytes):
                records[i] = (fetched[key], records[i][1])
        return records

    def _run_vectors(self, columns: dict[str, Any], label_column: str | None, labels: Labels | None
                     ) -> dict[str, Any]:
        wanted_columns = list(self.cfg.columns or [])
        for column in wanted_columns:
            self._require(column, columns, "data.columns")
        writer = ShardWriter(self.out, "vectors", self.cfg.shard_size)
        label_writer = ShardWriter(self.out, "labels", self.cfg.shard_size) if labels else None
        stats = RunningStats(len(wanted_columns))
        for first_row, table in self._batches(wanted_columns + ([label_column] if label_column else [])):
            keep = np.ones(table.num_rows, dtype=bool)
            label_ids = self._label_ids(labels, table, label_column, first_row, keep)
            matrix = np.empty((table.num_rows, len(wanted_columns)), dtype=np.float64)
            for j, column in enumerate(wanted_columns):
                matrix[:, j], problems = _numeric(table.column(column))
                for i in np.flatnonzero(problems & keep):
                    value = table.column(column)[int(i)].as_py()
                    what = "missing value" if value is None else f"non-numeric value {value!r}"
                    self._bad(first_row + int(i), f"{what} in column {column!r}")
                keep &= ~problems
            stats.add(matrix[keep])
            writer.add(matrix[keep].astype(np.float32))
            if label_writer is not None:
                label_writer.add(label_ids[keep])
        self.shards += writer.close()
        if label_writer is not None:
            self.shards += label_writer.close()
        self.rows_in_shards = writer.rows
        return {"kind": "vector", "columns": wanted_columns, "mean": stats.mean.tolist(), "std": stats.std().tolist()}

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


def _detect_channels(records: list[Record]) -> int:
    """1 when the first decodable records are all greyscale, else 3."""
    for record in records[:CHANNEL_SAMPLE]:
        try:
            if not is_grayscale(open_image(*record)):
                return 3
        except Exception:  # noqa: BLE001 - bad records are reported by the main pass
            continue
    return 1


def _decode_tasks(indices: np.ndarray, records: list[Record], spec: ImageSpec) -> list[np.ndarray]:
    """Split a batch's record indices into decode tasks of about CHUNK_BYTES at most, counting each
    record's encoded bytes and its decoded image."""
    decoded = spec.resolution * spec.resolution * spec.channels
    sizes = np.array([len(records[i][0] or b"") + decoded for i in indices], dtype=np.int64)
    task = np.cumsum(sizes) // CHUNK_BYTES
    return [indices] if not len(task) or task[-1] == 0 else [indices[task == t] for t in np.unique(task)]


def _numeric(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, mask of the non-numeric ones) of an Arrow column. Numbers stored as text
    (CSV) count as numbers; booleans, empty cells, NaN and infinities do not."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = np.array([_parse_float(v) for v in column.to_pylist()], dtype=np.float64)
    else:
        values = np.full(len(column), np.nan)
    problems = ~np.isfinite(values)
    values[problems] = 0.0
    return values, problems


def _parse_float(text: str | None) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan


class RunningStats:
    """Per-column mean and standard deviation over batches (Chan et al.'s parallel update), so a
    large offset does not cancel catastrophically as in E[x^2] - E[x]^2."""

    def __init__(self, width: int):
        self.count = 0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)

    def add(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        n, batch_mean = len(batch), batch.mean(axis=0)
        delta = batch_mean - self.mean
        total = self.count + n
        self.m2 += ((batch - batch_mean) ** 2).sum(axis=0) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return np.where(std > 1e-8, std, 1.0)  # constant columns: leave them unscaled


class ShardWriter:
    """Fills one shard-sized buffer and writes it as a `.npy` file: memory bounded by the shard size."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.buffer: np.ndarray | None = None  # allocated on the first rows (shape and dtype from them)
        self.buffered = 0
        self.rows = 0
        self.written: list[dict[str, Any]] = []

    def add(self, rows: np.ndarray) -> None:
        if self.buffer is None:
            # np.empty only reserves: pages are touched as rows arrive, so a tiny dataset stays tiny.
            self.buffer = np.empty((self.shard_size, *rows.shape[1:]), dtype=rows.dtype)
        while len(rows):
            take = min(len(rows), self.shard_size - self.buffered)
            self.buffer[self.buffered:self.buffered + take] = rows[:take]
            self.buffered += take
            rows = rows[take:]
            if self.buffered == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        path = self.out / f"{self.prefix}-{len(self.written):05d}.npy"
        np.save(path, self.buffer[:self.buffered])
        self.written.append({"file": path.name, "rows": self.buffered, "sha256": storage.sha256_file(path)})
        self.rows += self.buffered
        self.buffered = 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self.buffer = None
        return self.written


class DecodePool:
    """Runs `decode_chunk` in worker processes, or inline while a source is too small to pay for them.

    Workers start on `start()`, or once PARALLEL_MIN_RECORDS rows have gone through inline (for
    streams of unknown length): a tiny dataset never pays for process start-up."""

    def __init__(self, workers: int, start: bool = False):
        self.workers = workers
        self.seen = 0
        self.executor: ProcessPoolExecutor | None = None
        if start:
            self.start()

    def start(self) -> None:
        if self.executor is not None or self.workers <= 1:
            return
        # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
        self.executor = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        for _ in range(self.workers):  # start every worker now (each submit starts at most one)
            self.executor.submit(warm_up)

    def submit(self, records: list[Record], spec: ImageSpec) -> Future:
        self.seen += len(records)
        if self.seen > PARALLEL_MIN_RECORDS:
            self.start()
        if self.executor is not None:
            return self.executor.submit(decode_chunk, records, spec)
        done: Future = Future()
        done.set_result(decode_chunk(records, spec))
        return done

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _combined_hash(shards: list[dict[str, Any]]) -> str:
    return hashlib.sha256("".join(s["file"] + s["sha256"] for s in shards).encode()).hexdigest()

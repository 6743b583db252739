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
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from ganpipe import storage
from ganpipe.data.decode import CHANNEL_SAMPLE, OTHER_SIZE, ImageSpec, Record, detect_channels, detect_size
from ganpipe.data.labels import LABEL_NAMES, Labels, numeric
from ganpipe.data.pool import PARALLEL_MIN_RECORDS, DecodePool, available_cpus, decode_tasks
from ganpipe.data.prepared import (
    NativeShardWriter,
    PairedShardWriter,
    RunningStats,
    ShardWriter,
    combined_hash,
)
from ganpipe.data.records import as_record, fetch_remote
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
PARALLEL_MIN_BYTES = 1 << 20  # image sources this large start their workers before anything is read


class MixedSizes(UserError):
    """Images kept at their own size (data.resolution: null) must be square and of one size; this
    one is not. `detail` names the source, the row and the sizes, so that a caller that chose the
    native size under another setting (`ganpipe evaluate`'s eval.resolution) can name that one."""

    def __init__(self, description: str, row: int, width: int, height: int, first: int | None):
        why = "not square" if first is None else f"the first images are {first}x{first}"
        self.detail = f"{description}: row {row} is {width}x{height} ({why})"
        super().__init__(f"data.resolution: null (each image's own size) needs square images of one size: "
                         f"{self.detail}; set data.resolution")


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
    storage.require_folder(cache_root, "data.cache")
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
    params = {f: getattr(cfg, f) for f in fields}
    if cfg.max_per_class is not None:  # only when set: data prepared before the key keeps its fingerprint
        params["max_per_class"] = cfg.max_per_class
    if cfg.paired:  # likewise: unpaired data keeps its fingerprint
        params.update(lr_column=cfg.lr_column, hr_column=cfg.hr_column, pair_scale=cfg.pair_scale)
    return params


def prepared_fingerprint(input_fingerprint: str, params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(
        {"format": PREPARED_FORMAT, "input": input_fingerprint, "params": params}, sort_keys=True
    ).encode()).hexdigest()[:20]


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
        self.per_class: dict[int, int] = {}  # provisional label id -> rows kept so far (data.max_per_class)

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
        if labels is None and self.cfg.max_per_class is not None:
            raise self._fail("data.max_per_class: the data has no label column (set data.label_column)")
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
                     "content_sha256": combined_hash(self.shards)})
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
        if self.cfg.max_per_class is not None:
            self._cap_per_class(ids, keep)
        return ids

    def _cap_per_class(self, ids: np.ndarray, keep: np.ndarray) -> None:
        """data.max_per_class: clear `keep` for the rows of a class beyond its first max_per_class,
        in source order, so the subset is the same on every ingest. Capped rows are not bad records."""
        cap = self.cfg.max_per_class
        for i in np.flatnonzero(keep):
            label_id = int(ids[i])
            kept = self.per_class.get(label_id, 0)
            keep[i] = kept < cap
            self.per_class[label_id] = min(kept + 1, cap)

    def _run_images(self, columns: dict[str, Any], label_column: str | None, labels: Labels | None
                    ) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.paired and not cfg.pair_scale:
            raise ValueError("paired data is checked against model.scale: prepare it from a whole Config")
        image_column = self._require(cfg.hr_column, columns, "data.hr_column") if cfg.paired \
            else self._image_column(columns)
        lr_column = self._require(cfg.lr_column, columns, "data.lr_column") if cfg.paired else None
        wanted = [image_column] + ([lr_column] if lr_column else []) + ([label_column] if label_column else [])
        writer = PairedShardWriter(self.out, cfg.shard_size) if cfg.paired else \
            NativeShardWriter(self.out, cfg.shard_size) if cfg.resize == "native" else \
            ShardWriter(self.out, "images", cfg.shard_size)
        label_writer = ShardWriter(self.out, "labels", self.cfg.shard_size) if labels else None
        spec: ImageSpec | None = None
        in_flight: deque[tuple[Future, list[int], np.ndarray]] = deque()

        def collect() -> None:
            future, rows, label_ids = in_flight.popleft()
            images, bad = future.result()
            good = np.ones(len(rows), dtype=bool)
            for position, reason in bad:
                if reason.startswith(OTHER_SIZE) and spec is not None:  # not a bad record: a setting's limit
                    width, height = reason.removeprefix(OTHER_SIZE).split("x")
                    raise MixedSizes(self.description, rows[position], int(width), int(height), spec.resolution)
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
            records = self._records(table.column(image_column))
            if spec is None:
                spec = self._image_spec(records, first_row)
            # paired data: each task decodes (HR, LR) pairs, sized by their HR images
            tasks = list(zip(records, self._records(table.column(lr_column)), strict=True)) if lr_column else records
            kept = np.flatnonzero(keep)
            for part in decode_tasks(kept, records, spec):
                in_flight.append((self.pool.submit([tasks[i] for i in part], spec),
                                  (first_row + part).tolist(), label_ids[part]))
                while len(in_flight) > 2 * max(self.pool.workers, 1):
                    collect()
        while in_flight:
            collect()
        self.shards += writer.close()
        if label_writer is not None:
            self.shards += label_writer.close()
        self.rows_in_shards = writer.rows
        return {"kind": "image", "resolution": spec.resolution if spec else self.cfg.resolution,
                "resize": self.cfg.resize, "paired": cfg.paired, "lr_column": lr_column,
                "channels": spec.channels if spec else self.cfg.channels, "image_column": image_column}

    def _image_spec(self, records: list[Record], first_row: int) -> ImageSpec:
        """Channels and size from data.channels / data.resolution, or from the first images. A
        native size (data.resolution: null) is the first decodable image's."""
        channels = self.cfg.channels or detect_channels(records)
        if self.cfg.resolution is not None:
            return ImageSpec(self.cfg.resolution, channels, self.cfg.resize, pair_scale=self.cfg.pair_scale or 0)
        found = detect_size(records)
        if found is None:
            raise self._fail("data.resolution: null takes the size of the first images, and none of the first "
                             f"{len(records)} rows decodes; set data.resolution")
        position, width, height = found
        if width != height:
            raise MixedSizes(self.description, first_row + position, width, height, None)
        return ImageSpec(width, channels, self.cfg.resize, native=True)

    def _records(self, column: Any) -> list[Record]:
        """A column's image values as records, remote files fetched (ganpipe.data.records)."""
        return fetch_remote([as_record(value, self.root) for value in column.to_pylist()], self.endpoint_url)

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
                matrix[:, j], problems = numeric(table.column(column))
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

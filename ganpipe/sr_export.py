"""Bulk super-resolution: every image of a dataset through a super-resolution generator, into a
sharded Hugging Face dataset (`ganpipe export --model SR_MODEL --input SOURCE --out OUT`, and
the pipeline's export stage for srgan configs).

The input is read as ingest reads a `data.source` (ganpipe.data.sources: hub ids, local parquet,
image folders, save_to_disk folders, S3), in Arrow batches that are never decoded by `datasets`;
each image is decoded by ganpipe.data.decode and super-resolved whole or in overlapping tiles
(ganpipe.networks.upscale, as the registered pyfunc does). Output row i is input row i:
`image` (the super-resolved PNG), `source_index` (i) and the input's other columns, unchanged.

Shard k holds input rows k*shard_size.. (ganpipe.shards: ownership marker, lock, scratch
shards committed whole, records, manifest last), so a killed export, run again, writes only the
shards it had not committed and ends with exactly the rows of an uninterrupted one: a row is a
function of the input row and the weights alone. One process; the main thread super-resolves
while a writer thread encodes PNGs and writes the previous batch.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganpipe import runs, storage
from ganpipe.config import DataConfig, ExportConfig
from ganpipe.data import open_prepared
from ganpipe.data.decode import open_image
from ganpipe.data.pairs import evaluation_pair, holdout_split
from ganpipe.data.sources import datasets_without_torch, open_dataset, resolve_source
from ganpipe.errors import UserError, shorten, show
from ganpipe.export import export_progress_line, weights_sha256
from ganpipe.generators import LoadedGenerator, load_generator
from ganpipe.networks.upscale import DEFAULT_TILE, image_array, super_resolve_image
from ganpipe.progress import Progress
from ganpipe.shards import (
    PNG_LEVEL,
    SCRATCH_PREFIX,
    ShardLayout,
    check_ownership,
    dataset_card,
    encode_png,
    finish_dataset,
    image_column,
    own_output,
    scratch_dir,
)

FORMAT_VERSION = 1
BATCH_ROWS = 8  # images read, super-resolved and written at a time: memory is a few of them
MAX_PENDING_BATCHES = 2
INDEX_COLUMN = "source_index"
# One image of a batch: a function giving its uint8 H x W x K pixels (raising on a bad record).
Loader = Callable[[], np.ndarray]


class SourceInput:
    """Rows of any data.source, in batches: (their source indices, an image loader each, the
    other columns as Arrow)."""

    def __init__(self, uri: str, image_column_name: str | None, endpoint_url: str | None):
        import datasets

        self.endpoint_url = endpoint_url
        self.source = resolve_source(DataConfig(source=uri, resize="native", resolution=None), endpoint_url)
        self.description, self.fingerprint = self.source.description, self.source.fingerprint
        with datasets_without_torch():
            self.dataset = open_dataset(self.source, DataConfig(source=uri, resize="native", resolution=None),
                                        endpoint_url)
        first = next(self.dataset.with_format("arrow").iter(batch_size=1), None)
        if first is None:
            raise UserError(f"--input {self.description}: the dataset is empty (no rows)")
        features = dict(self.dataset.features or datasets.Features.from_arrow_schema(first.schema))
        images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        self.column = image_column_name or (images[0] if images else None)
        if self.column is None or self.column not in features:
            raise UserError(f"--image-column (export.image_column): {show(self.column or 'no image column')} is not "
                            f"an image column of {self.description} (columns: {', '.join(features)})")
        self.others = {name: feature for name, feature in features.items() if name != self.column}
        for name in (INDEX_COLUMN, "image"):
            if name in self.others:
                raise UserError(f"--input {self.description}: has a column {name!r} besides its image column "
                                f"{self.column!r}; the export writes its own {name!r}")
        self.num_rows = int(getattr(self.dataset, "num_rows", None) or self._count())

    def _count(self) -> int:
        """Rows of a streamed source: one pass over its image column, nothing decoded."""
        stream = self.dataset.select_columns([self.column]).with_format("arrow")
        return sum(table.num_rows for table in stream.iter(batch_size=512))

    def chunks(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, list[Loader], Any]]:
        rows = self.dataset.skip(start).take(stop - start).with_format("arrow")
        first = start
        for table in rows.iter(batch_size=BATCH_ROWS):
            values = table.column(self.column).to_pylist()
            yield (np.arange(first, first + table.num_rows, dtype=np.int64), [self._loader(v) for v in values],
                   table.drop_columns([self.column]))
            first += table.num_rows

    def _loader(self, value: Any) -> Loader:
        def load() -> np.ndarray:
            data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else \
                (bytes(value), None) if isinstance(value, (bytes, bytearray, memoryview)) else (None, value)
            if data is None and isinstance(path, str) and "://" not in path and not os.path.isabs(path) \
                    and self.source.root:  # relative to the table's folder, as ingest reads it
                path = storage.join(self.source.root, path)
            if data is None and isinstance(path, str) and "://" in path:
                fs, key = storage.filesystem(path, self.endpoint_url)
                data = fs.cat_file(key)
            with open_image(data, path if data is None else None) as image:
                return image_array(image)
        return load


class HeldOutInput:
    """A super-resolution run's held-out images, as its evaluation sees them: the low-resolution
    input made from each (data.degradation), no other columns. `source_index` is the image's row
    in the run's prepared data."""

    def __init__(self, run_dir: Path, endpoint_url: str | None):
        cfg = runs.load_run_config(run_dir)
        self.data = open_prepared(runs.read_info(run_dir)["data"]["location"], endpoint_url)
        self.indices = holdout_split(self.data.num_records, cfg.data.effective_holdout_fraction)[1]
        self.scale, self.degradation = cfg.model.scale, cfg.data.degradation
        self.description, self.fingerprint = f"the held-out images of {run_dir}", self.data.fingerprint
        self.num_rows, self.others = len(self.indices), {}

    def chunks(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, list[Loader], Any]]:
        import pyarrow as pa

        for first in range(start, stop, BATCH_ROWS):
            part = self.indices[first:min(stop, first + BATCH_ROWS)].astype(np.int64)
            loaders = [lambda i=int(i): evaluation_pair(self.data, i, self.scale, self.degradation)[1] for i in part]
            yield part, loaders, pa.table({})


def features_of(others: dict[str, Any]) -> Any:
    import datasets

    return datasets.Features({"image": datasets.Image(), INDEX_COLUMN: datasets.Value("int64"), **others})


def export_super_resolved(model: str, settings: ExportConfig, endpoint_url: str | None = None,
                          progress: bool = True, wait: bool = False, held_out_of: Path | None = None
                          ) -> dict[str, Any]:
    """Super-resolve every image of `settings.input` (else the held-out images of the run
    `held_out_of`) with MODEL into `settings.out`; returns the contract's result."""
    if settings.num_images:
        raise UserError("--num-images (export.num_images): a super-resolution export writes one row per image of "
                        "--input; leave --num-images out")
    if not settings.out:
        raise UserError("--out (export.out): say where to write the dataset")
    if settings.format != "parquet":
        raise UserError("--format (export.format): super-resolution exports are written as parquet shards")
    if settings.num_processes != 1:
        raise UserError("--num-processes (export.num_processes): super-resolution exports run in one process")
    out = settings.out.rstrip("/")
    check_ownership(out, endpoint_url)  # before the model loads: fail in a second
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_generator(model, device)
    if not loaded.spec.image_to_image:
        raise UserError(f"--input: {model} is a {loaded.spec.family} generator, which samples from seeds; --input "
                        "takes a super-resolution model (model.family srgan); use --num-images for this one")
    if settings.input:
        rows: SourceInput | HeldOutInput = SourceInput(settings.input, settings.image_column, endpoint_url)
    elif held_out_of is not None:
        rows = HeldOutInput(held_out_of, endpoint_url)
    else:
        raise UserError("--input (export.input): say which dataset to super-resolve")
    layout = ShardLayout(out, rows.num_rows, settings.shard_size, "parquet")
    features = features_of(rows.others)
    identity = {"format_version": FORMAT_VERSION, "kind": "super-resolution", "model_uri": loaded.source.get("model_uri"),
                "weights_sha256": weights_sha256(loaded), "input": settings.input or rows.description,
                "input_fingerprint": rows.fingerprint, "num_images": rows.num_rows, "shard_size": layout.shard_size,
                "format": layout.fmt, "tile": DEFAULT_TILE}
    with own_output(out, identity, endpoint_url, "ganpipe export", wait=wait):
        pending = layout.pending(endpoint_url)
        todo = sum(layout.shard_rows(k)[1] - layout.shard_rows(k)[0] for k in pending)
        meter = Progress(todo, "export", "img", export_progress_line, enabled=progress, every=2.0)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="export-writer") as writer:
                for k in pending:
                    write_shard(layout, k, rows, loaded, features, writer, device, endpoint_url, meter.advance)
        finally:
            meter.close()
        records = layout.records(endpoint_url)
        manifest = {**identity, "model": {k: loaded.source.get(k) for k in ("name", "version", "run_id", "run_dir")},
                    "spec": loaded.spec.to_json(), "num_rows": sum(r["rows"] for r in records),
                    "num_shards": layout.num_shards, "shards": records, "columns": list(features),
                    "created_at": time.time(), "generated_on": device}
        manifest_uri = finish_dataset(out, manifest, card(layout, manifest), endpoint_url)
    return {"out": out, "num_images": manifest["num_rows"], "num_shards": layout.num_shards,
            "manifest": manifest_uri, "shards_written": len(pending), "input": identity["input"]}


def write_shard(layout: ShardLayout, k: int, rows: SourceInput | HeldOutInput, loaded: LoadedGenerator,
                features: Any, writer: ThreadPoolExecutor, device: str, endpoint_url: str | None,
                report: Callable[[int], None]) -> None:
    """Input rows of shard k, super-resolved, committed whole and recorded."""
    start, stop = layout.shard_rows(k)
    with tempfile.TemporaryDirectory(dir=scratch_dir(layout.out), prefix=SCRATCH_PREFIX) as tmp:
        shard = layout.open_shard(Path(tmp), features)
        pending: deque[Future] = deque()
        for indices, loaders, others in rows.chunks(start, stop):
            images = []
            for index, load in zip(indices, loaders, strict=True):
                try:
                    images.append(super_resolve_image(loaded.generator, loaded.spec, load(), DEFAULT_TILE, device))
                except Exception as exc:  # noqa: BLE001 - any failure of one image is that row's, named
                    raise UserError(f"--input {rows.description}: row {index}: cannot super-resolve "
                                    f"this image ({type(exc).__name__}: {shorten(str(exc), 300)})") from None
            pending.append(writer.submit(write_rows, shard, features, images, indices, others))
            while len(pending) > MAX_PENDING_BATCHES:
                pending.popleft().result()
            report(len(images))
        while pending:
            pending.popleft().result()
        checksum = shard.commit(storage.join(layout.out, layout.shard_name(k)), endpoint_url)
    layout.write_record(k, {"file": layout.shard_name(k), "rows": stop - start, "first_index": start,
                            "sha256": checksum}, endpoint_url)


def write_rows(shard: Any, features: Any, images: list[np.ndarray], indices: np.ndarray, others: Any) -> None:
    import pyarrow as pa

    columns = {"image": image_column([encode_png(image, PNG_LEVEL["parquet"]) for image in images]),
               INDEX_COLUMN: pa.array(indices, pa.int64())}
    columns.update({name: others.column(name) for name in others.column_names})
    shard.write(pa.table(columns).cast(features.arrow_schema))


def card(layout: ShardLayout, manifest: dict[str, Any]) -> str:
    return dataset_card(layout, ["super-resolution", "ganpipe"], f"Super-resolved by {manifest['model_uri']}", f"""\
{manifest['num_rows']} images of {manifest['input']} super-resolved x{manifest['spec']['scale']} by ganpipe
with model `{manifest['model_uri']}`.

Columns: {', '.join(manifest['columns'])}. Row `source_index` is row `source_index` of the input, its
other columns unchanged; `image` has the input's channels (greyscale stays greyscale, alpha is
upscaled bicubically).

Load with `datasets.load_dataset("parquet", data_files="{layout.data_files}")`. See manifest.json
for per-shard row counts and checksums.
""")

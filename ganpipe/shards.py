"""Resumable Hugging Face datasets, written shard by shard: what `ganpipe export` and
`ganpipe augment` share.

Layout (parquet):      out/data/train-00000-of-00004.parquet, ...
Layout (imagefolder):  out/train/00000/<index>.png ... + out/train/00000/metadata.parquet, ...
Both:                  out/manifest.json, out/README.md (dataset card), out/.shards/NNNNN.json,
                       out/.ganpipe-export.json (which dataset this location holds),
                       out/.ganpipe.lock (who is writing it now: ganpipe.locks)

An output location is ganpipe's only when it is missing, empty, or holds the marker
.ganpipe-export.json; a folder with anything else in it is the user's and is refused untouched.

Each shard is built in a local scratch place and committed whole (a rename locally; complete
uploads on S3, the imagefolder's metadata last), then recorded in .shards/; a rerun skips recorded
shards. The dataset card and manifest.json are written last: a manifest means every shard is there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ganpipe import locks, storage
from ganpipe.errors import UserError

MARKER = ".ganpipe-export.json"  # the identity of the dataset an output location holds
# Shards are built in folders named so (beside a local output); a name nobody else uses, so that
# cleaning up after a killed run removes only what ganpipe created.
SCRATCH_PREFIX = ".ganpipe-scratch-"
FOREIGN_SHOWN = 3  # names of foreign files an error message lists
# Parquet pages are zstd-compressed, which squeezes raw pixels about as well as per-image deflate
# at a fraction of the CPU; files in an image folder stand alone, so they get deflate level 1.
PNG_LEVEL = {"parquet": 0, "imagefolder": 1}

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


# --- columns -----------------------------------------------------------------------------------

def dataset_features(values: dict[str, Any], classes: list[str] | None,
                     provenance: dict[str, Any] | None = None) -> Any:
    """The HF features of a ganpipe dataset, in column order: the value columns (`image`, or a
    vector's columns), `label` as a ClassLabel when there are classes, any provenance columns,
    then `seed` and `index`, which make each synthetic row reproducible."""
    import datasets

    columns = dict(values)
    if classes is not None:
        columns["label"] = datasets.ClassLabel(names=classes)
    columns.update(provenance or {})
    columns["seed"] = datasets.Value("int64")
    columns["index"] = datasets.Value("int64")
    return datasets.Features(columns)


def image_column(encoded: list[bytes]) -> Any:
    """The arrow form of a `datasets.Image()` column: struct<bytes, path>."""
    import pyarrow as pa

    return pa.StructArray.from_arrays([pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())],
                                      ["bytes", "path"])


# --- shards: written locally, committed whole ---------------------------------------------------

class ParquetShard:
    """A shard streamed into a local parquet file, one row group per batch; committed whole."""

    def __init__(self, local: Path, features: Any):
        import pyarrow.parquet as pq

        self.local = local
        self.writer = pq.ParquetWriter(local, features.arrow_schema, compression="zstd")

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

    def __init__(self, folder: Path, features: Any):
        self.folder, self.features = folder, features
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
                                      **{k: v for k, v in self.features.items() if k != "image"}})
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


# --- the layout: shard names, rows and records ----------------------------------------------------

@dataclass(frozen=True)
class ShardLayout:
    """`num_rows` rows in shards of `shard_size` at `out`, as parquet files or image folders."""

    out: str
    num_rows: int
    shard_size: int
    fmt: str  # parquet | imagefolder

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_rows // self.shard_size))

    @property
    def data_files(self) -> str:
        """The glob that `datasets` (and the dataset card) reads the rows from."""
        return "data/train-*.parquet" if self.fmt == "parquet" else "train/**"

    def shard_rows(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.num_rows, (k + 1) * self.shard_size)

    def shard_name(self, k: int) -> str:
        if self.fmt == "parquet":
            return f"data/train-{k:05d}-of-{self.num_shards:05d}.parquet"
        return f"train/{k:05d}"

    def committed_file(self, k: int) -> str:
        """What exists only once shard k is committed."""
        return self.shard_name(k) + ("/metadata.parquet" if self.fmt == "imagefolder" else "")

    def open_shard(self, scratch: Path, features: Any) -> ParquetShard | ImageFolderShard:
        """A shard being built in the local folder `scratch` (see `scratch_dir`)."""
        if self.fmt == "parquet":
            return ParquetShard(scratch / "shard.parquet", features)
        return ImageFolderShard(scratch / "shard", features)

    def record_uri(self, k: int) -> str:
        return storage.join(self.out, ".shards", f"{k:05d}.json")

    def write_record(self, k: int, record: dict[str, Any], endpoint_url: str | None) -> None:
        """Shard k is committed: `record` holds at least file, rows, first_index and sha256."""
        storage.write_json_atomic(self.record_uri(k), record, endpoint_url)

    def finished(self, k: int, endpoint_url: str | None) -> dict[str, Any] | None:
        """The committed shard's record, or None when it must be (re)written."""
        uri = self.record_uri(k)
        if not storage.exists(uri, endpoint_url):
            return None
        record = storage.read_json(uri, endpoint_url)
        if record.get("first_index") != self.shard_rows(k)[0] or \
                not storage.exists(storage.join(self.out, self.committed_file(k)), endpoint_url):
            return None
        return record

    def pending(self, endpoint_url: str | None) -> list[int]:
        return [k for k in range(self.num_shards) if self.finished(k, endpoint_url) is None]

    def records(self, endpoint_url: str | None) -> list[dict[str, Any]]:
        """Every shard's record, in order; an unwritten shard is an error."""
        records = []
        for k in range(self.num_shards):
            record = self.finished(k, endpoint_url)
            if record is None:
                raise RuntimeError(f"shard {k} of {self.out} was not written (see the errors above)")
            records.append(record)
        return records


# --- the output location ----------------------------------------------------------------------------

def check_ownership(out: str, endpoint_url: str | None, option: str = "--out") -> None:
    """Refuse (UserError, nothing touched) an output location that is not ganpipe's to write: a
    file, or a folder holding anything but a marked dataset (or a lock left by an export killed
    before it wrote its marker)."""
    storage.require_folder(out, option)  # local: the path, or a folder above it, is a file
    if storage.is_file(out, endpoint_url):  # an object at an S3 key
        raise UserError(f"{option}: {out} is a file, not a folder")
    names = storage.list_names(out, endpoint_url)
    if MARKER in names:
        return
    foreign = sorted(name for name in names if name != locks.LOCK_FILE)
    if foreign:
        more = len(foreign) - FOREIGN_SHOWN
        shown = ", ".join(foreign[:FOREIGN_SHOWN]) + (f" and {more} more" if more > 0 else "")
        raise UserError(f"{option} {out}: holds files ganpipe did not write: {shown}; "
                        "choose an empty or new folder")


def claim_output(out: str, identity: dict[str, Any], endpoint_url: str | None, option: str = "--out") -> None:
    """An output location holds one dataset: rerunning the same command resumes it; a different
    one (other model, seed, size) is refused rather than mixed in."""
    marker = storage.join(out, MARKER)
    if storage.exists(marker, endpoint_url):
        existing = storage.read_json(marker, endpoint_url)
        if existing != identity:
            changed = sorted(k for k in set(identity) | set(existing) if existing.get(k) != identity.get(k))
            raise UserError(f"{option} {out}: holds a different dataset (differs in {', '.join(changed)}); "
                            f"choose another {option}")
        return
    storage.write_json_atomic(marker, identity, endpoint_url)


@contextmanager
def own_output(out: str, identity: dict[str, Any], endpoint_url: str | None, command: str, *,
               wait: bool = False, option: str = "--out") -> Iterator[int | None]:
    """Make `out` this dataset's for the block: check it is ganpipe's to write, lock it (local
    paths; the lock's descriptor is yielded for child processes to inherit, None on S3, which
    has no locks), claim it, and clear half-built shards of a killed run. Only ours are removed:
    scratch names, in a folder marked as ours, while we hold its lock (no live writer has any)."""
    check_ownership(out, endpoint_url, option)
    if storage.is_remote(out):
        claim_output(out, identity, endpoint_url, option)
        yield None
        return
    folder = storage.local_path(out)
    with locks.hold_folder(folder, command, wait=wait) as lock:
        check_ownership(out, endpoint_url, option)  # again: it may have changed while we waited
        claim_output(out, identity, endpoint_url, option)
        for path in folder.glob(f"{SCRATCH_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
        yield lock


def scratch_dir(out: str) -> str | None:
    """Build shards beside a local output (so committing is a rename); in a temp dir for S3."""
    if storage.is_remote(out):
        return None
    path = storage.local_path(out)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# --- finishing: the dataset card, then the manifest ----------------------------------------------

def dataset_card(layout: ShardLayout, tags: list[str], title: str, body: str) -> str:
    """README.md in the hub's format: front matter naming the data files, then the description."""
    tag_lines = "".join(f"- {tag}\n" for tag in tags)
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "{layout.data_files}"
tags:
{tag_lines}---
# {title}

{body}"""


def finish_dataset(out: str, manifest: dict[str, Any], card: str, endpoint_url: str | None) -> str:
    """Write the dataset card, then manifest.json (last: a manifest means a finished dataset).
    Returns the manifest's URI."""
    storage.write_bytes_atomic(storage.join(out, "README.md"), card.encode(), endpoint_url)
    manifest_uri = storage.join(out, "manifest.json")
    storage.write_json_atomic(manifest_uri, manifest, endpoint_url)
    return manifest_uri

"""The prepared-data format, written and read in one place: ingest writes shards (`PREFIX-NNNNN.npy`,
each listed in meta.json with its rows and sha256) through ShardWriter, with RunningStats for a
vector dataset's mean and std; training reads them back as memory-mapped shards, gathered by index
(in data units: ganpipe.networks.space maps them to network space).

Images kept at their own sizes (`meta["resize"] == "native"`, super-resolution) cannot share one
array shape: NativeShardWriter writes each shard as `pixels-NNNNN.npy` (every image's uint8 pixels
one after another, flat) and `index-NNNNN.npy` (per image: offset in that shard's pixels, height,
width), and `PreparedData.image` reads one image back as a view of the memory-mapped pixels.
Paired data (an LR column beside the HR one, meta["paired"]) writes the LR images the same way,
as `lr_pixels-NNNNN.npy` and `lr_index-NNNNN.npy`, row for row (`PreparedData.lr_image`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ganpipe import storage
from ganpipe.errors import UserError

LR_PREFIX = "lr_"  # shard names of paired data's low-resolution images


class PreparedData:
    """A prepared dataset directory (see ganpipe.data.ingest). Shards are memory-mapped, so a
    dataset larger than memory trains fine; `gather` reads only the rows asked for.

    Thread safety: after `open_shards()`, reads may come from any thread (training gathers the
    next batch in a background thread, ganpipe.batches). The shards are read-only memory maps:
    a read is a copy out of mapped pages, with no file position or other shared state, and
    nothing writes to them. `open_shards()` is what must happen once, before threads share
    the object: the shard lists are created lazily, and two threads creating them at once would
    each map the files."""

    def __init__(self, root: Path):
        self.root = root
        meta_path = root / "meta.json"
        if not meta_path.exists():
            raise UserError(f"{root}: not a prepared dataset (no meta.json); run `ganpipe ingest` first")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def num_records(self) -> int:
        return self.meta["num_records"]

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes or [])

    @property
    def native(self) -> bool:
        """Images at their own sizes (read one by one with `image`), not fixed-size rows."""
        return self.meta.get("resize") == "native"

    @property
    def paired(self) -> bool:
        """Native images with their own low-resolution images (data.lr_column), read with `lr_image`."""
        return bool(self.meta.get("paired"))

    @cached_property
    def _native_index(self) -> list[tuple[np.ndarray, np.ndarray]]:
        pixels, index = self._shards("pixels"), self._shards("index")
        return list(zip(pixels, index, strict=True))

    @cached_property
    def _lr_index(self) -> list[tuple[np.ndarray, np.ndarray]]:
        pixels, index = self._shards(f"{LR_PREFIX}pixels"), self._shards(f"{LR_PREFIX}index")
        return list(zip(pixels, index, strict=True))

    @cached_property
    def _native_offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(index) for _, index in self._native_index])

    def image(self, i: int) -> np.ndarray:
        """Image `i` of native data: uint8 H x W x C, a read-only view of the mapped shard."""
        return self._native_image(self._native_index, i)

    def lr_image(self, i: int) -> np.ndarray:
        """The low-resolution image paired with image `i` (paired data), as `image`."""
        return self._native_image(self._lr_index, i)

    def _native_image(self, shards: list[tuple[np.ndarray, np.ndarray]], i: int) -> np.ndarray:
        # HR and LR shards hold the same rows (both writers flush together): one offset table.
        shard = int(np.searchsorted(self._native_offsets, i, side="right") - 1)
        pixels, index = shards[shard]
        offset, height, width = (int(v) for v in index[i - self._native_offsets[shard]])
        channels = self.meta["channels"]
        return pixels[offset:offset + height * width * channels].reshape(height, width, channels)

    def image_sizes(self) -> np.ndarray:
        """(height, width) of every native image, int64 N x 2."""
        return np.concatenate([np.asarray(index[:, 1:]) for _, index in self._native_index])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images, (D,) for vectors: what the networks see."""
        if self.kind == "image":
            r = self.meta["resolution"]
            return (self.meta["channels"], r, r)
        return (len(self.meta["columns"]),)

    def _shards(self, prefix: str) -> list[np.ndarray]:
        files = [s["file"] for s in self.meta["shards"] if s["file"].startswith(prefix + "-")]
        return [np.load(self.root / f, mmap_mode="r") for f in files]

    @cached_property
    def _data_shards(self) -> list[np.ndarray]:
        return self._shards("images" if self.kind == "image" else "vectors")

    @cached_property
    def _label_shards(self) -> list[np.ndarray]:
        return self._shards("labels")

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(s) for s in self._data_shards])

    def open_shards(self) -> None:
        """Map every shard now (see the class's note on threads)."""
        _ = self._data_shards, self._label_shards, self._offsets

    def _gather(self, shards: list[np.ndarray], indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if out is None:
            out = np.empty((len(indices), *shards[0].shape[1:]), dtype=shards[0].dtype)
        if len(shards) == 1:
            # Read in file order (sequential pages of the memory map), then place each row where asked.
            order = np.argsort(indices, kind="stable")
            out[order] = shards[0][indices[order]]
            return out
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = shards[shard][indices[mask] - self._offsets[shard]]
        return out

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw rows (uint8 NHWC images or float32 vectors) and labels (or None) at `indices`;
        the rows are written into `out` when given (a pinned buffer of `row_shape`, `dtype`)."""
        if self.native:
            raise ValueError("images of native sizes are read one by one (PreparedData.image), not gathered")
        labels = self._gather(self._label_shards, indices) if self._label_shards else None
        return self._gather(self._data_shards, indices, out), labels

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One stored row's shape: (H, W, C) for images, (D,) for vectors."""
        return tuple(self._data_shards[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._data_shards[0].dtype

    @property
    def nbytes(self) -> int:
        """The rows' and labels' size in memory (what a copy of the whole dataset takes)."""
        return sum(s.nbytes for s in self._data_shards) + sum(s.nbytes for s in self._label_shards)

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The whole dataset in record order, at most `rows` rows at a time (bounded memory), as
        (rows, labels or None) arrays that are copies, not views of the memory map."""
        for start in range(0, self.num_records, rows):
            indices = np.arange(start, min(start + rows, self.num_records))
            yield self.gather(indices)

    def load_all(self) -> tuple[np.ndarray, np.ndarray | None]:
        data = np.concatenate([np.asarray(s) for s in self._data_shards])
        labels = np.concatenate([np.asarray(s) for s in self._label_shards]) if self._label_shards else None
        return data, labels

    def all_labels(self) -> np.ndarray | None:
        """Every record's label id, in record order, without reading the images (None: unlabelled)."""
        if not self._label_shards:
            return None
        return np.concatenate([np.asarray(s) for s in self._label_shards]).astype(np.int64)

    @property
    def vector_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.meta["mean"], dtype=np.float32), np.asarray(self.meta["std"], dtype=np.float32)


def open_prepared(location: str, endpoint_url: str | None = None) -> PreparedData:
    """Open prepared data by location; S3 locations are copied once into the local cache,
    each shard checked against its recorded checksum."""
    if not storage.is_remote(location):
        return PreparedData(storage.local_path(location))
    meta = storage.read_json(storage.join(location, "meta.json"), endpoint_url)
    local = storage.ganpipe_home() / "prepared" / meta["fingerprint"]
    if (local / "meta.json").exists():
        return PreparedData(local)
    with storage.atomic_directory(local) as tmp:
        fs, root = storage.filesystem(location, endpoint_url)
        for name in [s["file"] for s in meta["shards"]] + ["report.json"]:
            fs.get_file(f"{root}/{name}", str(tmp / name))
        for shard in meta["shards"]:
            if storage.sha256_file(tmp / shard["file"]) != shard["sha256"]:
                raise UserError(f"{location}/{shard['file']}: checksum mismatch (corrupt prepared data)")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return PreparedData(local)


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


class NativeShardWriter:
    """Writes images of any size as pixel and index shards (see the module's docstring), at most
    `shard_size` images per shard: memory bounded by one shard's pixels. `prefix` comes before
    the shards' names (LR_PREFIX for the LR images of paired data)."""

    def __init__(self, out: Path, shard_size: int, prefix: str = ""):
        self.out, self.shard_size, self.prefix = out, shard_size, prefix
        self.pixels: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.buffered = 0
        self.rows = 0
        self.written: list[dict[str, Any]] = []

    def add(self, decoded: tuple[np.ndarray, np.ndarray]) -> None:
        """One decoded chunk: (flat pixels of its images, their (height, width, channels))."""
        pixels, sizes = decoded
        lengths = sizes.prod(axis=1)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for i in range(len(sizes)):
            self.pixels.append(pixels[starts[i]:starts[i + 1]])
            self.sizes.append(sizes[i, :2])
            self.buffered += 1
            if self.buffered == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        number = len(self.written) // 2
        lengths = np.array([len(p) for p in self.pixels], dtype=np.int64)
        index = np.column_stack([np.concatenate([[0], np.cumsum(lengths)[:-1]]), np.stack(self.sizes)])
        for kind, array in (("pixels", np.concatenate(self.pixels)), ("index", index.astype(np.int64))):
            path = self.out / f"{self.prefix}{kind}-{number:05d}.npy"
            np.save(path, array)
            self.written.append({"file": path.name, "rows": self.buffered, "sha256": storage.sha256_file(path)})
        self.rows += self.buffered
        self.pixels, self.sizes, self.buffered = [], [], 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.written


class PairedShardWriter:
    """(HR, LR) pairs of any sizes: two NativeShardWriters fed row for row, so that their shards
    hold the same rows."""

    def __init__(self, out: Path, shard_size: int):
        self.hr, self.lr = NativeShardWriter(out, shard_size), NativeShardWriter(out, shard_size, LR_PREFIX)

    @property
    def rows(self) -> int:
        return self.hr.rows

    def add(self, decoded: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        self.hr.add(decoded[0])
        self.lr.add(decoded[1])

    def close(self) -> list[dict[str, Any]]:
        return self.hr.close() + self.lr.close()


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


def combined_hash(shards: list[dict[str, Any]]) -> str:
    """meta.json's `content_sha256`: one checksum of the whole prepared content, from the shards' own."""
    return hashlib.sha256("".join(s["file"] + s["sha256"] for s in shards).encode()).hexdigest()

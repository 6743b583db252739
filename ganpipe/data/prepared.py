"""Read prepared data: memory-mapped shards, gathered by index (in data units: ganpipe.networks.space
maps them to network space)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ganpipe import storage
from ganpipe.errors import UserError


class PreparedData:
    """A prepared dataset directory (see ganpipe.data.ingest). Shards are memory-mapped, so a
    dataset larger than memory trains fine; `gather` reads only the rows asked for."""

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

    def _gather(self, shards: list[np.ndarray], indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if len(shards) == 1:
            return np.asarray(shards[0][np.sort(indices)][np.argsort(np.argsort(indices))])
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        out = np.empty((len(indices), *shards[0].shape[1:]), dtype=shards[0].dtype)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = shards[shard][indices[mask] - self._offsets[shard]]
        return out

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw rows (uint8 NHWC images or float32 vectors) and labels (or None) at `indices`."""
        labels = self._gather(self._label_shards, indices) if self._label_shards else None
        return self._gather(self._data_shards, indices), labels

    def load_all(self) -> tuple[np.ndarray, np.ndarray | None]:
        data = np.concatenate([np.asarray(s) for s in self._data_shards])
        labels = np.concatenate([np.asarray(s) for s in self._label_shards]) if self._label_shards else None
        return data, labels

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

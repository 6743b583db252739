"""Open any `data.source` as a Hugging Face dataset, and fingerprint its content cheaply.

Sources (../shared/CONTRACT.md): a hub id (`user/name`), a local `save_to_disk` folder, parquet or
CSV files (a file, a glob or a folder of them), an image folder, `s3://bucket/prefix` holding
parquet files or an image folder, and `builtin:digits` (scikit-learn's digits, written once as a
local Hugging Face dataset). Everything is read through `datasets`; file sources stream, so a
dataset never has to fit in memory.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from ganpipe import storage
from ganpipe.config import DataConfig
from ganpipe.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class OpenedSource:
    dataset: datasets.Dataset | datasets.IterableDataset
    fingerprint: str  # content fingerprint of the input (bytes, or immutable revision)
    description: str  # for error messages: what was opened


def open_source(cfg: DataConfig, endpoint_url: str | None = None) -> OpenedSource:
    source = cfg.source
    if source.startswith("builtin:"):
        from ganpipe.data.digits import builtin_dataset_path

        return _open_local(builtin_dataset_path(source), cfg)
    if source.startswith("s3://"):
        return _open_s3(source, cfg, endpoint_url)
    path = storage.local_path(source)
    if path.exists() or glob.has_magic(source):
        return _open_local(path, cfg)
    if HUB_ID.match(source):
        return _open_hub(source, cfg)
    raise UserError(f"data.source: {source!r} is not an existing path, an s3:// URI or a hub id (user/name)")


def _pick_split(ds: datasets.Dataset | datasets.DatasetDict, cfg: DataConfig) -> datasets.Dataset:
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise UserError(f"data.split: {cfg.split!r} not in {cfg.source} (splits: {', '.join(ds)})")
        return ds[cfg.split]
    return ds


def _open_local(path: Path, cfg: DataConfig) -> OpenedSource:
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        # state.json carries a random per-write id; the data files and schema are the content.
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "state.json")
        ds = _pick_split(datasets.load_from_disk(str(path)), cfg)
        return OpenedSource(ds, _hash_local_files(files, path), f"save_to_disk folder {path}")
    if path.is_dir():
        tables = _files_with(path, TABLE_BUILDERS)
        if tables:
            return _open_tables(tables, _hash_local_files(tables, path), str(path))
        images = _files_with(path, IMAGE_EXTENSIONS)
        if not images:
            raise UserError(f"data.source: {path} holds no parquet, CSV or image files")
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", streaming=True)
        return OpenedSource(ds, _hash_local_files(images, path), f"image folder {path}")
    files = sorted(Path(p) for p in glob.glob(str(path))) if glob.has_magic(str(path)) else [path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(f"data.source: no files match {path}")
    return _open_tables([str(f) for f in files], _hash_local_files(files, None), str(path))


def _open_tables(files: list, fingerprint: str, description: str) -> OpenedSource:
    suffixes = {Path(str(f)).suffix.lower() for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in TABLE_BUILDERS:
        raise UserError(f"data.source: {description}: expected .parquet or .csv files, found {sorted(suffixes)}")
    builder = TABLE_BUILDERS[suffixes.pop()]
    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    return OpenedSource(ds, fingerprint, f"{builder} files {description}")


def _files_with(root: Path, extensions) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _hash_local_files(files: list, root: Path | None) -> str:
    """Hash of every file's name and bytes: any change to the input changes it."""
    digest = hashlib.sha256()
    for f in files:
        f = Path(f)
        digest.update(str(f.relative_to(root) if root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _open_s3(uri: str, cfg: DataConfig, endpoint_url: str | None) -> OpenedSource:
    fs, root = storage.filesystem(uri, endpoint_url)
    try:
        listing = fs.find(root, detail=True)
    except (PermissionError, OSError) as exc:
        raise UserError(f"data.source: cannot list {uri}: {exc}") from None
    # S3 ETags are content hashes: listing them fingerprints the bytes without reading them.
    entries = sorted((k, v.get("ETag") or v.get("etag") or "", v.get("size", 0)) for k, v in listing.items())
    tables = [k for k, _, _ in entries if Path(k).suffix.lower() in TABLE_BUILDERS]
    images = [k for k, _, _ in entries if Path(k).suffix.lower() in IMAGE_EXTENSIONS]
    digest = hashlib.sha256("\n".join(f"{k}\0{e}\0{s}" for k, e, s in entries).encode()).hexdigest()
    options = storage.s3_options(endpoint_url)
    if tables:
        suffix = Path(tables[0]).suffix.lower()
        ds = datasets.load_dataset(TABLE_BUILDERS[suffix], data_files=[f"s3://{k}" for k in tables],
                                   split="train", streaming=True, storage_options=options)
        return OpenedSource(ds, digest, f"parquet files at {uri}")
    if images:
        ds = datasets.load_dataset("imagefolder", data_files=[f"s3://{k}" for k in images],
                                   split="train", streaming=True, storage_options=options)
        return OpenedSource(ds, digest, f"image folder at {uri}")
    raise UserError(f"data.source: {uri} holds no parquet, CSV or image files")


def _open_hub(repo_id: str, cfg: DataConfig) -> OpenedSource:
    try:
        ds = datasets.load_dataset(repo_id, name=cfg.config_name, split=cfg.split, revision=cfg.revision,
                                   streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on)" if offline else ""
        raise UserError(f"data.source: cannot load hub dataset {repo_id!r}{hint}: {exc}") from None
    # A pinned revision is immutable; a branch can move, so the commit it resolves to is the content id.
    sha = _hub_commit(repo_id, cfg.revision)
    fingerprint = hashlib.sha256(f"{repo_id}\0{cfg.config_name}\0{cfg.split}\0{sha}".encode()).hexdigest()
    return OpenedSource(ds, fingerprint, f"hub dataset {repo_id}")


def _hub_commit(repo_id: str, revision: str | None) -> str:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha or (revision or "main")
    except Exception:  # noqa: BLE001 - the commit id is best effort; the load above already succeeded
        return revision or "main"

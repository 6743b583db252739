"""Content fingerprints of data files: the same bytes give the same fingerprint wherever they are read.

Champion comparisons and lineage compare data by fingerprint, so a parquet file read from a local
folder and the same file read from an S3 prefix must agree. The fingerprint is therefore always
computed from the bytes, by one definition for every store:

    sha256 over the files in path order, each as  relative/path NUL bytes NUL

(the definition local sources always had, so prepared data made by earlier versions from local
files keeps its fingerprint). Paths are relative to the source's folder or prefix, so the same data
elsewhere hashes the same; they are ordered part by part, as pathlib orders paths.

Reading every byte of a remote source on every ingest would make a cache hit expensive, so a
remote listing (key, ETag and size of every hashed object) is a cheap key that maps to the content
hash in $GANPIPE_HOME/cache/fingerprints/: a second ingest of an unchanged prefix reads no object.
An object rewritten with other bytes has another ETag, so the listing misses the cache and the
bytes are hashed again. Local files are always hashed: mtime and size cannot tell every rewrite
apart (two writes of the same size within one clock tick leave both equal).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ganpipe import storage

BLOCK = 1 << 20  # bytes hashed at a time: memory does not grow with a file
PREFETCH_BYTES = 64 << 20  # small remote objects are fetched concurrently, this many bytes at a time
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Given the relative paths in hashing order, yields each file's bytes (as blocks), in that order.
Reader = Callable[[list[str]], Iterator[Iterable[bytes]]]


def path_order(relative: str) -> list[str]:
    """Sort key of a relative POSIX path: part by part, as pathlib compares paths (so "a/x"
    comes before "a-b/x", which plain string order would put first)."""
    return relative.split("/")


def content_fingerprint(relatives: Iterable[str], read: Reader) -> str:
    """sha256 over (relative path, bytes) of every file, in path order."""
    ordered = sorted(relatives, key=path_order)
    digest = hashlib.sha256()
    for relative, blocks in zip(ordered, read(ordered), strict=True):
        digest.update(relative.encode() + b"\0")
        for block in blocks:
            digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def local_reader(root: Path) -> Reader:
    """Files under a local folder, each read in blocks."""
    def read(ordered: list[str]) -> Iterator[Iterable[bytes]]:
        for relative in ordered:
            yield _file_blocks(root / relative)
    return read


def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            yield block


def remote_reader(fs: Any, root: str, sizes: dict[str, int]) -> Reader:
    """Objects under a remote prefix (an fsspec filesystem, `root` without its scheme). Small
    objects are fetched together (s3fs fetches a list concurrently: an image folder is thousands
    of small objects, which one at a time would take minutes); large ones are streamed, and so are
    names with glob characters, which a list fetch would expand as patterns."""
    def key(relative: str) -> str:
        return f"{root}/{relative}" if root else relative

    def batched(relative: str) -> bool:
        return sizes[relative] <= PREFETCH_BYTES // 4 and not glob.has_magic(key(relative))

    def read(ordered: list[str]) -> Iterator[Iterable[bytes]]:
        i = 0
        while i < len(ordered):
            if not batched(ordered[i]):
                yield _remote_blocks(fs, key(ordered[i]))
                i += 1
                continue
            batch, total = [], 0
            while i < len(ordered) and batched(ordered[i]) and total < PREFETCH_BYTES:
                batch.append(ordered[i])
                total += sizes[ordered[i]]
                i += 1
            fetched = fs.cat([key(r) for r in batch])
            fetched = fetched if isinstance(fetched, dict) else {key(batch[0]): fetched}
            for relative in batch:
                yield (fetched[key(relative)],)
    return read


def _remote_blocks(fs: Any, key: str) -> Iterator[bytes]:
    with fs.open(key, "rb") as fh:
        while block := fh.read(BLOCK):
            yield block


def cached_fingerprint(cheap_key: dict[str, Any] | None, compute: Callable[[], str]) -> str:
    """The content fingerprint recorded for `cheap_key`, else `compute()`, then recorded. A key of
    None (a listing that cannot vouch for its content, such as objects without ETags) is never
    cached."""
    if cheap_key is None:
        return compute()
    name = hashlib.sha256(json.dumps(cheap_key, sort_keys=True).encode()).hexdigest()
    path = storage.ganpipe_home() / "cache" / "fingerprints" / f"{name}.json"
    try:
        recorded = json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        recorded = None  # absent or damaged: hashing again is always right
    if isinstance(recorded, str) and HEX_DIGEST.match(recorded):
        return recorded
    fingerprint = compute()
    storage.write_json_atomic(str(path), {"fingerprint": fingerprint, "source": cheap_key.get("source"),
                                          "objects": len(cheap_key.get("objects", []))})
    return fingerprint

"""Image values of a table as decode records, (encoded bytes, path): what ingest hands its decode
workers. Workers read local files themselves; remote files are fetched here first, a batch at a
time, since a worker has no network settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ganpipe import network, storage
from ganpipe.data.decode import Record


def as_record(value: Any, root: str) -> Record:
    """An image value (HF Image struct, raw bytes or a path) as (bytes, path); relative paths in
    a table are relative to the source's folder, `root`."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    else:
        return None, None
    if data is None and path and "://" not in path and not os.path.isabs(path) and root:
        path = storage.join(root, path) if storage.is_remote(root) else str(Path(root) / path)
    return data, path


def fetch_remote(records: list[Record], endpoint_url: str | None) -> list[Record]:
    """Remote paths (s3://, hf://) fetched, all of a batch at once (s3fs fetches them
    concurrently). A failed fetch leaves (None, path), which the worker reports as a missing file."""
    remote = [i for i, (data, path) in enumerate(records) if data is None and path and "://" in path]
    if not remote:
        return records
    located = [storage.filesystem(records[i][1], endpoint_url) for i in remote]
    fs = located[0][0]
    fetched = fs.cat([key for _, key in located], on_error="return")
    for value in fetched.values():
        if isinstance(value, Exception):  # a store that does not answer is not a bad record
            network.reraise_if_unreachable(value)
    records = list(records)
    for i, (_, key) in zip(remote, located, strict=True):
        if isinstance(fetched.get(key), bytes):
            records[i] = (fetched[key], records[i][1])
    return records

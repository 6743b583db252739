"""Where things live: GANPIPE_HOME, local paths and s3:// URIs behind one small API.

Every write that others may read is atomic: a local file is written beside its target and renamed
into place; an S3 object is one PUT, which S3 makes visible only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec

from ganpipe import network
from ganpipe.errors import UserError, shorten


def ganpipe_home() -> Path:
    """GANPIPE_HOME (default ./.ganpipe) as an absolute folder, created when missing. A setting
    that names a file, or a folder that cannot be made, is the user's to fix: UserError naming
    the variable."""
    home = Path(os.environ.get("GANPIPE_HOME", ".ganpipe")).expanduser().resolve()
    require_folder(str(home), "GANPIPE_HOME")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"GANPIPE_HOME: cannot create the folder {shorten(str(home))} ({exc.strerror})") from None
    return home


def require_folder(uri: str, what: str) -> None:
    """UserError naming `what` (the setting) when a local `uri` that should be a folder, existing
    or to be made, is a file or lies below one. Remote URIs have no such thing as a file in the way."""
    if is_remote(uri):
        return
    path = local_path(uri).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UserError(f"{what}: {shorten(str(candidate))} is a file, not a folder")
            return


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def s3_options(endpoint_url: str | None = None) -> dict[str, Any]:
    """s3fs options from the standard AWS settings; `endpoint_url` (config) wins over the env.
    Every S3 client gets the network budget's timeouts and retries (ganpipe.network)."""
    import s3fs

    # botocore is the one retry layer: s3fs's own (5 attempts around each of botocore's) would
    # multiply the time a silent endpoint holds a request. Class-wide, as s3fs takes no argument
    # for it, and `datasets` builds its own S3FileSystem from these options.
    s3fs.S3FileSystem.retries = 1
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    # No listings cache: other processes (ranks, export workers, reruns) write to the same prefixes.
    options: dict[str, Any] = {"use_listings_cache": False, "config_kwargs": network.botocore_config()}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    if uri.startswith("s3://"):
        fs = fsspec.filesystem("s3", **s3_options(endpoint_url))
        return fs, uri.removeprefix("s3://")
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return fsspec.filesystem("file"), str(local_path(uri).resolve())


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return fs.exists(path)


def is_file(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return fs.isfile(path)


def list_names(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The names directly inside the folder (or prefix) `uri`, sub-folders with a trailing "/";
    [] when there is no such folder."""
    fs, path = filesystem(uri, endpoint_url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [entry["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if entry["type"] == "directory" else "")
            for entry in entries if entry["name"].rstrip("/") != path.rstrip("/")]


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    return fs.cat_file(path)


def read_json(uri: str, endpoint_url: str | None = None) -> Any:
    return json.loads(read_bytes(uri, endpoint_url))


def write_bytes_atomic(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    if is_remote(uri):
        fs, path = filesystem(uri, endpoint_url)
        fs.pipe_file(path, data)
        return
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(uri: str, obj: Any, endpoint_url: str | None = None) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), endpoint_url)


def upload_file_atomic(local_file: Path, uri: str, endpoint_url: str | None = None) -> None:
    """Put a finished local file at `uri`: a rename locally, one complete upload on S3."""
    if is_remote(uri):
        fs, path = filesystem(uri, endpoint_url)
        fs.put_file(str(local_file), path)
        return
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local_file, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.replace(local_file, target)  # atomic on one filesystem; the source is consumed
        return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Build a directory beside `target` and rename it into place only when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

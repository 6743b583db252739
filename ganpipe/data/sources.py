"""Resolve any `data.source`, fingerprint its content cheaply, and open it as a Hugging Face dataset.

Sources (docs/contract.md): a hub id (`user/name`, or a legacy name without a namespace such as
`mnist`, which the hub maps to its current id), a local `save_to_disk` folder, parquet or
CSV files (a file, a glob or a folder of them), an image folder (labels from subfolder names),
`s3://bucket/prefix` holding parquet files or an image folder, and `builtin:digits`
(scikit-learn's digits, written once as a local `save_to_disk` folder).

Two steps, so that a cache hit never opens the data:
- `resolve_source` lists the data files and fingerprints their content: the sha256 of their bytes,
  the same for the same files locally and on S3 (where an unchanged listing of ETags finds the hash
  of an earlier read: see ganpipe.data.fingerprint), the resolved commit for hub ids (a hub
  dataset's identity is its revision, not its bytes). It never imports `datasets`.
- `open_dataset` opens them through `datasets`: file sources stream, `save_to_disk` folders are
  memory-mapped, so a dataset never has to fit in memory.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ganpipe import network, storage
from ganpipe.data.fingerprint import (
    cached_fingerprint,
    content_fingerprint,
    local_reader,
    path_order,
    remote_reader,
)
from ganpipe.errors import UserError

if TYPE_CHECKING:  # `datasets` takes seconds to import; decode workers and cache hits never need it.
    import datasets

    from ganpipe.config import DataConfig

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json")
HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")  # namespace/name, or a legacy name
DATA_FILE_SUFFIXES = {*IMAGE_EXTENSIONS, *TABLE_BUILDERS, ".arrow", ".json", ".jsonl", ".npy", ".zip", ".tar"}
BATCH_ROWS = 512  # rows per Arrow batch read from a source


@dataclass
class Source:
    """A resolved `data.source`: what it is, which files hold it and a fingerprint of their content."""

    uri: str
    format: str  # save_to_disk | parquet | csv | imagefolder | hub
    fingerprint: str  # changes whenever any input byte (or the hub commit) changes
    description: str  # names the source in error messages
    files: list[str] = field(default_factory=list)  # data files: local paths or s3:// URIs
    root: str = ""  # folder or prefix that relative image paths in a table are resolved against
    num_bytes: int = 0  # size of the data files (0 when unknown: hub)
    dataset: Any = None  # hub sources are opened while resolving them


def resolve_source(cfg: DataConfig, endpoint_url: str | None = None) -> Source:
    source = cfg.source
    if source.startswith("builtin:"):
        from ganpipe.data.digits import builtin_dataset_path

        return _resolve_local(builtin_dataset_path(source), source)
    if source.startswith("s3://"):
        return _resolve_s3(source, cfg, endpoint_url)
    path = storage.local_path(source)
    if path.exists() or glob.has_magic(source):
        return _resolve_local(path, source)
    # A bare name is a hub id (`mnist`), unless it names a data file that is not there: a typo'd path.
    if HUB_ID.match(source) and ("/" in source or PurePosixPath(source).suffix.lower() not in DATA_FILE_SUFFIXES):
        return _resolve_hub(source, cfg)
    raise UserError(f"data.source: {source!r} is not an existing path, an s3:// URI or a hub id (namespace/name, "
                    "or a legacy name such as mnist)")


# --- local files ----------------------------------------------------------------------------------

def _resolve_local(path: Path, uri: str) -> Source:
    if path.is_dir() and any((path / name).exists() for name in SAVE_TO_DISK_MARKERS):
        # state.json carries a random per-write id; the data files and the schema are the content.
        files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "state.json"]
        return Source(uri, "save_to_disk", content_fingerprint(files, local_reader(path)),
                      f"save_to_disk folder {path}", root=str(path), num_bytes=_size(path, files))
    if path.is_dir():
        layout = _layout([p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()], str(path))
        return Source(uri, layout.format, content_fingerprint(layout.hashed, local_reader(path)),
                      _describe(layout.format, str(path)), files=[str(path / f) for f in layout.files],
                      root=str(path), num_bytes=_size(path, layout.files))
    matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True)) if glob.has_magic(str(path)) else [path]
    matched = [f for f in matched if f.is_file()]
    if not matched:
        raise UserError(f"data.source: no files match {path}")
    root = Path(os.path.commonpath([f.parent for f in matched]))
    files = [f.relative_to(root).as_posix() for f in matched]
    builder = _table_builder(files, str(path))
    return Source(uri, builder, content_fingerprint(files, local_reader(root)), _describe(builder, str(path)),
                  files=[str(f) for f in matched], root=str(root), num_bytes=_size(root, files))


@dataclass
class Layout:
    """What a folder or prefix holds: its format, the data files `datasets` reads, and the files
    whose bytes are its content (the fingerprint): a table's image files beside it count too."""

    format: str  # parquet | csv | imagefolder
    files: list[str]  # relative paths, in path order
    hashed: list[str]


def _layout(relatives: list[str], description: str) -> Layout:
    """One rule for local folders and S3 prefixes alike, so that the same files give the same
    source and fingerprint wherever they are. Tables first: a table may name image files kept
    beside it; an image folder's only table is its optional metadata.csv/.jsonl/.parquet.
    Hidden files and folders (a leading dot) are not data."""
    visible = sorted((r for r in relatives if not any(part.startswith(".") for part in r.split("/"))),
                     key=path_order)

    def having(extensions: Collection[str]) -> list[str]:
        return [r for r in visible if PurePosixPath(r).suffix.lower() in extensions and PurePosixPath(r).stem != "metadata"]

    tables, images = having(TABLE_BUILDERS), having(IMAGE_EXTENSIONS)
    if tables:
        return Layout(_table_builder(tables, description), tables, sorted({*tables, *images}, key=path_order))
    if images:
        metadata = [r for r in visible if PurePosixPath(r).name.startswith("metadata.")]
        return Layout("imagefolder", images, sorted({*images, *metadata}, key=path_order))
    raise UserError(f"data.source: {description} holds no parquet, CSV or image files")


def _describe(builder: str, where: str) -> str:
    return f"image folder {where}" if builder == "imagefolder" else f"{builder} files {where}"


def _table_builder(files: list[str], description: str) -> str:
    suffixes = {PurePosixPath(f).suffix.lower() for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in TABLE_BUILDERS:
        raise UserError(f"data.source: {description}: expected .parquet or .csv files, found {sorted(suffixes)}")
    return TABLE_BUILDERS[suffixes.pop()]


def _size(root: Path, files: list[str]) -> int:
    return sum((root / f).stat().st_size for f in files)


# --- S3 -------------------------------------------------------------------------------------------

def _resolve_s3(uri: str, cfg: DataConfig, endpoint_url: str | None) -> Source:
    fs, root = storage.filesystem(uri, endpoint_url)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except (PermissionError, OSError) as exc:
        network.reraise_if_unreachable(exc)  # the endpoint's failure, not the source's (exit 1)
        raise UserError(f"data.source: cannot list {uri}: {exc}") from None
    if list(listing) == [root]:  # one object: like a local file, named relative to its folder
        root, name = root.rsplit("/", 1)
        layout = Layout(_table_builder([name], uri), [name], [name])
    else:
        layout = _layout([_relative(key, root) for key in listing], uri)
    info = {_relative(key, root): value for key, value in listing.items()}
    files = layout.files
    if layout.format == "imagefolder":
        # Like a local image folder with split subfolders (train/, test/): keep data.split's.
        files = [f for f in files if f.split("/", 1)[0] == cfg.split] or files
    return Source(uri, layout.format, _s3_fingerprint(uri, fs, root, layout.hashed, info, endpoint_url),
                  _describe(layout.format, uri), files=[f"s3://{root}/{f}" for f in files], root=f"s3://{root}",
                  num_bytes=sum(info[f].get("size", 0) for f in files))


def _s3_fingerprint(uri: str, fs: Any, root: str, hashed: list[str], info: dict[str, dict[str, Any]],
                    endpoint_url: str | None) -> str:
    """The content hash of the objects' bytes (as for local files), found from their listing
    (ETags and sizes) when the same listing was hashed before."""
    sizes = {r: int(info[r].get("size") or 0) for r in hashed}
    etags = {r: info[r].get("ETag") or info[r].get("etag") for r in hashed}
    endpoint = storage.s3_options(endpoint_url).get("client_kwargs", {}).get("endpoint_url")
    cheap_key = None if not all(etags.values()) else {
        "source": f"s3://{root}", "endpoint": endpoint, "objects": [[r, etags[r], sizes[r]] for r in hashed]}

    def compute() -> str:
        try:
            return content_fingerprint(hashed, remote_reader(fs, root, sizes))
        except (PermissionError, OSError) as exc:
            network.reraise_if_unreachable(exc)
            raise UserError(f"data.source: cannot read {uri}: {exc}") from None

    return cached_fingerprint(cheap_key, compute)


def _relative(key: str, root: str) -> str:
    return key[len(root):].lstrip("/") if key.startswith(root) else key


# --- the Hugging Face hub -------------------------------------------------------------------------

def _hub_offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _resolve_hub(repo_id: str, cfg: DataConfig) -> Source:
    """Look the dataset up on the hub (its full `namespace/name` id, the commit the revision is at),
    then open that commit streaming. Offline, the local Hugging Face cache is all there is."""
    description = f"hub dataset {repo_id}"
    offline = _hub_offline()
    if offline:
        if "/" not in repo_id:
            raise UserError(f"data.source: {description}: a hub id without a namespace is looked up on the hub, "
                            "and HF_HUB_OFFLINE is set; use its full namespace/name id")
        full_id, commit = repo_id, cfg.revision or "main"  # the revision's name is the best id offline
    else:
        full_id, commit = hub_lookup(repo_id, cfg.revision)
    with datasets_without_torch() as datasets:
        try:
            dataset = datasets.load_dataset(full_id, name=cfg.config_name, split=cfg.split,
                                            revision=None if offline else commit, streaming=True)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
            hint = (" (offline: HF_HUB_OFFLINE is set and the dataset is not in the local Hugging Face cache;"
                    " unset it, or save the dataset with save_to_disk and point data.source at that folder)"
                    if offline else "")
            if not offline:
                network.reraise_if_unreachable(exc)
            raise UserError(f"data.source: cannot load {description}{hint}: {exc}") from None
        except RuntimeError as exc:
            if "scripts are no longer supported" not in str(exc):
                raise
            # datasets >= 4 runs no loading scripts (eugenesiow/Div2k is one): the user's to work around
            raise UserError(f"data.source: {description} is a loading-script dataset ({exc}), which datasets "
                            f"{datasets.__version__} does not run; point data.source at a script-free copy (parquet "
                            "files of its images, or of their paths beside the image files)") from None
    # A pinned revision is immutable; a branch can move, so the commit it resolves to is the content id.
    fingerprint = hashlib.sha256(f"{full_id}\0{cfg.config_name}\0{cfg.split}\0{commit}".encode()).hexdigest()
    return Source(full_id, "hub", fingerprint, f"hub dataset {full_id}", dataset=dataset)


def hub_lookup(repo_id: str, revision: str | None) -> tuple[str, str]:
    """(full `namespace/name` id, commit sha) of a hub dataset. The hub still answers legacy ids
    without a namespace (`mnist`, `cifar10`) with the dataset they moved to, but `datasets` and
    `huggingface_hub` no longer take such ids: the full id found here is what they are given.
    A dataset that does not exist, or that this user may not read, is a UserError saying which."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    bound_hub_client()
    where = f"data.source: hub dataset {repo_id}"
    try:
        info = _dataset_info(HfApi(), repo_id, revision)
    except GatedRepoError:
        raise UserError(f"{where} is gated: accept its conditions on its hub page, with the account whose token "
                        "is set (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"data.revision: {revision!r} is not a branch, tag or commit of hub dataset {repo_id}") from None
    except RepositoryNotFoundError:
        # The hub answers the same for a dataset that does not exist and for a private one the
        # request may not see, so that private names do not leak.
        why = ("is private and no token is set (HF_TOKEN, or `hf auth login`)" if get_token() is None
               else "is private and the token set has no access to it")
        raise UserError(f"{where}: not found: it does not exist on the hub, or it {why}") from None
    except Exception as exc:
        network.reraise_if_unreachable(exc)  # the hub's failure, not the source's (exit 1)
        raise UserError(f"{where}: the hub's answer could not be used: {exc}") from None
    full_id = info.id or repo_id
    if "/" not in full_id:
        raise UserError(f"{where}: the hub names no namespace for it, and the hub clients need namespace/name; "
                        "use the dataset's full id")
    return full_id, info.sha or revision or "main"


def _dataset_info(api: Any, repo_id: str, revision: str | None) -> Any:
    """`api.dataset_info`, tried up to the budget's attempts when the hub does not answer (one
    call makes one request; the hub client's breaker, `bound_hub_client`, stops the attempts once
    the hub has failed that often in a row), with 1 s, 2 s, ... between them."""
    attempts = network.budget().attempts
    for attempt in range(attempts):
        try:
            return api.dataset_info(repo_id, revision=revision, timeout=network.budget().attempt_timeout)
        except Exception as exc:
            if attempt + 1 == attempts or network.unreachable(exc) is None:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


# --- opening with datasets ------------------------------------------------------------------------

def open_dataset(source: Source, cfg: DataConfig, endpoint_url: str | None = None
                 ) -> datasets.Dataset | datasets.IterableDataset:
    """The source as a `datasets` dataset. Call inside `datasets_without_torch()`."""
    import datasets

    if source.dataset is not None:
        return source.dataset
    if source.format == "save_to_disk":
        loaded = datasets.load_from_disk(source.root)
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise UserError(f"data.split: {cfg.split!r} not in {source.uri} (splits: {', '.join(loaded)})")
            return loaded[cfg.split]
        return loaded
    options = storage.s3_options(endpoint_url) if source.uri.startswith("s3://") else None
    if source.format == "imagefolder" and options is None:
        # data_dir lets datasets find split subfolders (train/, test/) and label subfolders itself.
        return datasets.load_dataset("imagefolder", data_dir=source.root, split=cfg.split, streaming=True)
    # Parquet is read in batches of BATCH_ROWS rows, not whole row groups (which also copes with
    # files that hold no rows, where datasets would otherwise ask for batches of 0 rows).
    batching = {"batch_size": BATCH_ROWS} if source.format == "parquet" else {}
    return datasets.load_dataset(source.format, data_files=source.files, split="train", streaming=True,
                                 storage_options=options, **batching)


@contextmanager
def datasets_without_torch() -> Iterator[Any]:
    """Yields the `datasets` module, kept from importing torch.

    When torch is installed, `datasets` imports it to build every IterableDataset (seconds, and
    hundreds of MB of memory) although ingest never hands data to torch. Unless torch is loaded
    already, datasets is told it is absent for the duration.

    Its streaming reads make one attempt each, too (see `one_attempt`)."""
    import datasets

    one_attempt(datasets.config)
    bound_hub_client()
    if "torch" in sys.modules:
        yield datasets
        return
    saved = datasets.config.TORCH_AVAILABLE
    datasets.config.TORCH_AVAILABLE = False
    try:
        yield datasets
    finally:
        datasets.config.TORCH_AVAILABLE = saved


def one_attempt(config: Any) -> None:
    """datasets retries every streamed open and read 20 times, 5 s apart, around clients that
    retry already (botocore for S3, huggingface_hub for the hub): an endpoint gone silent would
    hold ingest for 20 network budgets. One attempt each leaves the budget to ganpipe.network."""
    config.STREAMING_READ_MAX_RETRIES = config.STREAMING_OPEN_MAX_RETRIES = 1
    # With one attempt, a wait after it only delays the error.
    config.STREAMING_READ_RETRY_INTERVAL = config.STREAMING_OPEN_RETRY_INTERVAL = 0
    config.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = config.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = 0


@cache  # once per process
def bound_hub_client() -> None:
    """huggingface_hub's shared HTTP client, made to keep the network budget: no timeout by
    default, and retries ganpipe cannot configure (see network.EndpointBreaker). Its own request
    hooks (offline mode, request ids) stay."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import get_session

    session = get_session()
    client_class, hooks = type(session), session.event_hooks
    transport_class = sys.modules[client_class.__module__.split(".")[0]].HTTPTransport  # httpx or httpx2

    def client() -> Any:
        return client_class(event_hooks=hooks, follow_redirects=True, timeout=network.budget().attempt_timeout,
                            transport=network.EndpointBreaker(transport_class()))

    set_client_factory(client)

"""Same data, same fingerprint: the same files give the same fingerprint read from a local folder
or from an S3 prefix (moto on 127.0.0.1, the `s3` fixture), for every source kind that can live in
both; a changed byte changes both; and a second read of an unchanged S3 prefix finds the content
hash from its listing (ETags and sizes) without reading an object."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import numpy as np
import pytest

from ganpipe.config import DataConfig
from ganpipe.data import ingest
from ganpipe.data import sources as sources_module
from ganpipe.data.fingerprint import cached_fingerprint, content_fingerprint, local_reader
from ganpipe.data.sources import resolve_source
from tests.test_ingest import as_batch, image_table, noise_images, png, read_back

pytestmark = pytest.mark.slow


def parquet_bytes(images: np.ndarray, labels: list[int], tmp_path: Path) -> bytes:
    path = tmp_path / "scratch.parquet"
    image_table(images, labels).to_parquet(str(path))
    return path.read_bytes()


def mirror(files: dict[str, bytes], folder: Path, endpoint: str, bucket: str, prefix: str) -> tuple[str, str]:
    """The same files in a local folder and under an S3 prefix: (local path, s3 URI)."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for name, body in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
    return str(folder), f"s3://{bucket}/{prefix}"


def fingerprint(source: str) -> str:
    return resolve_source(DataConfig(source=source)).fingerprint


def expected(files: dict[str, bytes]) -> str:
    """The documented definition, computed independently: sha256 over `relative/path NUL bytes NUL`
    in pathlib's path order."""
    digest = hashlib.sha256()
    for name in sorted(files, key=lambda n: Path(n).parts):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return digest.hexdigest()


def test_the_same_parquet_file_local_and_on_s3_has_one_fingerprint(s3: tuple[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, bucket = s3
    images, labels = noise_images(12), [i % 3 for i in range(12)]
    body = parquet_bytes(images, labels, tmp_path)
    local, remote = mirror({"d.parquet": body}, tmp_path / "local", endpoint, bucket, "tables")

    # A folder and a prefix, a file and an object: one fingerprint, the documented one.
    assert fingerprint(local) == fingerprint(remote) == expected({"d.parquet": body})
    assert fingerprint(f"{local}/d.parquet") == fingerprint(f"{remote}/d.parquet") == fingerprint(local)
    assert fingerprint(f"{local}/*.parquet") == fingerprint(local)

    # So the prepared data is the same too: ingesting from S3 after the local copy is a cache hit.
    first = ingest(DataConfig(source=local, resolution=8))
    second = ingest(DataConfig(source=remote, resolution=8))
    assert (second.fingerprint, second.cached) == (first.fingerprint, True)

    # One changed byte changes both, and they agree again.
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    mirror({"d.parquet": bytes(flipped)}, tmp_path / "local", endpoint, bucket, "tables")
    assert fingerprint(local) == fingerprint(remote) == expected({"d.parquet": bytes(flipped)})
    assert fingerprint(local) != expected({"d.parquet": body})

    # An unchanged prefix: the listing finds the hash recorded by the last read; no object is read.
    def no_reads(*args: object) -> None:
        raise AssertionError("an unchanged S3 listing must not read its objects")

    monkeypatch.setattr(sources_module, "remote_reader", no_reads)
    assert fingerprint(remote) == expected({"d.parquet": bytes(flipped)})
    assert fingerprint(f"{remote}/d.parquet") == expected({"d.parquet": bytes(flipped)})


def test_image_folders_and_tables_with_images_agree_local_and_on_s3(s3: tuple[str, str], tmp_path: Path) -> None:
    endpoint, bucket = s3
    cats, dogs = noise_images(3, seed=1), noise_images(2, seed=2)
    folder = {f"train/cat/{i}.png": png(a) for i, a in enumerate(cats)}
    folder |= {f"train/dog/{i}.png": png(a) for i, a in enumerate(dogs)}
    folder |= {"test/cat/0.png": png(noise_images(1, seed=3)[0]), "metadata.csv": b"file_name,note\n",
               ".cache/ignored.png": b"not data", "README.md": b"not data either"}
    local, remote = mirror(folder, tmp_path / "pets", endpoint, bucket, "pets")
    data_files = {k: v for k, v in folder.items() if not k.startswith(".") and k != "README.md"}
    assert fingerprint(local) == fingerprint(remote) == expected(data_files)
    result = ingest(DataConfig(source=remote, resolution=8))
    assert result.classes == ["cat", "dog"] and ingest(DataConfig(source=local, resolution=8)).cached

    # A table naming images beside it: its images are part of its content. Folder names that sort
    # differently by string and by path part ("p-1/..." before "p/..." as strings) keep path order.
    images = noise_images(4, seed=4)
    table = parquet_bytes(images[:2], [0, 1], tmp_path)
    files = {"p/0.parquet": table, "p-1/0.parquet": parquet_bytes(images[2:], [1, 0], tmp_path),
             "imgs/a.png": png(images[0])}
    local, remote = mirror(files, tmp_path / "mixed", endpoint, bucket, "mixed")
    assert fingerprint(local) == fingerprint(remote) == expected(files)
    got, labels = read_back(ingest(DataConfig(source=remote, resolution=8)))
    assert np.array_equal(got, as_batch(images[[0, 1, 2, 3]])) and labels.tolist() == [0, 1, 1, 0]

    before = fingerprint(remote)
    mirror({"imgs/a.png": png(images[1])}, tmp_path / "mixed", endpoint, bucket, "mixed")
    assert fingerprint(local) == fingerprint(remote) != before


def test_save_to_disk_fingerprint_is_the_content_hash_it_always_was(tmp_path: Path) -> None:
    """Local sources keep their definition (prepared data from earlier versions stays a cache hit,
    tests/test_compat.py): state.json, which carries a random id per write, is not content."""
    image_table(noise_images(4), [0, 1, 0, 1]).save_to_disk(str(tmp_path / "saved"))
    files = {p.relative_to(tmp_path / "saved").as_posix(): p.read_bytes()
             for p in (tmp_path / "saved").rglob("*") if p.is_file() and p.name != "state.json"}
    assert fingerprint(str(tmp_path / "saved")) == expected(files)
    assert content_fingerprint(files, local_reader(tmp_path / "saved")) == expected(files)


def test_the_listing_cache_never_trusts_a_damaged_entry_or_a_listing_without_etags(ganpipe_home: Path) -> None:
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return "ab" * 32

    key = {"source": "s3://b/p", "endpoint": None, "objects": [["x.parquet", '"etag"', 3]]}
    assert cached_fingerprint(key, compute) == "ab" * 32 and len(calls) == 1
    assert cached_fingerprint(key, compute) == "ab" * 32 and len(calls) == 1  # recorded
    entry, = (ganpipe_home / "cache" / "fingerprints").iterdir()
    assert json.loads(entry.read_text()) == {"fingerprint": "ab" * 32, "source": "s3://b/p", "objects": 1}
    entry.write_text('{"fingerprint": "not a digest"}')
    assert cached_fingerprint(key, compute) == "ab" * 32 and len(calls) == 2  # hashed again
    assert cached_fingerprint(None, compute) == "ab" * 32 and len(calls) == 3  # no ETags: never cached
    assert cached_fingerprint(None, compute) == "ab" * 32 and len(calls) == 4

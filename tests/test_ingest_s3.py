"""Ingest over S3 through a real HTTP endpoint (moto's server on 127.0.0.1, the `s3` fixture):
parquet and image-folder sources, and prepared data cached on S3 and read back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ganpipe.config import DataConfig
from ganpipe.data import ingest, open_prepared
from ganpipe.data.sources import resolve_source
from tests.test_ingest import as_batch, image_table, noise_images, png, read_back

pytestmark = pytest.mark.slow


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    _client(endpoint).put_object(Bucket=bucket, Key=key, Body=body)


def parquet_bytes(images: np.ndarray, labels: list[int]) -> bytes:
    buffer = io.BytesIO()
    image_table(images, labels).to_parquet(buffer)
    return buffer.getvalue()


def test_s3_parquet_source_and_fingerprint_of_its_bytes(s3: tuple[str, str]) -> None:
    endpoint, bucket = s3
    images = noise_images(20)
    labels = [i % 4 for i in range(20)]
    _put(endpoint, bucket, "tables/part-0.parquet", parquet_bytes(images[:12], labels[:12]))
    _put(endpoint, bucket, "tables/part-1.parquet", parquet_bytes(images[12:], labels[12:]))

    cfg = DataConfig(source=f"s3://{bucket}/tables", resolution=8)
    result = ingest(cfg)
    got, got_labels = read_back(result)
    assert result.num_records == 20 and result.classes == ["0", "1", "2", "3"]
    assert np.array_equal(got, as_batch(images)) and got_labels.tolist() == labels
    assert ingest(cfg).cached

    # Changed bytes under the prefix change the fingerprint: the new ETag misses the listing cache
    # and the objects are hashed again (tests/test_fingerprints.py: equal to the local files').
    before = resolve_source(cfg).fingerprint
    images[0, 0, 0] ^= 1
    _put(endpoint, bucket, "tables/part-0.parquet", parquet_bytes(images[:12], labels[:12]))
    assert resolve_source(cfg).fingerprint != before
    assert np.array_equal(read_back(ingest(cfg))[0], as_batch(images))


def test_s3_image_folder_labels_from_subfolders_and_splits(s3: tuple[str, str]) -> None:
    endpoint, bucket = s3
    cats, dogs = noise_images(3, seed=1), noise_images(2, seed=2)
    for name, images in (("cat", cats), ("dog", dogs)):
        for i, image in enumerate(images):
            _put(endpoint, bucket, f"pets/train/{name}/{i}.png", png(image))
    _put(endpoint, bucket, "pets/test/cat/0.png", png(noise_images(1, seed=3)[0]))  # another split

    result = ingest(DataConfig(source=f"s3://{bucket}/pets", resolution=8))
    got, labels = read_back(result)
    assert result.classes == ["cat", "dog"] and result.num_records == 5
    assert np.array_equal(got[labels == 0], as_batch(cats)) and np.array_equal(got[labels == 1], as_batch(dogs))

    test_split = ingest(DataConfig(source=f"s3://{bucket}/pets", resolution=8, split="test"))
    assert test_split.num_records == 1
    assert np.array_equal(read_back(test_split)[0], as_batch(noise_images(1, seed=3)))


def test_s3_table_of_relative_image_paths_with_a_missing_object(s3: tuple[str, str]) -> None:
    """A table naming image files beside it on S3: fetched by the ingest process (concurrently);
    a missing object is a bad record like a missing local file."""
    endpoint, bucket = s3
    images = noise_images(5)
    for i, image in enumerate(images):
        if i != 2:
            _put(endpoint, bucket, f"paths/imgs/{i}.png", png(image))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"file": [f"imgs/{i}.png" for i in range(5)]}), buffer)
    _put(endpoint, bucket, "paths/index.parquet", buffer.getvalue())

    result = ingest(DataConfig(source=f"s3://{bucket}/paths", resolution=8, on_bad_record="skip"))
    assert (result.num_records, result.num_skipped) == (4, 1)
    assert np.array_equal(read_back(result)[0], as_batch(images[[0, 1, 3, 4]]))
    skipped = json.loads(Path(result.report).read_text())["skipped"]
    assert skipped == [{"row": 2, "reason": f"image file not found: s3://{bucket}/paths/imgs/2.png"}]


def test_prepared_data_cached_on_s3_and_read_back(s3: tuple[str, str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, bucket = s3
    images = noise_images(25)
    labels = [i % 5 for i in range(25)]
    (tmp_path / "d.parquet").write_bytes(parquet_bytes(images, labels))
    cfg = DataConfig(source=str(tmp_path / "d.parquet"), resolution=8, shard_size=10,
                     cache=f"s3://{bucket}/prepared")

    result = ingest(cfg)
    assert result.location == f"s3://{bucket}/prepared/{result.fingerprint}" and not result.cached
    keys = {o["Key"] for o in _client(endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    prefix = f"prepared/{result.fingerprint}/"
    assert {prefix + name for name in ("meta.json", "report.json", "images-00000.npy", "images-00002.npy",
                                       "labels-00002.npy")} <= keys
    assert ingest(cfg).cached

    # Another machine (another GANPIPE_HOME) reads it back from S3, checksums verified.
    monkeypatch.setenv("GANPIPE_HOME", str(tmp_path / "elsewhere"))
    prepared = open_prepared(result.location)
    assert prepared.root == tmp_path / "elsewhere" / "prepared" / result.fingerprint
    got, got_labels = prepared.load_all()
    assert np.array_equal(got, as_batch(images)) and got_labels.tolist() == labels
    assert prepared.classes == ["0", "1", "2", "3", "4"]

    # A shard corrupted on S3 is caught on the way in.
    _put(endpoint, bucket, prefix + "images-00001.npy", b"\x93NUMPY garbage")
    monkeypatch.setenv("GANPIPE_HOME", str(tmp_path / "third"))
    with pytest.raises(Exception, match="checksum mismatch"):
        open_prepared(result.location)
    assert not (tmp_path / "third" / "prepared" / result.fingerprint).exists()

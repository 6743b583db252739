"""Secrets come from the environment and are never written or printed: an S3 ingest that works
and one that fails (with tracebacks on, GANPIPE_DEBUG=1) leave the credentials nowhere in their
output or under GANPIPE_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from tests.conftest import error_lines, run_cli, write_config
from tests.test_ingest import noise_images
from tests.test_ingest_s3 import parquet_bytes

pytestmark = pytest.mark.slow

SECRET = "Zq8-secret-value-that-must-never-appear-7Kx"
KEY_ID = "AKIDNEVERSHOWNANYWHERE"


def test_credentials_appear_in_no_output_and_no_file(s3: tuple[str, str], tmp_path: Path) -> None:
    endpoint, bucket = s3
    images = noise_images(8)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key="t/part-0.parquet", Body=parquet_bytes(images, [i % 2 for i in range(8)]))
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID, "GANPIPE_DEBUG": "1"}
    good = write_config(tmp_path / "good.yaml", f"data: {{source: 's3://{bucket}/t', resolution: 8}}\n")
    bad = write_config(tmp_path / "bad.yaml", f"data: {{source: 's3://{bucket}/missing', resolution: 8}}\n")

    ok = run_cli("ingest", str(good), "--json", env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    failed = run_cli("ingest", str(bad), env=env)
    assert failed.returncode == 2 and len(error_lines(failed.stderr)) == 1 and "missing" in failed.stderr

    for output in (ok.stdout, ok.stderr, failed.stdout, failed.stderr):
        assert SECRET not in output and KEY_ID not in output
    home = Path(os.environ["GANPIPE_HOME"])
    written = [p for p in home.rglob("*") if p.is_file()]
    assert written  # the prepared data, its metadata and report are there to search
    for path in written:
        data = path.read_bytes()
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, path

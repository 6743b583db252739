"""Registration against a real `mlflow server` on 127.0.0.1 (sqlite backend) whose artifacts
live in S3 (moto's server): the same code as the embedded default, only MLFLOW_TRACKING_URI set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import numpy as np
import pytest

from ganpipe import registry, storage
from ganpipe.generators import load_generator
from ganpipe.networks import generate
from ganpipe.registry import register_run
from tests.conftest import MlflowServer, last_json, run_cli
from tests.test_registry import copy_run, mlflow_client, run_without_ganpipe

LOAD_CHAMPION = r"""
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/tiny-digits@champion")
out = model.predict(pd.DataFrame({"seed": [11, 12, 13]}))
np.save(sys.argv[2], out)
print(json.dumps({"ganpipe_loaded": any(m.split(".")[0] == "ganpipe" for m in sys.modules)}))
"""


@pytest.mark.slow
def test_register_promote_and_load_through_server(mlflow_server: MlflowServer, tiny_run: Path, tmp_path: Path,
                                                  ganpipe_home: Path) -> None:
    first = register_run(copy_run(tiny_run, tmp_path / "v1", perturb=1, fd=10.0))
    assert (first["version"], first["aliases"]) == (1, ["champion"])

    better_run = copy_run(tiny_run, tmp_path / "v2", perturb=2, fd=5.0)
    result = run_cli("register", "--run", str(better_run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    better = last_json(result.stdout)
    assert (better["name"], better["version"], better["aliases"]) == ("tiny-digits", 2, ["champion"])

    worse = register_run(copy_run(tiny_run, tmp_path / "v3", perturb=3, fd=8.0))
    assert worse["aliases"] == ["challenger"]
    assert register_run(better_run)["version"] == 2  # a retry: the same version
    client = mlflow_client()
    assert len(client.search_model_versions("name = 'tiny-digits'")) == 3
    assert {k: int(v) for k, v in client.get_registered_model("tiny-digits").aliases.items()} == \
        {"champion": 2, "challenger": 3}

    # Another process, with neither ganpipe nor S3 credentials: artifacts come through the server.
    arrays = tmp_path / "champion.npy"
    report = run_without_ganpipe(LOAD_CHAMPION, mlflow_server.uri, str(arrays), cwd=tmp_path,
                                 drop_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"))
    assert report == {"ganpipe_loaded": False}
    loaded = load_generator(str(better_run))
    assert (np.load(arrays) == generate(loaded.generator, loaded.spec, [11, 12, 13]).numpy()).all()
    assert load_generator("models:/tiny-digits@champion").source["generator_sha256"] == \
        loaded.source["generator_sha256"]

    # Every artifact is in the bucket, under the server's destination, and nothing is local.
    s3 = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint, region_name="us-east-1")
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.bucket)
            for obj in page.get("Contents", [])]
    assert keys and all(key.startswith("mlflow/") for key in keys)
    for version in ("1", "2", "3"):
        model_id = client.get_model_version("tiny-digits", version).source.removeprefix("models:/")
        [weights] = [k for k in keys if model_id in k and k.endswith("/generator.safetensors")]
        stored = s3.get_object(Bucket=mlflow_server.bucket, Key=weights)["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == \
            client.get_model_version("tiny-digits", version).tags[registry.SHA_TAG]
        assert {f"registry/v{version}/{name}" for name in ("model_card.md", "promotion.json", "samples.png")} <= \
            {k.split("/artifacts/", 1)[-1] for k in keys}
    assert storage.sha256_file(better_run / "generator" / "generator.safetensors") == \
        client.get_model_version("tiny-digits", "2").tags[registry.SHA_TAG]
    assert not (ganpipe_home / "mlartifacts").exists()
    assert not list(mlflow_server.log.parent.glob("mlartifacts"))

"""Hub datasets through the code a user runs (`ganpipe ingest` with `data.source: namespace/name`),
against tests/hub_server.py, a stand-in for the hub's HTTP API on 127.0.0.1 (HF_ENDPOINT):
the real `datasets` and `huggingface_hub` clients, a parquet dataset made from scikit-learn's
digits, legacy names without a namespace, and the hub's refusals as one error line each."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ganpipe.data import open_prepared
from tests.conftest import error_lines, last_json, run_cli, write_config
from tests.hub_server import SHA, HubServer, Repo

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROWS = 60
TOKEN = "hf_stand_in_token_that_must_never_be_printed"


def tiny_digits_parquet() -> bytes:
    """60 of scikit-learn's digits as the hub stores an image dataset: parquet written by
    `datasets`, with Image and ClassLabel features in its schema."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((image * 255 / 16).astype(np.uint8)) for image in digits.images[:ROWS]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    table = datasets.Dataset.from_dict({"image": images, "label": [int(t) for t in digits.target[:ROWS]]},
                                       features=features)
    out = io.BytesIO()
    table.to_parquet(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def parquet() -> bytes:
    return tiny_digits_parquet()


@pytest.fixture
def hub(parquet: bytes, tmp_path: Path) -> Iterator[tuple[HubServer, dict[str, str]]]:
    files = {"README.md": b"---\nlicense: cc0-1.0\n---\n# tiny digits\n", "data/train-00000-of-00001.parquet": parquet}
    repos = {"user/tiny-digits": Repo(files), "user/secret": Repo(files, private=True)}
    with HubServer(repos, aliases={"tiny-digits": "user/tiny-digits"}) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "GANPIPE_NETWORK_TIMEOUT": "10"}
        yield server, env


def ingest(tmp_path: Path, source: str, env: dict[str, str], name: str = "c.yaml"):
    config = write_config(tmp_path / name, f"data:\n  source: {source}\n  resolution: 16\n  label_column: label\n")
    started = time.monotonic()
    result = run_cli("ingest", str(config), "--json", env=env)
    return result, time.monotonic() - started


def test_ingest_reads_a_hub_dataset_as_the_same_files_read_locally(hub, parquet: bytes, tmp_path: Path) -> None:
    server, env = hub
    result, _ = ingest(tmp_path, "user/tiny-digits", env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert out["num_records"] == ROWS and out["classes"] == NAMES and out["cached"] is False
    assert f"GET /datasets/user/tiny-digits/resolve/{SHA}/data/train-00000-of-00001.parquet" in server.requests
    from_hub = open_prepared(out["location"]).load_all()

    local = tmp_path / "local" / "train.parquet"
    local.parent.mkdir()
    local.write_bytes(parquet)
    here, _ = ingest(tmp_path, str(local), env, "local.yaml")
    assert here.returncode == 0, here.stderr[-3000:]
    from_file = open_prepared(last_json(here.stdout)["location"]).load_all()
    assert from_hub[0].shape == (ROWS, 16, 16, 1) and np.array_equal(from_hub[0], from_file[0])
    assert np.array_equal(from_hub[1], from_file[1])

    again, _ = ingest(tmp_path, "user/tiny-digits", env)  # the same commit: the same prepared data
    assert again.returncode == 0 and last_json(again.stdout)["fingerprint"] == out["fingerprint"]
    assert last_json(again.stdout)["cached"] is True


def test_a_legacy_name_without_namespace_is_the_dataset_the_hub_moved_it_to(hub, tmp_path: Path) -> None:
    server, env = hub
    named, _ = ingest(tmp_path, "user/tiny-digits", env, "named.yaml")
    legacy, _ = ingest(tmp_path, "tiny-digits", env)
    assert legacy.returncode == 0, legacy.stderr[-3000:]
    assert "GET /api/datasets/tiny-digits" in server.requests  # looked up, then redirected
    assert last_json(legacy.stdout)["fingerprint"] == last_json(named.stdout)["fingerprint"]

    offline, _ = ingest(tmp_path, "tiny-digits", {**env, "HF_HUB_OFFLINE": "1"})
    errors = error_lines(offline.stderr)
    assert offline.returncode == 2 and len(errors) == 1, offline.stderr[-2000:]
    assert "tiny-digits" in errors[0] and "without a namespace" in errors[0] and "HF_HUB_OFFLINE" in errors[0]

    typo, _ = ingest(tmp_path, "train.parquet", env)  # a missing file is not looked up on the hub
    assert typo.returncode == 2 and "'train.parquet' is not an existing path" in error_lines(typo.stderr)[0]


@pytest.mark.parametrize(("source", "token", "expected"), [
    ("user/missing", "", "does not exist on the hub, or it is private and no token is set (HF_TOKEN"),
    ("user/secret", "", "does not exist on the hub, or it is private and no token is set (HF_TOKEN"),
    ("user/missing", TOKEN, "does not exist on the hub, or it is private and the token set has no access"),
])
def test_a_dataset_the_hub_refuses_is_one_error_line(hub, tmp_path: Path, source: str, token: str,
                                                     expected: str) -> None:
    _, env = hub
    result, elapsed = ingest(tmp_path, source, {**env, "HF_TOKEN": token})
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert f"hub dataset {source}: not found" in errors[0] and expected in errors[0]
    assert "Traceback" not in result.stderr and TOKEN not in result.stderr + result.stdout
    assert elapsed < 60  # no retries of a refusal (the process's own start is most of it)


def test_a_private_dataset_loads_with_a_token(hub, tmp_path: Path) -> None:
    _, env = hub
    result, _ = ingest(tmp_path, "user/secret", {**env, "HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_json(result.stdout)["num_records"] == ROWS
    assert TOKEN not in result.stderr + result.stdout


HUB_CONFIGS = {"cifar10-r3gan.yaml": ("uoft-cs/cifar10", 32, 3, 10), "mnist-dcgan.yaml": ("ylecun/mnist", 32, 1, 10),
               "fashion-mnist-resnet.yaml": ("zalando-datasets/fashion_mnist", 32, 1, 10),
               "celeba64-r3gan.yaml": ("flwrlabs/celeba", 64, 3, 0)}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_the_hub_configs_build_their_networks_and_say_what_fid_to_expect(name: str, tmp_path: Path) -> None:
    """Each shipped hub config loads, its model and training settings build (checked against data
    of its dataset's shape, as the recipe checks a real run's), and its comments give the FID
    range the literature reports."""
    import json

    from ganpipe.config_files import load_config
    from ganpipe.data import PreparedData
    from ganpipe.recipe import network_spec
    from tests.conftest import ROOT

    source, resolution, channels, classes = HUB_CONFIGS[name]
    path = ROOT / "configs" / name
    cfg = load_config(path)
    assert cfg.data.source == source and cfg.data.resolution == resolution
    assert cfg.model.conditional == bool(classes)
    (tmp_path / "meta.json").write_text(json.dumps({
        "kind": "image", "resolution": resolution, "channels": channels, "num_records": 1000, "fingerprint": "x",
        "classes": [str(i) for i in range(classes)] or None, "shards": []}))
    spec = network_spec(cfg, PreparedData(tmp_path))
    assert spec.sample_shape == (channels, resolution, resolution) and spec.num_classes == classes
    comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    assert "FID" in comments and "not measured yet" in comments

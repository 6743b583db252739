"""Artifacts written by ganpipe before its restructuring still load, resume and reproduce.

tests/data/old_layout holds what the code at commit 9286f06 wrote (ganpipe/models.py, generator
loading in registry.py, one export module): prepared data, two finished run directories, a
registered model version (its `ganpipe_generator/networks.py` layout) and an export, together with
what that code produced from them (expected/). scripts/make_old_layout_fixture.sh made them; its
header says how. The current code must give the same fingerprints, weights, images and rows, bit
for bit (CPU, one process).

The old MLflow store is not kept (an sqlite file of ~1 MB full of absolute paths): the registered
version's artifact folder, exactly as the old code logged it, is registered into a fresh store
with the tags the old code set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ganpipe import cli
from ganpipe.config import ExportConfig
from ganpipe.config_files import load_config
from ganpipe.data import ingest, open_prepared
from ganpipe.export import export
from ganpipe.generators import SHA_TAG, load_generator
from ganpipe.networks import NetworkSpec, generate
from ganpipe.synthetic_rows import row_seed
from tests.conftest import last_json, run_cli

OLD = Path(__file__).parent / "data" / "old_layout"
EXPECTED = json.loads((OLD / "expected" / "expected.json").read_text())
DIGITS_RUN = EXPECTED["digits"]["run"]
GAUSSIANS_RUN = EXPECTED["gaussians"]["run"]
OLD_VERSION = json.loads((OLD / "registered" / "version.json").read_text())
# The old version's artifact folder, packed: it holds the old code's modules, which would otherwise
# sit in the tree as copies of today's (`duplicates` reads every tracked .py file).
OLD_VERSION_ARCHIVE = OLD / "registered" / "compat-digits-v1.tar.gz"
OLD_MODEL_URI = f"models:/{OLD_VERSION['name']}/{OLD_VERSION['version']}"
EXPORT_FLAGS = ["--num-images", "40", "--shard-size", "16", "--class-balance"]  # as the old export ran


def expected(name: str) -> Path:
    """A file the old code produced, checked against the digest recorded when it was made."""
    path = OLD / "expected" / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED["sha256"][name], f"{path} was altered"
    return path


def assert_same_weights(path: Path, reference: Path) -> None:
    ours, theirs = load_file(str(path)), load_file(str(reference))
    assert sorted(ours) == sorted(theirs)
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not changed, f"{path}: tensors differ from the old code's: {changed}"


def rows_of(parquet_files: list[Path]) -> list[dict]:
    return [row for f in parquet_files for row in pq.read_table(f).to_pylist()]


@pytest.fixture
def old_home(ganpipe_home: Path) -> Path:
    """GANPIPE_HOME holding the old code's prepared data and run directories (not its MLflow
    store, which a moved or upgraded installation may not have either)."""
    for part in ("prepared", "runs"):
        shutil.copytree(OLD / "home" / part, ganpipe_home / part)
    return ganpipe_home


@pytest.fixture(scope="module")
def old_version_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old code's registered artifact folder (MLmodel, code/, artifacts/), unpacked."""
    folder = tmp_path_factory.mktemp("old-version")
    with tarfile.open(OLD_VERSION_ARCHIVE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "compat-digits-v1"


@pytest.fixture(scope="module")
def old_version_store(tmp_path_factory: pytest.TempPathFactory, old_version_folder: Path) -> str:
    """A fresh sqlite store (current mlflow) in which models:/compat-digits/1 is the old code's
    registered version: its artifact folder as the old code logged it, and the old code's tags."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("old-registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("compat", artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(old_version_folder), "generator")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(OLD_VERSION["name"])
    version = client.create_model_version(OLD_VERSION["name"], f"{run.info.artifact_uri}/generator",
                                          run_id=run.info.run_id, tags=OLD_VERSION["tags"])
    assert int(version.version) == OLD_VERSION["version"]
    return uri


@pytest.fixture
def old_registry(old_version_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", old_version_store)
    return old_version_store


@pytest.fixture
def pyfunc_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """mlflow puts each loaded model's code folder on sys.path and Python imports the shipped
    `ganpipe_generator` package once per process: start without it, and leave nothing behind."""
    def forget() -> None:
        for name in [m for m in sys.modules if m.split(".")[0] == "ganpipe_generator"]:
            del sys.modules[name]

    monkeypatch.setattr(sys, "path", list(sys.path))
    forget()
    yield
    forget()


# --- prepared data --------------------------------------------------------------------------------

def test_old_prepared_data_is_a_cache_hit(old_home: Path) -> None:
    shards = {"digits": ("images-00000.npy", "labels-00000.npy"), "gaussians": ("vectors-00000.npy", None)}
    for key, (values_file, labels_file) in shards.items():
        old = OLD / "home" / "prepared" / EXPECTED[key]["fingerprint"]
        result = ingest(load_config(OLD / f"{key}.yaml").data)
        assert (result.fingerprint, result.cached, result.num_records) == \
            (EXPECTED[key]["fingerprint"], True, EXPECTED[key]["num_records"])
        assert Path(result.location) == old_home / "prepared" / result.fingerprint
        assert (Path(result.location) / "meta.json").read_bytes() == (old / "meta.json").read_bytes()  # not rewritten
        data = open_prepared(result.location)
        values, labels = data.gather(np.arange(data.num_records))
        assert data.num_records == EXPECTED[key]["num_records"] and np.array_equal(values, np.load(old / values_file))
        if labels_file is None:
            assert labels is None and data.kind == "vector" and data.vector_stats[1].shape == (2,)
        else:
            assert np.array_equal(labels, np.load(old / labels_file))
            assert result.classes == [str(d) for d in range(10)]


# --- run directories ------------------------------------------------------------------------------

def test_old_runs_generate_what_the_old_code_generated(old_home: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    for run, reference in ((DIGITS_RUN, "run_generate.npy"), (GAUSSIANS_RUN, "gaussians_generate.npy")):
        out = tmp_path / f"{run}.npy"
        code = cli.run(["generate", "--model", str(old_home / "runs" / run), "--num-images", "10",
                        "--seed", "0", "--out", str(out), "--json"])
        assert code == 0, capsys.readouterr().err
        reported = last_json(capsys.readouterr().out)
        assert (reported["out"], reported["num_images"]) == (str(out), 10)
        ours, theirs = np.load(out), np.load(expected(reference))
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs), f"{run}: max difference {np.abs(ours - theirs).max()}"
    assert theirs.dtype == np.float32 and theirs.shape == (10, 2)  # the vector model, in data units


def test_old_run_resumes_where_it_stopped_and_trains_as_the_old_code_did(old_home: Path) -> None:
    run_dir = old_home / "runs" / DIGITS_RUN
    old_mlflow_run = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    proc = run_cli("train", str(OLD / "digits.yaml"), "--set", "train.steps=10", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    continued = EXPECTED["continued"]
    assert (result["run_dir"], result["resumed_from_step"], result["steps"], result["status"]) == \
        (str(run_dir), continued["resumed_from_step"], continued["steps"], "completed")
    assert f"resumed from step {EXPECTED['digits']['steps']}" in proc.stderr
    # Its MLflow run is in the old store, not this one: training goes on and logs to a new run.
    assert f"note: MLflow run {old_mlflow_run} is not in" in proc.stderr
    new_mlflow_run = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert new_mlflow_run == result["mlflow_run_id"] != old_mlflow_run

    # Steps 7..10 are the old code's steps 7..10: the same optimiser, EMA, RNG and data position.
    checkpoint = run_dir / "checkpoints" / continued["checkpoint"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == continued["checkpoint"]
    assert Path(result["checkpoint"]) == checkpoint
    assert_same_weights(run_dir / "generator" / "generator.safetensors", expected("continued/generator.safetensors"))
    assert_same_weights(checkpoint / "G.safetensors", expected("continued/G.safetensors"))
    assert_same_weights(checkpoint / "D.safetensors", expected("continued/D.safetensors"))
    loaded = load_generator(str(run_dir))
    images = generate(loaded.generator, loaded.spec, row_seed(0, np.arange(10)).tolist(), list(range(10)))
    assert np.array_equal(images.numpy(), np.load(expected("continued/generate.npy")))


# --- a registered version -------------------------------------------------------------------------

def test_old_registered_version_loads_and_generates_the_same(old_registry: str, old_home: Path, tmp_path: Path,
                                                            old_version_folder: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            pyfunc_imports: None) -> None:
    import mlflow

    from ganpipe.registry import register_run

    # ganpipe's own loader (spec.json + safetensors, checked against the old sha256 tag).
    loaded = load_generator(OLD_MODEL_URI)
    spec_file = old_version_folder / "artifacts" / "spec.json"
    assert loaded.spec == NetworkSpec.from_json(json.loads(spec_file.read_text()))
    assert loaded.source["generator_sha256"] == OLD_VERSION["tags"][SHA_TAG]
    assert loaded.source["model_uri"] == OLD_MODEL_URI
    images = generate(loaded.generator, loaded.spec, row_seed(0, np.arange(10)).tolist(), list(range(10)))
    assert np.array_equal(images.numpy(), np.load(expected("run_generate.npy")))

    # `ganpipe generate --model models:/...`: the same parquet rows (PNG bytes, label, seed, index).
    out = tmp_path / "generated.parquet"
    code = cli.run(["generate", "--model", OLD_MODEL_URI, "--num-images", "10", "--seed", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ours, theirs = pq.read_table(out), pq.read_table(expected("registered_generate.parquet"))
    assert ours.schema == theirs.schema and ours.to_pylist() == theirs.to_pylist()

    # The pyfunc, by registry URI and from the artifact folder itself, runs the old shipped code.
    frame = pd.DataFrame({"seed": [0, 1, 2, 3], "label": [3, 3, 7, 1]})
    reference = np.load(expected("pyfunc_predict.npy"))
    folder = shutil.copytree(old_version_folder, tmp_path / "compat-digits-v1")
    for uri in (OLD_MODEL_URI, str(folder)):
        predicted = mlflow.pyfunc.load_model(uri).predict(frame)
        assert predicted.dtype == np.uint8 and np.array_equal(predicted, reference), uri
    assert sys.modules["ganpipe_generator.networks"].__file__.endswith("networks.py")  # the old layout

    # The same weights registered by the current code (networks as a package) load in this same
    # process, after the old version: both layouts answer to `ganpipe_generator.networks`.
    current = register_run(old_home / "runs" / DIGITS_RUN, name="compat-digits-current")
    assert current["model_uri"] == "models:/compat-digits-current/1"
    client = mlflow.MlflowClient()
    assert client.get_model_version("compat-digits-current", "1").tags[SHA_TAG] == OLD_VERSION["tags"][SHA_TAG]
    predicted = mlflow.pyfunc.load_model(current["model_uri"]).predict(frame)
    assert np.array_equal(predicted, reference)


# --- an export ------------------------------------------------------------------------------------

def test_old_export_is_recognised_and_resumed_with_the_same_rows(old_registry: str, tmp_path: Path) -> None:
    out = tmp_path / "export"
    shutil.copytree(OLD / "export", out)
    old_files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    old_manifest = json.loads((out / "manifest.json").read_text())
    old_rows = rows_of(sorted((OLD / "export" / "data").glob("*.parquet")))
    assert len(old_rows) == EXPECTED["export"]["num_images"] == 40

    # The same settings again: the old marker is this export, every shard is already there.
    settings = ExportConfig(num_images=40, shard_size=16, class_balance=True, out=str(out))
    result = export(OLD_MODEL_URI, settings, progress=False)
    assert (result["num_images"], result["num_shards"], result["shards_written"]) == (40, 3, 0)
    assert result["per_class_counts"] == EXPECTED["export"]["per_class_counts"]
    data_files = sorted((out / "data").glob("*.parquet"))
    assert {p.relative_to(out): p.read_bytes() for p in data_files} == \
        {k: v for k, v in old_files.items() if k.parts[0] == "data"}
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("format_version", "model_uri", "weights_sha256", "num_images", "labels", "num_rows", "shards",
                "per_class_counts", "spec"):
        assert manifest[key] == old_manifest[key], key

    # An old export killed after two shards (no third shard, no manifest): `ganpipe export` with the
    # same flags writes only the missing shard, and it holds the rows the old code wrote.
    for name in ("data/train-00002-of-00003.parquet", ".shards/00002.json", "manifest.json", "README.md"):
        (out / name).unlink()
    proc = run_cli("export", "--model", OLD_MODEL_URI, *EXPORT_FLAGS, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert (result["num_images"], result["num_shards"], result["shards_written"]) == (40, 3, 1)
    assert rows_of(sorted((out / "data").glob("*.parquet"))) == old_rows
    # The shard's record describes the new file (its checksum; parquet bytes may differ between
    # pyarrow versions, the rows may not) and otherwise says what the old one said.
    record = json.loads((out / ".shards" / "00002.json").read_text())
    old_record = json.loads(old_files[Path(".shards/00002.json")])
    assert record["sha256"] == hashlib.sha256((out / record["file"]).read_bytes()).hexdigest()
    assert {**record, "sha256": None} == {**old_record, "sha256": None}
    assert json.loads((out / "manifest.json").read_text())["num_rows"] == 40

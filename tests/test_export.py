"""`ganpipe export`: Hugging Face-ready synthetic datasets, exact class counts, rows reproducible
from their seeds, local and S3 targets, and the dataset round trip through `datasets`."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ganpipe import cli
from ganpipe.config import ExportConfig
from ganpipe.errors import UserError
from ganpipe.export import export, export_location
from ganpipe.generators import load_generator
from ganpipe.networks import NetworkSpec, build_generator, generate
from ganpipe.shards import SCRATCH_PREFIX, encode_png, encode_pngs
from ganpipe.synthetic_rows import row_seed
from tests.conftest import error_lines, last_json, run_cli, write_config


def pixels(png: bytes) -> np.ndarray:
    array = np.asarray(Image.open(io.BytesIO(png)))
    return array[:, :, None] if array.ndim == 2 else array


def read_rows(out: Path) -> pa.Table:
    """Every row of a local parquet export, in index order."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("data/*.parquet"))])
    return table.sort_by("index")


def image_bytes(table: pa.Table) -> list[bytes]:
    return table.column("image").combine_chunks().field("bytes").to_pylist()


# --- generation is a function of the row alone -----------------------------------------------------

def test_a_row_generated_alone_is_bit_identical_to_the_same_row_in_a_batch(tiny_run: Path) -> None:
    """CPU kernels pick their summation order by batch shape; models.generate runs every forward
    pass at one shape, so batch composition cannot change a single bit."""
    torch.manual_seed(0)
    vector_spec = NetworkSpec("mlp", (24,), 16, g_width=64, mean=(0.0,) * 24, std=(1.0,) * 24)
    cases = [(load_generator(str(tiny_run)).generator, load_generator(str(tiny_run)).spec),
             (build_generator(vector_spec).eval(), vector_spec)]  # float outputs: any drift would show
    for generator, spec in cases:  # batch_size: the fixed forward shape (256 by default; small here for speed)
        seeds = list(range(1000, 1100))
        batched = generate(generator, spec, seeds, batch_size=32)
        alone = torch.cat([generate(generator, spec, [s], batch_size=32) for s in seeds[::9]])
        odd_batches = torch.cat([generate(generator, spec, seeds[i:i + 7], batch_size=32) for i in range(0, 100, 7)])
        assert torch.equal(alone, batched[::9])
        assert torch.equal(odd_batches, batched)


def test_png_encoding_is_lossless_and_per_image() -> None:
    rng = np.random.default_rng(0)
    for channels in (1, 3):
        images = rng.integers(0, 256, (5, 9, 7, channels), dtype=np.uint8)
        for level in (0, 1):
            encoded = encode_pngs(images, level)
            assert all((pixels(png) == image).all() for png, image in zip(encoded, images, strict=True))
            assert encoded[3] == encode_png(images[3], level)


# --- parquet, local: labels drawn like the training data, round trip, regeneration ------------------

def test_parquet_export_has_exact_counts_loads_with_features_and_regenerates(
        tiny_conditional_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    result = export(str(tiny_conditional_run), ExportConfig(num_images=300, out=str(out), shard_size=128, seed=0),
                    progress=False)
    assert result["num_images"] == 300 and result["num_shards"] == 3 and result["shards_written"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [128, 128, 44]
    # Labels are drawn in the training data's class proportions (from the run's prepared data).
    run = json.loads((tiny_conditional_run / "run.json").read_text())
    training = json.loads((Path(run["data"]["location"]) / "meta.json").read_text())["class_counts"]
    assert manifest["labels"]["mode"] == "weighted"
    assert manifest["labels"]["weights"] == [float(v) for v in training.values()]

    rows = datasets.load_dataset("parquet", data_files=str(out / "data/*.parquet"), split="train")
    assert rows.features["label"] == datasets.ClassLabel(names=[str(d) for d in range(10)])
    assert isinstance(rows.features["image"], datasets.Image)
    assert rows.features["seed"].dtype == "int64" and rows.features["index"].dtype == "int64"
    assert sorted(rows["index"]) == list(range(300))
    assert list(rows["seed"]) == row_seed(0, np.asarray(rows["index"])).tolist()
    counts = np.bincount(np.asarray(rows["label"]), minlength=10)
    assert {str(i): int(c) for i, c in enumerate(counts)} == manifest["per_class_counts"] \
        == manifest["requested_per_class_counts"] == result["per_class_counts"]
    assert np.asarray(rows[0]["image"]).shape == (16, 16)

    # Any row, regenerated alone from (model, seed, label), is bit-identical: pixels and PNG bytes.
    table = read_rows(out)
    loaded = load_generator(str(tiny_conditional_run))
    for i in (0, 137, 299):
        seed, label = table["seed"][i].as_py(), table["label"][i].as_py()
        again = generate(loaded.generator, loaded.spec, [seed], [label]).numpy()[0]
        stored = image_bytes(table)[i]
        assert (pixels(stored) == again).all()
        assert stored == encode_png(again, manifest["png_compression_level"])

    # ... and through the CLI: `ganpipe generate` row i (same seed, same label) is the same image.
    i = 137
    label = table["label"][i].as_py()
    npy = tmp_path / "again.npy"
    generated = run_cli("generate", "--model", str(tiny_conditional_run), "--num-images", str(i + 1),
                        "--labels", str(label), "--seed", "0", "--out", str(npy), "--json")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert (np.load(npy)[i] == pixels(image_bytes(table)[i])).all()


# --- class control and the image folder -------------------------------------------------------------

def test_class_balance_and_explicit_counts_are_exact_and_imagefolder_round_trips(
        tiny_conditional_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "balanced"
    result = export(str(tiny_conditional_run), ExportConfig(num_images=50, out=str(folder), format="imagefolder",
                                                            shard_size=20, class_balance=True), progress=False)
    assert result["per_class_counts"] == {str(d): 5 for d in range(10)}
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["00000", "00001", "00002"]
    rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert rows.features["label"] == datasets.ClassLabel(names=[str(d) for d in range(10)])
    assert set(rows.features) == {"image", "label", "seed", "index"}
    assert sorted(rows["index"]) == list(range(50))
    assert np.bincount(np.asarray(rows["label"]), minlength=10).tolist() == [5] * 10
    loaded = load_generator(str(tiny_conditional_run))
    by_index = {row["index"]: row for row in rows}
    again = generate(loaded.generator, loaded.spec, row_seed(0, np.arange(50)).tolist(), [i % 10 for i in range(50)])
    assert all((np.asarray(by_index[i]["image"])[:, :, None] == again[i].numpy()).all() for i in range(50))

    counted = tmp_path / "counted"
    result = export(str(tiny_conditional_run), ExportConfig(num_images=20, out=str(counted),
                                                            class_counts={"3": 7, "5": 13}), progress=False)
    rows = datasets.load_dataset("parquet", data_files=str(counted / "data/*.parquet"), split="train")
    assert np.bincount(np.asarray(rows["label"]), minlength=10).tolist() == [0, 0, 0, 7, 0, 13, 0, 0, 0, 0]
    assert result["per_class_counts"]["3"] == 7 and result["per_class_counts"]["5"] == 13

    with pytest.raises(UserError, match="add up to 19"):
        export(str(tiny_conditional_run), ExportConfig(num_images=20, out=str(tmp_path / "x"),
                                                       class_counts={"3": 7, "5": 12}), progress=False)
    with pytest.raises(UserError, match="unknown class"):
        export(str(tiny_conditional_run), ExportConfig(num_images=20, out=str(tmp_path / "y"),
                                                       class_counts={"cat": 20}), progress=False)


def test_cli_reports_progress_and_rejects_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = run_cli("export", "--model", str(tiny_run), "--num-images", "600", "--shard-size", "200",
                   "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json(done.stdout)
    assert result["num_images"] == 600 and result["num_shards"] == 3 and result["manifest"].endswith("manifest.json")
    progress = [line for line in done.stderr.splitlines() if line.startswith("export: ")]
    assert progress and progress[-1].startswith("export: 600/600 rows (100%)")
    assert all("images/s" in line and "ETA" in line for line in progress)

    bad = run_cli("export", "--model", str(tiny_run), "--num-images", "10", "--out", str(tmp_path / "b"),
                  "--class-balance")
    assert bad.returncode == 2 and error_lines(bad.stderr) == \
        ["error: --class-balance / --class-counts need a conditional model"]
    # The same location with another export is refused, and nothing already there is touched.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "data").iterdir())
    other = run_cli("export", "--model", str(tiny_run), "--num-images", "600", "--shard-size", "200",
                    "--seed", "1", "--out", str(out))
    assert other.returncode == 2 and "holds a different dataset (differs in seed)" in other.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "data").iterdir()) == before


# --- one config surface: a config file's export section, --set, flags ----------------------------------

def _export_in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.run(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_the_export_section_of_a_config_and_flags_override_it(
        tiny_conditional_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A pipeline config serves as is: `ganpipe export` reads its export and storage sections only.
    config = write_config(tmp_path / "pipeline.yaml", f"""
data: {{source: builtin:digits, resolution: 16}}
model: {{family: dcgan, conditional: true}}
train: {{steps: 20}}
export:
  num_images: 30
  out: {tmp_path / "from-config"}
  shard_size: 16
  seed: 4
  class_counts: {{3: 10, 5: 20}}
""")
    model = str(tiny_conditional_run)
    code, out, err = _export_in_process(capsys, str(config), "--model", model, "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["out"] == str(tmp_path / "from-config") and result["num_shards"] == 2
    assert {k: v for k, v in result["per_class_counts"].items() if v} == {"3": 10, "5": 20}
    manifest = json.loads((tmp_path / "from-config" / "manifest.json").read_text())
    assert (manifest["num_images"], manifest["shard_size"], manifest["seed"]) == (30, 16, 4)

    # --set overrides the file, and a flag (a shorthand for its key) overrides both.
    code, out, err = _export_in_process(capsys, str(config), "--model", model, "--set", "export.seed=9",
                                        "--set", "export.shard_size=8", "--seed", "5",
                                        "--out", str(tmp_path / "flagged"), "--class-balance",
                                        "--set", "export.class_counts=null", "--json")
    assert code == 0, err
    manifest = json.loads((tmp_path / "flagged" / "manifest.json").read_text())
    assert (manifest["seed"], manifest["shard_size"], manifest["labels"]["mode"]) == (5, 8, "balanced")

    # Unknown keys inside the sections it reads are refused, naming the key; so are bad values.
    bad = write_config(tmp_path / "bad.yaml", "export: {num_images: 10, shard_sise: 4}\n")
    code, _, err = _export_in_process(capsys, str(bad), "--model", model, "--out", str(tmp_path / "b"))
    assert code == 2 and error_lines(err) == [f"error: {bad}: unknown key 'export.shard_sise'"]
    code, _, err = _export_in_process(capsys, "--model", model, "--out", str(tmp_path / "b"), "--num-images", "5",
                                      "--set", "export.drop_lowest=0.5")
    assert code == 2 and error_lines(err) == ["error: --set: unknown key 'export.drop_lowest'"]
    code, _, err = _export_in_process(capsys, str(config), "--model", model, "--drop-lowest-d", "1.5")
    assert code == 2 and len(error_lines(err)) == 1
    assert error_lines(err)[0].startswith("error: --drop-lowest-d: key 'export.drop_lowest_d'")
    assert not (tmp_path / "b").exists()


def test_the_default_export_location_is_chosen_in_one_place(ganpipe_home: Path) -> None:
    assert export_location(ExportConfig(), "digits", "v3") == str(ganpipe_home / "exports" / "digits" / "v3")
    assert export_location(ExportConfig(out="s3://bucket/x"), "digits", "v3") == "s3://bucket/x"


# --- S3 (moto server on 127.0.0.1) -------------------------------------------------------------------

def test_export_to_s3_round_trips_and_resumes(tiny_run: Path, s3: tuple[str, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    # The tests run with the hub offline, which makes `datasets` refuse every remote URL; this
    # one is the moto server on 127.0.0.1.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    endpoint, bucket = s3
    uri = f"s3://{bucket}/synthetic/v1"
    result = export(str(tiny_run), ExportConfig(num_images=100, out=uri, shard_size=40), progress=False)
    assert result["num_images"] == 100 and result["shards_written"] == 3
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    manifest = json.loads(fs.cat_file(f"{bucket}/synthetic/v1/manifest.json"))
    assert [s["rows"] for s in manifest["shards"]] == [40, 40, 20]
    assert fs.exists(f"{bucket}/synthetic/v1/README.md")
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    rows = datasets.load_dataset("parquet", data_files=f"{uri}/data/*.parquet", split="train",
                                 storage_options=options)
    assert sorted(rows["index"]) == list(range(100)) and "label" not in rows.features
    loaded = load_generator(str(tiny_run))
    again = generate(loaded.generator, loaded.spec, row_seed(0, np.arange(100)).tolist())
    by_index = {row["index"]: np.asarray(row["image"]) for row in rows}
    assert all((by_index[i][:, :, None] == again[i].numpy()).all() for i in range(100))
    # A rerun finds every shard committed and writes nothing.
    assert export(str(tiny_run), ExportConfig(num_images=100, out=uri, shard_size=40),
                  progress=False)["shards_written"] == 0

    folder_uri = f"s3://{bucket}/synthetic/folder"
    export(str(tiny_run), ExportConfig(num_images=30, out=folder_uri, format="imagefolder", shard_size=16),
           progress=False)
    assert len(fs.glob(f"{bucket}/synthetic/folder/train/00000/*.png")) == 16
    metadata = pq.read_table(f"{bucket}/synthetic/folder/train/00001/metadata.parquet", filesystem=fs)
    assert metadata.column("index").to_pylist() == list(range(16, 30))
    png = fs.cat_file(f"{bucket}/synthetic/folder/train/00001/{metadata['file_name'][0].as_py()}")
    assert (pixels(png) == again[16].numpy()).all()


# --- killed part way, run again ---------------------------------------------------------------------

@pytest.mark.slow
def test_export_killed_part_way_reruns_to_the_uninterrupted_rows(tiny_run: Path, tmp_path: Path) -> None:
    """SIGKILL `ganpipe export --num-processes 2` after its first shards: its ranks stop by
    themselves, and a rerun ends with exactly N rows, no duplicates, identical to an export that
    was never interrupted."""
    import os
    import signal
    import time
    import uuid

    from tests.conftest import GANPIPE, ROOT

    n, shard = 8000, 250
    reference = tmp_path / "reference"
    export(str(tiny_run), ExportConfig(num_images=n, out=str(reference), shard_size=shard), progress=False)

    out = tmp_path / "killed"
    marker = uuid.uuid4().hex
    args = ["export", "--model", str(tiny_run), "--num-images", str(n), "--shard-size", str(shard),
            "--out", str(out)]
    proc = subprocess.Popen([*GANPIPE, *args, "--num-processes", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "GANPIPE_TEST_MARKER": marker})
    deadline = time.time() + 300
    while not list((out / ".shards").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list((out / ".shards").glob("*.json")))
    assert 0 < committed < n // shard and not (out / "manifest.json").exists()

    # The ranks notice that their parent is gone and exit: nothing keeps writing behind our back.
    def marked() -> list[str]:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"GANPIPE_TEST_MARKER={marker}".encode() in environ.read_bytes():
                    found.append(environ.parent.name)
            except OSError:
                continue
        return found
    deadline = time.time() + 120
    while marked() and time.time() < deadline:
        time.sleep(0.5)
    assert marked() == []

    rerun = run_cli(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = last_json(rerun.stdout)
    assert result["num_images"] == n and 0 < result["shards_written"] < n // shard
    rows, expected = read_rows(out), read_rows(reference)
    assert rows.column("index").to_pylist() == list(range(n))
    assert rows.equals(expected)
    assert not [p for p in out.iterdir() if p.name.startswith(SCRATCH_PREFIX)]

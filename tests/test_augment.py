"""`ganpipe augment`: real and synthetic rows mixed at an exact ratio, each row traceable to its
source (real row, or the latent seed that regenerates it), readable by `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from ganpipe.augment import augment
from ganpipe.config import DataConfig, ExportConfig
from ganpipe.data import ingest, open_prepared
from ganpipe.export import export
from ganpipe.generators import load_generator
from ganpipe.networks import generate
from tests.conftest import error_lines, last_json, run_cli
from tests.test_export import pixels, read_rows

NUM_REAL = 60


@pytest.fixture
def real_digits(tmp_path: Path) -> Path:
    """60 labelled digits saved with `save_to_disk`, class names '0'..'9' like the builtin source."""
    digits = load_digits()
    images = [np.uint8(image * 255 / 16) for image in digits.images[:NUM_REAL]]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    path = tmp_path / "real"
    datasets.Dataset.from_dict({"image": images, "label": digits.target[:NUM_REAL].tolist()},
                               features=features).save_to_disk(str(path))
    return path


def test_augment_from_a_model_mixes_exactly_and_every_row_traces_back(
        tiny_conditional_run: Path, real_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    args = ["augment", "--real", str(real_digits), "--synthetic", str(tiny_conditional_run), "--ratio", "0.5",
            "--out", str(out), "--shard-size", "40", "--json"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = last_json(result.stdout)
    assert (summary["num_images"], summary["num_real"], summary["num_synthetic"]) == (90, 60, 30)
    assert summary["num_shards"] == 3 and summary["shards_written"] == 3

    rows = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert rows.features["label"].names == [str(d) for d in range(10)]
    assert rows["source"].count("real") == 60 and rows["source"].count("synthetic") == 30
    # Interleaved evenly: every shard holds both sources in the chosen proportion.
    for shard in sorted((out / "data").glob("*.parquet")):
        sources = pq.read_table(shard).column("source").to_pylist()
        assert abs(sources.count("synthetic") / len(sources) - 1 / 3) < 0.05, shard.name

    # Real rows are the prepared real data; each real row appears once.
    prepared = open_prepared(ingest(DataConfig(source=str(real_digits), resolution=16, channels=1)).location)
    real = [row for row in rows if row["source"] == "real"]
    assert sorted(row["index"] for row in real) == list(range(NUM_REAL))
    for row in real:
        image, label = prepared.gather(np.array([row["index"]]))
        assert (np.asarray(row["image"])[:, :, None] == image[0]).all() and row["label"] == label[0]
        assert row["seed"] is None
    # Synthetic rows regenerate from their seed and label, bit for bit.
    loaded = load_generator(str(tiny_conditional_run))
    synthetic = [row for row in rows if row["source"] == "synthetic"]
    assert sorted(row["index"] for row in synthetic) == list(range(30))
    again = generate(loaded.generator, loaded.spec, [row["seed"] for row in synthetic],
                     [row["label"] for row in synthetic])
    assert all((np.asarray(row["image"])[:, :, None] == again[i].numpy()).all() for i, row in enumerate(synthetic))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_rows"] == 90 and [s["rows"] for s in manifest["shards"]] == [40, 40, 10]
    assert sum(s["synthetic_rows"] for s in manifest["shards"]) == 30
    assert (out / "README.md").read_text().startswith("---")

    # A rerun finds every shard committed and writes nothing.
    again_summary = last_json(run_cli(*args).stdout)
    assert again_summary["shards_written"] == 0 and again_summary["num_images"] == 90


def test_augment_from_a_finished_export_takes_its_rows_in_index_order(
        tiny_run: Path, real_digits: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    export(str(tiny_run), ExportConfig(num_images=50, out=str(exported), shard_size=20), progress=False)
    out = tmp_path / "mixed"
    result = augment(str(real_digits), str(exported), 0.75, str(out), shard_size=100)
    assert (result["num_real"], result["num_synthetic"]) == (60, 45)
    mixed = read_rows(out)
    synthetic = mixed.filter(np.asarray(mixed.column("source").to_pylist()) == "synthetic").sort_by("index")
    source = read_rows(exported).slice(0, 45)
    assert synthetic.column("index").to_pylist() == list(range(45))
    assert synthetic.column("seed").to_pylist() == source.column("seed").to_pylist()
    assert [pixels(b).tobytes() for b in synthetic.column("image").combine_chunks().field("bytes").to_pylist()] == \
        [pixels(b).tobytes() for b in source.column("image").combine_chunks().field("bytes").to_pylist()]
    # The unconditional export has no labels: the real rows keep theirs, synthetic rows get none.
    assert result["warnings"] and all(v is None for v in synthetic.column("label").to_pylist())


def test_augment_rejects_bad_input(tiny_run: Path, real_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    for extra, message in [(["--ratio", "0"], "--ratio"), (["--ratio", "100"], "needs 6000")]:
        synthetic = str(tmp_path / "small") if message == "needs 6000" else str(tiny_run)
        if message == "needs 6000":
            export(str(tiny_run), ExportConfig(num_images=10, out=synthetic, shard_size=10), progress=False)
        result = run_cli("augment", "--real", str(real_digits), "--synthetic", synthetic, *extra, "--out", str(out))
        errors = error_lines(result.stderr)
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-1000:]
    assert not (out / "manifest.json").exists()

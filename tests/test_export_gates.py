"""Export from the registry, and the optional quality gates: the discriminator gate and the
memorisation check drop exactly the rows their rules name, the manifest and gated_rows.jsonl say
what was dropped and why, and the rows kept stay reproducible from their seeds."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ganpipe import checkpoint
from ganpipe.config import ExportConfig
from ganpipe.errors import UserError
from ganpipe.export import export
from ganpipe.generators import load_generator
from ganpipe.networks import build_discriminator, generate
from ganpipe.synthetic_rows import row_seed
from tests.conftest import write_config
from tests.test_export import image_bytes, pixels, read_rows


def gated_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gated_rows.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_registry_export_discriminator_gate_and_pyfunc_regeneration(tiny_run: Path, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from ganpipe import tracking
    from ganpipe.registry import register_run

    registered = register_run(tiny_run, "tiny-export")
    tracking.configure_mlflow()
    client = MlflowClient()
    client.set_registered_model_alias("tiny-export", "champion", registered["version"])

    out = tmp_path / "gated"
    result = export("models:/tiny-export@champion",
                    ExportConfig(num_images=300, out=str(out), shard_size=128, seed=0, drop_lowest_d=0.25),
                    progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_uri"] == f"models:/tiny-export/{registered['version']}"
    assert manifest["model"]["name"] == "tiny-export" and manifest["model"]["run_dir"] == str(tiny_run)
    gate = manifest["gates"]["discriminator"]
    assert gate["checkpoint"] == str(checkpoint.latest_checkpoint(tiny_run)) and gate["fraction"] == 0.25
    threshold = gate["thresholds"][0]

    # Score every candidate row independently with the run's discriminator: the dropped rows are
    # exactly those below the recorded threshold (the 0.25-quantile over 4096 calibration rows).
    loaded = load_generator(str(tiny_run))
    candidates = generate(loaded.generator, loaded.spec, row_seed(0, np.arange(300)).tolist())
    discriminator = build_discriminator(loaded.spec)
    discriminator.load_state_dict(load_file(str(Path(gate["checkpoint"]) / "D.safetensors")))
    with torch.no_grad():
        scores = discriminator.eval()(candidates.permute(0, 3, 1, 2).float() / 127.5 - 1.0).double().numpy()
    clearly_low, clearly_high = scores < threshold - 1e-4, scores > threshold + 1e-4
    gated = gated_rows(out)
    dropped = {row["index"] for row in gated if row["dropped"]}
    assert set(np.flatnonzero(clearly_low)) <= dropped and not dropped & set(np.flatnonzero(clearly_high))
    assert all(r["reasons"][0]["gate"] == "discriminator" and r["reasons"][0]["score"] < threshold for r in gated)
    assert 45 <= len(dropped) <= 105 and result["num_dropped"] == len(dropped) == manifest["gates"]["num_dropped"]
    assert result["num_images"] == 300 - len(dropped)

    # The rows kept are the candidates minus the dropped, each regenerated exactly by the
    # registered pyfunc from its seed.
    table = read_rows(out)
    assert table.column("index").to_pylist() == sorted(set(range(300)) - dropped)
    model = mlflow.pyfunc.load_model("models:/tiny-export@champion")
    again = model.predict(pd.DataFrame({"seed": table.column("seed").to_pylist()}))
    assert all((pixels(png) == image).all() for png, image in zip(image_bytes(table), again, strict=True))

    # Without the version's ganpipe.run_dir tag there is no discriminator to ask: a clear error.
    client.delete_model_version_tag("tiny-export", str(registered["version"]), "ganpipe.run_dir")
    with pytest.raises(UserError, match="no ganpipe.run_dir tag"):
        export("models:/tiny-export@champion",
               ExportConfig(num_images=50, out=str(tmp_path / "untagged"), drop_lowest_d=0.1), progress=False)


@pytest.mark.slow
def test_memorisation_check_finds_exactly_the_planted_training_copies(tiny_run: Path, tmp_path: Path) -> None:
    """Plant three exported rows in a copy of the run's training data; the check must name exactly
    those rows, with the planted training examples as their nearest neighbours."""
    import datasets

    from ganpipe.config import DataConfig
    from ganpipe.data import ingest, open_prepared

    plain = tmp_path / "plain"
    export(str(tiny_run), ExportConfig(num_images=40, out=str(plain), shard_size=40), progress=False)
    planted_rows = [3, 17, 31]
    planted = np.stack([pixels(image_bytes(read_rows(plain))[i]) for i in planted_rows])

    run = json.loads((tiny_run / "run.json").read_text())
    images, labels = open_prepared(run["data"]["location"]).load_all()
    images, labels = np.concatenate([images, planted]), np.concatenate([labels, [0, 0, 0]])
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[:, :, 0]).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features) \
        .save_to_disk(str(tmp_path / "training-with-copies"))
    prepared = ingest(DataConfig(source=str(tmp_path / "training-with-copies"), resolution=16, channels=1))

    copy = tmp_path / "run-copy"
    shutil.copytree(tiny_run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["data"]["location"] = prepared.location
    (copy / "run.json").write_text(json.dumps(info))

    out = tmp_path / "checked"
    result = export(str(copy), ExportConfig(num_images=40, out=str(out), shard_size=16, memorisation_check="drop",
                                            near_copy_ratio=0.01), progress=False)
    gated = gated_rows(out)
    # The 20-step test generator makes near-identical blobs, whose ratios sit at 0.035-0.05: the
    # planted exact copies (~1e-7) are told apart from them by a threshold of 0.01.
    assert [row["index"] for row in gated] == planted_rows and all(row["dropped"] for row in gated), \
        [(row["index"], row["reasons"][0]["ratio"]) for row in gated]
    for row, training_index in zip(gated, (1797, 1798, 1799), strict=True):
        reason = row["reasons"][0]
        assert reason["gate"] == "near_copy" and reason["training_index"] == training_index
        assert reason["ratio"] < 1e-3
    assert read_rows(out).column("index").to_pylist() == [i for i in range(40) if i not in planted_rows]
    assert read_rows(out).equals(read_rows(plain).filter(np.isin(np.arange(40), planted_rows, invert=True)))
    manifest = json.loads((out / "manifest.json").read_text())
    memorisation = manifest["gates"]["memorisation"]
    assert memorisation["training_rows"] == 1800 and memorisation["scale"] > 0
    totals = manifest["gates"]["totals"]["memorisation"]
    assert totals["near_copies"] == totals["dropped"] == 3 == result["num_dropped"]
    assert totals["min_ratio"] == min(r["reasons"][0]["ratio"] for r in gated)

    # Report mode lists the same rows and keeps them all.
    reported = tmp_path / "reported"
    result = export(str(copy), ExportConfig(num_images=40, out=str(reported), shard_size=16,
                                            memorisation_check="report", near_copy_ratio=0.01), progress=False)
    assert result["num_images"] == 40 and result["num_dropped"] == 0
    assert [(r["index"], r["dropped"]) for r in gated_rows(reported)] == [(i, False) for i in planted_rows]


def test_the_pipeline_export_task_honours_the_gate_keys(tiny_run: Path, tmp_path: Path) -> None:
    """export.drop_lowest_d in a pipeline config gates the flows' export as the flag gates the CLI's."""
    from flows.pipeline import export_task

    config = write_config(tmp_path / "pipeline.yaml", "data: {source: builtin:digits, resolution: 16}\n"
                          "export: {num_images: 64, shard_size: 32, drop_lowest_d: 0.25}\n")
    out = tmp_path / "gated"
    result = export_task.fn(str(tiny_run), str(out), str(config), ["export.seed=2"], None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gate_settings"] == {"drop_lowest_d": 0.25, "memorisation": "off", "near_copy_ratio": 0.25}
    assert manifest["gates"]["discriminator"]["fraction"] == 0.25 and manifest["seed"] == 2
    dropped = [row["index"] for row in gated_rows(out) if row["dropped"]]
    assert dropped and result["num_dropped"] == len(dropped) and result["num_images"] == 64 - len(dropped)

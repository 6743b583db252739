"""Serving super-resolution models: tiled inference (tiled = untiled), channel layouts, the
registered pyfunc (encoded images of any size in, one array per row out), the PSNR-stage
generator registered on its own, and bulk export of a dataset (`export --input`), resumable."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ganpipe.config import ExportConfig
from ganpipe.networks import NetworkSpec, build_generator, upscale
from ganpipe.networks.upscale import image_array, receptive_radius, super_resolve_image, upscaled_tiles
from tests.conftest import GANPIPE, ROOT, error_lines, last_json, run_cli, write_config
from tests.fixtures import write_photo_folder
from tests.test_srgan import sr_config


def cli_run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`ganpipe ARGS` in this process (a fresh interpreter costs seconds of imports per call)."""
    from ganpipe import cli

    capsys.readouterr()
    code = cli.run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def random_generator(channels: int = 3, scale: int = 2, blocks: int = 2) -> tuple[torch.nn.Module, NetworkSpec]:
    spec = NetworkSpec(family="srgan", sample_shape=(channels, 32, 32), latent_dim=0, g_width=16, scale=scale,
                       sr_blocks=blocks)
    torch.manual_seed(0)
    return build_generator(spec).eval(), spec


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def noise(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# --- tiles -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("scale", "blocks"), [(2, 1), (4, 3), (8, 2)])
def test_the_overlap_covers_the_generators_receptive_field(scale: int, blocks: int) -> None:
    """The inputs one output pixel depends on (where its gradient is non-zero) lie within
    receptive_radius of it: the margin every tile is run with."""
    g, spec = random_generator(scale=scale, blocks=blocks)
    g.train()  # no output clamp: every dependency shows in the gradient
    x = torch.zeros(1, 3, 45, 45, requires_grad=True)
    g(x)[0, :, 22 * scale:23 * scale, 22 * scale:23 * scale].sum().backward()
    reach = int((x.grad.abs().sum(1)[0] > 0).nonzero().sub(22).abs().max())
    assert 2 * blocks + 8 <= reach <= receptive_radius(spec) == 2 * blocks + 9


def upscale_network_space(generator: torch.nn.Module, spec: NetworkSpec, x: torch.Tensor, tile: int) -> torch.Tensor:
    """The tiles' float outputs put together (the library converts each to uint8 at once)."""
    s = spec.scale
    out = torch.empty((x.shape[0], spec.sample_shape[0], x.shape[2] * s, x.shape[3] * s))
    for (top, bottom, left, right), y in upscaled_tiles(generator, spec, x, tile):
        out[:, :, top * s:bottom * s, left * s:right * s] = y
    return out


def test_tiled_output_equals_untiled_up_to_float_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tolerance: 1e-5 in network space (float rounding of convolutions of other shapes), and
    the uint8 images equal. With too small a margin the same comparison fails: the test can."""
    g, spec = random_generator()
    x = torch.rand(1, 3, 40, 37, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = upscale_network_space(g, spec, x, tile=1000)
    assert whole.shape == (1, 3, 80, 74)
    for tile in (16, 25):
        assert (upscale_network_space(g, spec, x, tile=tile) - whole).abs().max() < 1e-5
    image = noise(40, 37, 3)
    assert np.array_equal(super_resolve_image(g, spec, image, tile=16), super_resolve_image(g, spec, image, tile=1000))
    monkeypatch.setattr(upscale, "receptive_radius", lambda spec: 3)
    assert (upscale_network_space(g, spec, x, tile=16) - whole).abs().max() > 1e-2


def test_channels_greyscale_and_alpha_keep_the_inputs_layout() -> None:
    g, spec = random_generator()
    rgba = noise(9, 13, 4)
    out = super_resolve_image(g, spec, rgba)
    assert out.shape == (18, 26, 4)
    assert np.array_equal(out[:, :, :3], super_resolve_image(g, spec, rgba[:, :, :3]))
    assert np.array_equal(out[:, :, 3], upscale.bicubic_upscale_channel(rgba[:, :, 3], 2))
    flat = np.full((9, 13, 4), 200, np.uint8)
    assert (super_resolve_image(g, spec, flat)[:, :, 3] == 200).all()  # alpha: bicubic of a constant is it
    grey = noise(11, 7, 1)
    grey_out = super_resolve_image(g, spec, grey)
    as_rgb = super_resolve_image(g, spec, np.repeat(grey, 3, axis=2))
    expected = np.asarray(Image.fromarray(as_rgb).convert("L"))  # PIL's luma
    assert grey_out.shape == (22, 14, 1) and np.array_equal(grey_out[:, :, 0], expected)
    g1, spec1 = random_generator(channels=1)
    rgb = noise(5, 6, 3)
    colour = super_resolve_image(g1, spec1, rgb)
    assert colour.shape == (10, 12, 3)
    assert all(np.array_equal(colour[:, :, c:c + 1], super_resolve_image(g1, spec1, rgb[:, :, c:c + 1]))
               for c in range(3))
    palette = Image.fromarray(noise(4, 4, 3)).convert("P")
    palette.info["transparency"] = 0
    assert image_array(palette).shape == (4, 4, 4) and image_array(Image.new("1", (3, 2))).shape == (2, 3, 1)
    assert image_array(Image.fromarray(np.full((2, 2), 65535, np.uint16))).max() == 255  # 16-bit scaled


# --- a tiny super-resolution run: registry and export -------------------------------------------------

@pytest.fixture(scope="module")
def sr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, evaluated tiny srgan run (with its PSNR-stage generator) in its own home."""
    from ganpipe import runs
    from ganpipe.config_files import load_config
    from ganpipe.evaluate import evaluate_run
    from ganpipe.launch import launch_training

    home = tmp_path_factory.mktemp("sr-home")
    photos = write_photo_folder(home / "photos", count=20)
    config = write_config(home / "sr.yaml", sr_config(photos))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANPIPE_HOME", str(home))
        run_dir = Path(launch_training(load_config(config), resume="auto")["run_dir"])
        evaluate_run(run_dir, runs.load_run_config(run_dir))
    return run_dir


def test_register_both_stages_and_the_pyfunc_super_resolves_any_image(sr_run: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    import mlflow
    import pandas as pd

    from ganpipe.generators import read_generator
    from ganpipe.registry import register_run

    run = shutil.copytree(sr_run, tmp_path / sr_run.name)
    final = register_run(run)
    assert final["name"] == "sr-test" and final["aliases"] == ["champion"]
    assert Path(final["sample_grid"]).exists()  # rows of bicubic / super-resolved / original crops
    code, stdout, stderr = cli_run(capsys, "register", "--run", str(run), "--stage", "psnr", "--json")
    assert code == 0, stderr[-2000:]
    psnr_version = last_json(stdout)
    assert psnr_version["name"] == "sr-test-psnr" and psnr_version["aliases"] == ["champion"]
    evaluation = json.loads((run / "evaluation-psnr.json").read_text())
    assert evaluation["generator_sha256"] == read_generator(run / "generator-psnr").weights_sha256
    assert evaluation["metrics"]["psnr"]["value"] > 0

    model = mlflow.pyfunc.load_model(final["model_uri"])
    generator, spec, _, _ = read_generator(run / "generator")
    images = [noise(13, 9, 3), noise(7, 5, 1, seed=1), noise(6, 11, 4, seed=2), noise(40, 30, 3, seed=3)]
    encoded = [png(images[0]), png(images[1]), png(images[2], "RGBA"), png(images[3], fmt="JPEG")]
    outputs = model.predict(pd.DataFrame({"image": encoded}))
    assert [o.shape for o in outputs] == [(26, 18, 3), (14, 10, 1), (12, 22, 4), (80, 60, 3)]
    assert all(o.dtype == np.uint8 for o in outputs)
    for i in range(3):  # lossless inputs: exactly what the library computes
        assert np.array_equal(outputs[i], super_resolve_image(generator, spec, images[i]))
    tiled = model.predict(pd.DataFrame({"image": encoded[3:]}), params={"tile": 8})
    assert np.array_equal(tiled[0], outputs[3])
    with pytest.raises(Exception, match=r"row 1: cannot super-resolve this image \(UnidentifiedImageError"):
        model.predict(pd.DataFrame({"image": [encoded[0], b"not an image"]}))

    code, _, stderr = cli_run(capsys, "register", "--run", str(run), "--stage", "best")
    assert code == 2 and error_lines(stderr) == ["error: --stage 'best': expected one of final, psnr"]


def exported_rows(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("data/*.parquet"))])


def write_parquet_input(path: Path, count: int) -> list[np.ndarray]:
    """A parquet dataset of PNGs (sizes vary, one greyscale) with a caption column."""
    images = [noise(5 + i % 4, 6 + i % 3, 1 if i == 3 else 3, seed=i) for i in range(count)]
    table = pa.table({"image": [{"bytes": png(im), "path": None} for im in images],
                      "caption": [f"photo {i}" for i in range(count)]})
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    pq.write_table(table.cast(features.arrow_schema).replace_schema_metadata(features.arrow_schema.metadata), path)
    return images


def test_export_super_resolves_every_row_keeping_its_columns(sr_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    import datasets

    from ganpipe.generators import read_generator

    source = tmp_path / "input.parquet"
    images = write_parquet_input(source, 11)
    out = tmp_path / "sr"
    code, stdout, stderr = cli_run(capsys, "export", "--model", str(sr_run), "--input", str(source), "--out", str(out),
                                   "--shard-size", "4", "--json")
    assert code == 0, stderr[-2000:]
    result = last_json(stdout)
    assert result["num_images"] == 11 and result["num_shards"] == 3 and result["shards_written"] == 3
    assert [line for line in stderr.splitlines() if line.startswith("export: ")][-1].startswith(
        "export: 11/11 rows (100%)")
    rows = datasets.load_dataset("parquet", data_files=str(out / "data/*.parquet"), split="train")
    assert rows.column_names == ["image", "source_index", "caption"]
    assert rows["source_index"] == list(range(11)) and rows["caption"] == [f"photo {i}" for i in range(11)]
    generator, spec, _, _ = read_generator(sr_run / "generator")
    for i in (0, 3, 10):
        got = np.asarray(rows[i]["image"])
        got = got[:, :, None] if got.ndim == 2 else got
        assert np.array_equal(got, super_resolve_image(generator, spec, images[i]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_rows"] == 11 and [s["rows"] for s in manifest["shards"]] == [4, 4, 3]
    code, stdout, _ = cli_run(capsys, "export", "--model", str(sr_run), "--input", str(source), "--out", str(out),
                              "--shard-size", "4", "--json")
    assert code == 0 and last_json(stdout)["shards_written"] == 0  # idempotent

    folder = write_photo_folder(tmp_path / "folder", count=3)  # an image folder is a source too
    code, stdout, stderr = cli_run(capsys, "export", "--model", str(sr_run), "--input", str(folder), "--out",
                                   str(tmp_path / "f"), "--json")
    assert code == 0 and last_json(stdout)["num_images"] == 3, stderr


def test_export_bad_input_exits_2_with_one_error_line(sr_run: Path, tiny_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "input.parquet"
    write_parquet_input(source, 3)
    cases = [
        (["--model", str(tiny_run), "--input", str(source)],
         f"error: --input: {tiny_run} is a dcgan generator, which samples from seeds; --input takes a "
         "super-resolution model (model.family srgan); use --num-images for this one"),
        (["--model", str(sr_run), "--num-images", "5"],
         f"error: --num-images: {sr_run} is a srgan generator, which super-resolves images rather than sampling "
         "them; give --input SOURCE (the dataset to super-resolve) and no --num-images"),
        (["--model", str(sr_run), "--input", str(source), "--num-images", "5"],
         "error: --num-images (export.num_images): a super-resolution export writes one row per image of --input; "
         "leave --num-images out"),
    ]
    for k, (args, message) in enumerate(cases):
        code, _, stderr = cli_run(capsys, "export", *args, "--out", str(tmp_path / f"out{k}"))
        assert code == 2 and error_lines(stderr) == [message], stderr[-2000:]
    broken = pa.table({"image": [{"bytes": png(noise(4, 4, 3)), "path": None}, {"bytes": b"junk", "path": None}]})
    pq.write_table(broken, tmp_path / "broken.parquet")
    code, _, stderr = cli_run(capsys, "export", "--model", str(sr_run), "--input", str(tmp_path / "broken.parquet"),
                              "--image-column", "image", "--out", str(tmp_path / "b"))
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and "row 1: cannot super-resolve this image" in lines[0], stderr[-2000:]


@pytest.mark.slow
def test_export_killed_part_way_reruns_to_the_uninterrupted_rows(sr_run: Path, tmp_path: Path) -> None:
    from ganpipe.sr_export import export_super_resolved

    source = tmp_path / "input.parquet"
    write_parquet_input(source, 60)
    reference = tmp_path / "reference"
    export_super_resolved(str(sr_run), ExportConfig(input=str(source), out=str(reference), shard_size=5),
                          progress=False)
    out = tmp_path / "killed"
    args = ["export", "--model", str(sr_run), "--input", str(source), "--out", str(out), "--shard-size", "5"]
    proc = subprocess.Popen([*GANPIPE, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / ".shards").glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list((out / ".shards").glob("*.json")))
    assert 0 < committed < 12 and not (out / "manifest.json").exists()
    rerun = run_cli(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert last_json(rerun.stdout)["shards_written"] == 12 - committed
    assert exported_rows(out).equals(exported_rows(reference))
    assert exported_rows(out).column("source_index").to_pylist() == list(range(60))


# --- the pipeline, as a user runs it -----------------------------------------------------------------

@pytest.mark.slow
def test_the_pipeline_runs_the_shipped_sr_config_and_exports_the_held_out_images(tmp_path: Path,
                                                                                  ganpipe_home: Path) -> None:
    """configs/srgan-x2.yaml unchanged but for its step counts: ingest -> train -> evaluate ->
    register -> export, whose rows are the held-out images super-resolved; the registered model
    loads and super-resolves in a process without ganpipe."""
    import datasets

    steps = ["train.pretrain_steps=3", "train.critic_pretrain_steps=2", "train.steps=2", "train.checkpoint_every=100",
             "train.sample_every=100", "train.log_every=1"]
    result = run_cli("pipeline", str(ROOT / "configs" / "srgan-x2.yaml"), *[a for s in steps for a in ("--set", s)],
                     "--json", env={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["model_uri"] == "models:/photos-srgan-x2/1" and summary["aliases"] == ["champion"]
    assert summary["metrics"]["psnr"]["value"] > 0 and summary["metrics"]["psnr_bicubic"]["value"] > 0
    export = summary["export"]
    assert export["num_images"] == 5 and export["input"].startswith("the held-out images of ")  # 10% of 48 tiles
    rows = datasets.load_dataset("parquet", data_files=str(Path(export["out"]) / "data/*.parquet"), split="train")
    from ganpipe.data.pairs import holdout_split

    assert rows["source_index"] == holdout_split(48, 0.1)[1].tolist()
    script = f"""
import io, sys, mlflow, numpy as np, pandas as pd
from PIL import Image
mlflow.set_tracking_uri("sqlite:///{ganpipe_home}/mlflow.db")
model = mlflow.pyfunc.load_model("models:/photos-srgan-x2@champion")
assert "ganpipe" not in sys.modules
buffer = io.BytesIO()
Image.fromarray(np.zeros((21, 17, 3), np.uint8)).save(buffer, format="PNG")
out = model.predict(pd.DataFrame({{"image": [buffer.getvalue()]}}))
assert len(out) == 1 and out[0].shape == (42, 34, 3) and out[0].dtype == np.uint8, out[0].shape
print("ok")
"""
    check = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stderr[-3000:]

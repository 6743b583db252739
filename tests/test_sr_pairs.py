"""Paired super-resolution data (data.lr_column, data.hr_column: Div2k-style datasets): both images
kept at their own sizes, aligned training crops, evaluation on the given LR images, and the pairs
and keys that are refused. All data is made here: parquet with encoded images, parquet with paths
beside it (as eugenesiow/Div2k's `lr`/`hr` path columns), an image folder with metadata."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ganpipe.config_files import load_config
from ganpipe.data import ingest, open_prepared
from ganpipe.data.pairs import bicubic_downscale, evaluation_pair, training_pairs
from ganpipe.errors import UserError
from tests.conftest import error_lines, run_cli, write_config

SCALE = 2
ROOT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "div2k-x4.yaml"


def blocky_pair(rng: np.random.Generator, lr_height: int, lr_width: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) where the HR image is the random LR image with every pixel made a SCALE x SCALE
    block: an HR crop at a multiple of SCALE, under any flip or rotation, subsampled by SCALE is
    exactly the LR crop it covers, and nothing else in the image is; and LR is not what bicubic
    degradation would make of HR, so the LR column is what training must use."""
    lr = rng.integers(0, 256, (lr_height, lr_width, 3), dtype=np.uint8)
    return np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1), lr


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def pairs(count: int = 12, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [blocky_pair(rng, int(rng.integers(8, 20)), int(rng.integers(8, 20))) for _ in range(count)]


def write_parquet(path: Path, rows: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Encoded images in Hugging Face's Image struct ({bytes, path}), columns `hr` and `lr`."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"hr": pa.array([{"bytes": png(h), "path": None} for h, _ in rows], image),
                      "lr": pa.array([{"bytes": png(s), "path": None} for _, s in rows], image)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_path_table(folder: Path, rows: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Div2k's layout: PNG files in HR/ and LR/ folders, a table of their relative paths."""
    for sub in ("HR", "LR"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (hr, lr) in enumerate(rows):
        Image.fromarray(hr).save(folder / "HR" / f"{i:04d}.png")
        Image.fromarray(lr).save(folder / "LR" / f"{i:04d}x{SCALE}.png")
    pq.write_table(pa.table({"lr": [f"LR/{i:04d}x{SCALE}.png" for i in range(len(rows))],
                             "hr": [f"HR/{i:04d}.png" for i in range(len(rows))]}), folder / "pairs.parquet")
    return folder


def write_image_folder(folder: Path, rows: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """An image folder whose metadata.csv pairs its files (`hr_file_name`, `lr_file_name`: the
    columns `hr` and `lr` to `datasets`)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["hr_file_name,lr_file_name"]
    for i, (hr, lr) in enumerate(rows):
        Image.fromarray(hr).save(folder / f"hr-{i:04d}.png")
        Image.fromarray(lr).save(folder / f"lr-{i:04d}.png")
        lines.append(f"hr-{i:04d}.png,lr-{i:04d}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def paired_config(source: Path, extra: str = "") -> str:
    return f"""
seed: 1
data: {{source: {source}, resolution: 16, lr_column: lr, hr_column: hr{extra}}}
model: {{family: srgan, scale: {SCALE}, g_width: 8, d_width: 8, sr_blocks: 1}}
eval: {{metrics: [psnr, ssim]}}
register: {{name: sr-pairs, primary_metric: psnr}}
train: {{pretrain_steps: 2, critic_pretrain_steps: 1, steps: 1, batch_size: 4, cpu: true, best_metric: none,
         checkpoint_every: 100, sample_every: 100, log_every: 1}}
"""


@pytest.mark.parametrize("layout", ["parquet", "paths", "imagefolder"])
def test_ingest_keeps_both_images_of_each_pair_at_their_own_sizes(tmp_path: Path, layout: str) -> None:
    rows = pairs()
    source = {"parquet": lambda: write_parquet(tmp_path / "data" / "pairs.parquet", rows),
              "paths": lambda: write_path_table(tmp_path / "div2k", rows),
              "imagefolder": lambda: write_image_folder(tmp_path / "folder", rows)}[layout]()
    cfg = load_config(write_config(tmp_path / "c.yaml", paired_config(source)))
    assert cfg.data.paired and cfg.data.pair_scale == SCALE
    data = open_prepared(ingest(cfg.data).location)
    assert data.native and data.paired and data.num_records == len(rows)
    for i, (hr, lr) in enumerate(rows):
        assert np.array_equal(data.image(i), hr) and np.array_equal(data.lr_image(i), lr)


def test_training_crops_pairs_aligned_and_evaluation_uses_the_given_lr_images(tmp_path: Path) -> None:
    rows = pairs()
    cfg = load_config(write_config(tmp_path / "c.yaml", paired_config(write_parquet(tmp_path / "p.parquet", rows))))
    data = open_prepared(ingest(cfg.data).location)
    indices = np.arange(len(rows)).repeat(3)
    hr, lr = training_pairs(data, indices, 16, SCALE, "bicubic", (1, 0, 0, 0))
    assert hr.shape == (36, 16, 16, 3) and lr.shape == (36, 8, 8, 3)
    symmetries = set()
    for index, hr_crop, lr_crop in zip(indices, hr, lr, strict=True):
        assert np.array_equal(hr_crop[::SCALE, ::SCALE], lr_crop)  # aligned: the LR crop is the HR crop's
        # ... and it is a window of the pair's own LR image under one of the eight symmetries
        image = rows[index][1]
        found = [(flip, k) for flip in (0, 1) for k in range(4) for t in range(image.shape[0] - 7)
                 for x in range(image.shape[1] - 7)
                 if np.array_equal(np.rot90(image[t:t + 8, x:x + 8][:, ::-1] if flip else image[t:t + 8, x:x + 8], k),
                                   lr_crop)]
        assert found, index
        symmetries.add(found[0])
        assert not np.array_equal(lr_crop, bicubic_downscale(hr_crop, SCALE))  # not degraded: the column's
    assert len(symmetries) >= 4  # flips and rotations are drawn, for both images alike
    again, _ = training_pairs(data, indices, 16, SCALE, "bicubic", (1, 0, 0, 0))
    assert np.array_equal(hr, again)  # keyed: a resumed run draws the same crops
    odd = tmp_path / "odd.parquet"  # an HR image one pixel longer than LR x scale is cropped for evaluation
    hr_odd, lr_odd = rows[0][0], rows[0][1]
    write_parquet(odd, [(np.concatenate([hr_odd, hr_odd[-1:]], axis=0), lr_odd)] * 3)
    cfg = load_config(write_config(tmp_path / "odd.yaml", paired_config(odd)))
    hr_eval, lr_eval = evaluation_pair(open_prepared(ingest(cfg.data).location), 0, SCALE, "bicubic")
    assert np.array_equal(hr_eval, hr_odd) and np.array_equal(lr_eval, lr_odd)


def test_a_run_on_paired_data_trains_every_stage_and_evaluates_on_the_given_pairs(tmp_path: Path) -> None:
    from ganpipe.metrics.sr import evaluate_super_resolution
    from ganpipe.sr_trainer import SRTrainer
    from tests.fixtures import new_run_dir, one_torch_thread

    rows = pairs(count=20)
    cfg = load_config(write_config(tmp_path / "c.yaml", paired_config(write_parquet(tmp_path / "p.parquet", rows))))
    with one_torch_thread():
        trainer = SRTrainer(cfg, new_run_dir(cfg))
        assert trainer.data.paired
        stages = []
        while trainer.step < trainer.total_steps:
            stages.append(trainer.stage())
            trainer.iteration()
            trainer.step += 1
        assert stages == ["pretrain", "pretrain", "critic", "adversarial"]
        assert trainer.preview_images().shape == (3 * 2, 16, 16, 3)  # two held-out images: bicubic, SR, original
        held = trainer.holdout_indices
        result = evaluate_super_resolution(trainer.nets.ema, trainer.spec, trainer.data, held, "bicubic", ["psnr"])
    from ganpipe.data.pairs import bicubic_upscale
    from ganpipe.metrics.sr import psnr

    expected = np.mean([psnr(bicubic_upscale(rows[i][1], SCALE), rows[i][0], SCALE, True) for i in held])
    assert result["psnr"]["num_images"] == 2 and result["psnr"]["bicubic"] == pytest.approx(expected, abs=1e-9)


def test_a_pair_whose_sizes_do_not_match_the_scale_exits_2_naming_its_row(tmp_path: Path) -> None:
    rows = pairs(count=6)
    hr, lr = rows[3]
    rows[3] = (hr, lr[:-1])  # one LR row short: not HR // 2
    source = write_parquet(tmp_path / "p.parquet", rows)
    result = run_cli("ingest", str(write_config(tmp_path / "c.yaml", paired_config(source))))
    assert result.returncode == 2, result.stderr
    height, width = hr.shape[:2]
    assert error_lines(result.stderr) == [
        f"error: parquet files {source}: row 3: LR image of {width // 2}x{height // 2 - 1} px does not match its HR "
        f"image of {width}x{height} px at model.scale 2 (expected {width // 2}x{height // 2} px) "
        "(set data.on_bad_record: skip to drop such rows)"], result.stderr
    cfg = load_config(write_config(tmp_path / "s.yaml", paired_config(source, ", on_bad_record: skip")))
    done = ingest(cfg.data)
    assert done.num_records == 5 and done.num_skipped == 1  # skipped, with the other rows kept in order
    assert np.array_equal(open_prepared(done.location).lr_image(3), rows[4][1])


@pytest.mark.parametrize(("extra", "overrides", "message"), [
    ("", ["data.hr_column=null"], "data.hr_column: paired data names both columns (data.lr_column is set)"),
    (", image_column: hr", [], "data.image_column: paired data names its columns with data.hr_column"),
    ("", ["model.family=dcgan", "data.resize=center_crop"], "data.lr_column: paired (LR, HR) data is for model.family"),
    (", degradation: crappify", [], "data.degradation: paired data brings its LR images (data.lr_column)"),
])
def test_paired_keys_that_do_not_go_together_are_refused_naming_the_key(tmp_path: Path, extra: str,
                                                                       overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write_config(tmp_path / "c.yaml", paired_config(tmp_path, extra)), overrides)


def test_a_pair_column_that_is_not_there_is_refused_naming_the_key(tmp_path: Path) -> None:
    source = write_parquet(tmp_path / "p.parquet", pairs(count=3))
    cfg = load_config(write_config(tmp_path / "c.yaml", paired_config(source).replace("lr_column: lr", "lr_column: low")))
    with pytest.raises(UserError, match=r"data.lr_column: column 'low' not found \(columns: hr, lr\)"):
        ingest(cfg.data)


def test_the_div2k_config_loads_builds_its_networks_and_gives_the_published_anchors(tmp_path: Path) -> None:
    """configs/div2k-x4.yaml needs the hub: here it loads, is paired at x4 and evaluated the
    BasicSR way, its networks build for data of DIV2K's shape, and its comments give the anchors."""
    import json

    from ganpipe.data import PreparedData
    from ganpipe.networks import build_discriminator, build_generator
    from ganpipe.recipe import network_spec
    from tests.conftest import ROOT

    path = ROOT / "configs" / "div2k-x4.yaml"
    cfg = load_config(path)
    d = cfg.data
    assert (d.source, d.config_name, d.lr_column, d.hr_column, d.resize) == (
        "eugenesiow/Div2k", "bicubic_x4", "lr", "hr", "native")
    assert d.paired and d.pair_scale == 4 == cfg.model.scale and d.resolution % (4 * 4) == 0
    assert cfg.eval.metrics == ["psnr", "ssim"] and cfg.eval.sr_y_channel and cfg.registry.primary_metric == "psnr"
    (tmp_path / "meta.json").write_text(json.dumps({
        "kind": "image", "resolution": d.resolution, "channels": 3, "num_records": 800, "fingerprint": "x",
        "classes": None, "shards": [], "resize": "native", "paired": True}))
    spec = network_spec(cfg, PreparedData(tmp_path))
    assert spec.family == "srgan" and spec.scale == 4 and spec.sample_shape == (3, 128, 128)
    import torch

    with torch.no_grad():
        assert build_generator(spec)(torch.zeros(1, 3, 8, 12)).shape == (1, 3, 32, 48)
        assert build_discriminator(spec)(torch.zeros(2, 3, 128, 128)).shape == (2,)
    comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    for anchor in ("bicubic 28.43 dB", "32.05 dB / SSIM 0.902", "SRGAN 29.40 dB", "Y channel", "4 px of border"):
        assert anchor in comments


def test_a_loading_script_hub_dataset_is_refused_naming_data_source(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """eugenesiow/Div2k is a loading-script dataset, which `datasets` 4+ refuses with a RuntimeError:
    one UserError naming data.source and what to do, not a traceback (offline here: the hub is
    not asked, and load_dataset answers as datasets does for such a repository)."""
    import datasets

    def script_dataset(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Dataset scripts are no longer supported, but found Div2k.py")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", script_dataset)
    cfg = load_config(ROOT_CONFIG)
    with pytest.raises(UserError, match=r"^data.source: hub dataset eugenesiow/Div2k is a loading-script dataset "
                                        r"\(Dataset scripts are no longer supported, but found Div2k.py\)"):
        ingest(cfg.data)

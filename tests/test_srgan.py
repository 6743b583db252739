"""Super-resolution (model.family srgan): networks, native-size data, seeded crops and
degradations, the held-out split, PSNR/SSIM, the staged trainer and its resume, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ganpipe.config_files import load_config
from ganpipe.data import ingest, open_prepared
from ganpipe.data.pairs import (
    bicubic_downscale,
    bicubic_upscale,
    degrade,
    evaluation_pair,
    holdout_split,
    random_crop,
    training_pairs,
)
from ganpipe.errors import UserError
from ganpipe.metrics.sr import gaussian_window, psnr, ssim
from ganpipe.networks import NetworkSpec, build_discriminator, build_generator, check_spec, generate
from tests.conftest import error_lines, last_json, run_cli, write_config
from tests.fixtures import new_run_dir, write_photo_folder, write_random_lpips, write_random_vgg19


def sr_config(folder: Path, scale: int = 2, resolution: int = 16) -> str:
    return f"""
seed: 3
data: {{source: {folder}, resolution: {resolution}}}
model: {{family: srgan, scale: {scale}, g_width: 8, d_width: 8, sr_blocks: 1}}
eval: {{metrics: [psnr, ssim]}}
register: {{name: sr-test, primary_metric: psnr}}
train:
  pretrain_steps: 3
  critic_pretrain_steps: 2
  steps: 3
  batch_size: 4
  cpu: true
  best_metric: none
  checkpoint_every: 100
  sample_every: 100
  log_every: 1
"""


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_photo_folder(tmp_path / "photos", count=20)


# --- networks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2, 4, 8])
def test_generator_upscales_by_its_scale_and_discriminator_gives_one_logit(scale: int) -> None:
    spec = NetworkSpec(family="srgan", sample_shape=(3, 8 * scale, 8 * scale), latent_dim=0, g_width=8,
                       d_width=8, scale=scale, sr_blocks=2)
    g, d = build_generator(spec).eval(), build_discriminator(spec)
    lr = torch.rand(2, 3, 5, 7) * 2 - 1  # any size: fully convolutional
    out = g(lr)
    assert out.shape == (2, 3, 5 * scale, 7 * scale)
    assert out.min() >= -1 and out.max() <= 1
    assert d(torch.rand(3, 3, 8 * scale, 8 * scale)).shape == (3,)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())  # off by default (ESRGAN)
    with_bn = NetworkSpec(**{**spec.to_json(), "sample_shape": spec.sample_shape, "sr_batch_norm": True})
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_generator(with_bn).modules())


def test_image_to_image_generators_refuse_seeds_and_other_specs_keep_their_json() -> None:
    spec = NetworkSpec(family="srgan", sample_shape=(1, 16, 16), latent_dim=0, scale=2, sr_blocks=1, g_width=4)
    assert spec.image_to_image and spec.to_json()["scale"] == 2
    with pytest.raises(ValueError, match="maps images to images"):
        generate(build_generator(spec), spec, [0, 1])
    dcgan = NetworkSpec(family="dcgan", sample_shape=(1, 16, 16), latent_dim=8)
    assert not dcgan.image_to_image and "scale" not in dcgan.to_json()  # spec.json of other families unchanged
    with pytest.raises(ValueError, match="^data.resolution: srgan's training crop must be a multiple of 4 x"):
        check_spec(NetworkSpec(family="srgan", sample_shape=(3, 20, 20), latent_dim=0, scale=4))


# --- data: native sizes, degradation, crops, held-out split ----------------------------------------

def test_ingest_keeps_native_sizes_and_refuses_images_smaller_than_the_crop(tmp_path: Path, photos: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", sr_config(photos)))
    assert cfg.data.resize == "native" and cfg.data.holdout_fraction == 0.1
    data = open_prepared(ingest(cfg.data).location)
    assert data.native and data.num_records == 20 and data.sample_shape == (3, 16, 16)
    for i, path in enumerate(sorted(photos.iterdir())):
        assert np.array_equal(data.image(i), np.asarray(Image.open(path)))
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(photos / "photo-999-small.png")
    cfg = load_config(write_config(tmp_path / "c.yaml", sr_config(photos)))
    with pytest.raises(UserError, match=r"row 20: image of 40x12 px .*smaller than the data.resolution crop \(16 px\)"):
        ingest(cfg.data)


def test_bicubic_degradation_is_pils_bicubic_downscale_and_crops_align_with_their_inputs() -> None:
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(hr).resize((16, 12), Image.Resampling.BICUBIC))
    assert np.array_equal(degrade(hr, 2, "bicubic", rng), expected)
    assert np.array_equal(bicubic_downscale(hr[:, :, :1], 4)[:, :, 0],
                          np.asarray(Image.fromarray(hr[:, :, 0]).resize((8, 6), Image.Resampling.BICUBIC)))

    class Data:  # one native image
        paired = False

        def image(self, i: int) -> np.ndarray:
            return hr

    crops, inputs = training_pairs(Data(), np.array([0, 0, 0]), 16, 4, "bicubic", (1, 2))
    assert crops.shape == (3, 16, 16, 3) and inputs.shape == (3, 4, 4, 3)
    for crop, lr in zip(crops, inputs, strict=True):
        assert np.array_equal(lr, bicubic_downscale(crop, 4))  # each LR input is its own crop's
        # the crop is a flipped/rotated window of the image: some symmetry of it occurs in the image
        windows = [np.rot90(c, k) for c in (crop, crop[:, ::-1]) for k in range(4)]
        assert any(np.array_equal(w, hr[t:t + 16, x:x + 16]) for w in windows
                   for t in range(24 - 15) for x in range(32 - 15))
    again, _ = training_pairs(Data(), np.array([0, 0, 0]), 16, 4, "bicubic", (1, 2))
    other, _ = training_pairs(Data(), np.array([0, 0, 0]), 16, 4, "bicubic", (1, 3))
    assert np.array_equal(crops, again) and not np.array_equal(crops, other)


def test_crappify_is_seeded_and_degrades_more_than_bicubic() -> None:
    hr = np.asarray(Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
                    .resize((64, 64), Image.Resampling.BICUBIC))
    a = degrade(hr, 2, "crappify", np.random.default_rng(5))
    b = degrade(hr, 2, "crappify", np.random.default_rng(5))
    plain = degrade(hr, 2, "bicubic", np.random.default_rng(5))
    assert np.array_equal(a, b) and a.shape == plain.shape and not np.array_equal(a, plain)


def test_random_crop_covers_the_eight_symmetries() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    seen = {random_crop(image, 4, np.random.default_rng(i)).tobytes() for i in range(200)}
    assert len(seen) == 8


def test_holdout_is_fixed_disjoint_and_never_drawn_for_training(tmp_path: Path, photos: Path) -> None:
    train, held = holdout_split(20, 0.1)
    assert len(held) == 2 and not set(train) & set(held) and sorted([*train, *held]) == list(range(20))
    assert np.array_equal(held, holdout_split(20, 0.1)[1])
    with pytest.raises(UserError, match="^data.holdout_fraction 0.99: holding out 2 of the 2 images"):
        holdout_split(2, 0.99)
    from ganpipe.sr_trainer import SRTrainer

    cfg = load_config(write_config(tmp_path / "c.yaml", sr_config(photos)))
    trainer = SRTrainer(cfg, new_run_dir(cfg))
    drawn = {int(i) for _ in range(30) for i in trainer.train_indices[trainer.sampler.next_indices()]}
    assert drawn == set(train.tolist())  # every training image, no held-out one


# --- metrics ---------------------------------------------------------------------------------------

def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM written out window by window (no separable filtering), one channel."""
    w = np.outer(gaussian_window(), gaussian_window())
    c1, c2, values = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            p, q = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq, cv = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum(), (w * (p - mp) * (q - mq)).sum()
            values.append(((2 * mp * mq + c1) * (2 * cv + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_match_their_formulas() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a[2:-2, 2:-2].astype(float) - b[2:-2, 2:-2]) ** 2)
    assert psnr(a, b, border=2) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-10)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    ya = 16 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0
    yb = 16 + (65.481 * b[..., 0] + 128.553 * b[..., 1] + 24.966 * b[..., 2]) / 255.0
    assert psnr(a, b, y_channel=True) == pytest.approx(10 * math.log10(255**2 / np.mean((ya - yb) ** 2)), abs=1e-10)
    assert ssim(a, b, border=2, y_channel=True) == pytest.approx(reference_ssim(ya[2:-2, 2:-2], yb[2:-2, 2:-2]),
                                                                 abs=1e-10)
    per_channel = np.mean([reference_ssim(a[..., c].astype(float), b[..., c].astype(float)) for c in range(3)])
    assert ssim(a, b) == pytest.approx(per_channel, abs=1e-10)


# --- training --------------------------------------------------------------------------------------

def weights(trainer) -> dict[str, torch.Tensor]:
    nets = trainer.nets
    return {f"{n}.{k}": v.clone() for n, m in (("G", nets.g_raw), ("D", nets.d_raw), ("E", nets.ema))
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("stop", [pytest.param(2, marks=pytest.mark.slow), 4, pytest.param(6, marks=pytest.mark.slow)])
# stopped in the pretraining, critic and adversarial stages (the critic stage's in the quick suite)
def test_resume_in_each_stage_is_bitwise_an_uninterrupted_run(tmp_path: Path, photos: Path, stop: int) -> None:
    from ganpipe.sr_trainer import SRTrainer

    vgg = write_random_vgg19(tmp_path / "vgg19.safetensors")
    text = sr_config(photos) + f"  vgg_weights: {vgg}\n  feature_weight: 0.01\n"
    cfg = load_config(write_config(tmp_path / "a.yaml", text))
    straight = SRTrainer(cfg, new_run_dir(cfg))
    stages, logged = [], set()
    while straight.step < straight.total_steps:
        stages.append(straight.stage())
        logged |= set(straight.iteration())
        straight.step += 1
    assert stages == ["pretrain"] * 3 + ["critic"] * 2 + ["adversarial"] * 3
    assert {"g_pixel", "g_feature", "g_adversarial", "d_loss"} <= logged
    cfg_b = load_config(write_config(tmp_path / "b.yaml", text + "  run_name: interrupted\n"))
    first = SRTrainer(cfg_b, new_run_dir(cfg_b))
    for _ in range(stop):
        first.iteration()
        first.step += 1
    first.save({})
    assert (first.run_dir / "generator-psnr" / "generator.safetensors").exists() == (stop >= 3)
    resumed = SRTrainer(cfg_b, first.run_dir)
    assert resumed.resumed_from == stop
    while resumed.step < resumed.total_steps:
        resumed.iteration()
        resumed.step += 1
    expected, got = weights(straight), weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def check_lpips_beside_bicubic(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run's evaluation with eval.lpips_weights: lpips and lpips_bicubic on the held-out
    images (the bicubic number recomputed here image by image), or lpips unavailable, saying why,
    when the images are too small for its backbone; without the key: lpips unavailable, saying
    how to make the file, and the other metrics measured."""
    from ganpipe import runs
    from ganpipe.evaluate import evaluate_run
    from ganpipe.metrics.lpips import LPIPS_HOWTO, LPIPSMeasure, load_lpips

    cfg = runs.load_run_config(run_dir)
    cfg.eval.metrics, cfg.eval.lpips_weights = ["psnr", "lpips"], str(write_random_lpips(tmp_path / "alex.pth"))
    metrics = evaluate_run(run_dir, cfg)["metrics"]  # AlexNet needs 31 px: these photos are 32 to 72 px
    assert set(metrics) == {"psnr", "psnr_bicubic", "lpips"} and metrics["lpips"]["value"] is None
    assert metrics["lpips"]["error"] == ("held-out image 10: LPIPS with the alex backbone needs images of at least "
                                         "31x31 px after the 2 px border crop, got 32x48")
    cfg.eval.lpips_weights = str(write_random_lpips(tmp_path / "vgg.pth", "vgg"))
    metrics = evaluate_run(run_dir, cfg)["metrics"]
    assert set(metrics) == {"psnr", "psnr_bicubic", "lpips", "lpips_bicubic"}, metrics
    lpips = metrics["lpips"]
    assert lpips["num_images"] == 2 and lpips["y_channel"] is False and lpips["border"] == 2
    assert metrics["lpips_bicubic"] == {"value": lpips["bicubic"], "uncertainty": lpips["bicubic_uncertainty"]}
    data = open_prepared(runs.read_info(run_dir)["data"]["location"])
    measure = LPIPSMeasure(load_lpips(Path(cfg.eval.lpips_weights)))
    per_image = []
    for index in holdout_split(data.num_records, cfg.data.effective_holdout_fraction)[1]:
        hr, lr = evaluation_pair(data, int(index), 2, "bicubic")
        per_image.append(measure(bicubic_upscale(lr, 2), hr, 2))
    assert lpips["bicubic"] == pytest.approx(np.mean(per_image), abs=1e-6) and lpips["bicubic"] > 0
    assert lpips["bicubic_uncertainty"] == pytest.approx(np.std(per_image, ddof=1) / math.sqrt(2), abs=1e-6)
    assert lpips["value"] > 0 and lpips["value"] != lpips["bicubic"]
    capsys.readouterr()
    cfg.eval.lpips_weights = None
    evaluation = evaluate_run(run_dir, cfg)
    assert evaluation["metrics"]["lpips"] == {"value": None, "uncertainty": None, "error": LPIPS_HOWTO}
    assert set(evaluation["metrics"]) == {"psnr", "psnr_bicubic", "lpips"}
    assert evaluation["status"] == "ok" and evaluation["failed"] == ["lpips"]
    assert capsys.readouterr().err.count(f"warning: lpips skipped: {LPIPS_HOWTO}") == 1


def test_a_run_through_the_cli_trains_every_stage_and_evaluates_against_bicubic(
        tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", sr_config(photos))
    result = run_cli("train", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert "warning: train.vgg_weights is not set: training with the pixel loss alone" in result.stderr
    out = last_json(result.stdout)
    run_dir = Path(out["run_dir"])
    assert out["steps"] == 8 and out["g_updates"] == 3 + 3 and out["d_updates"] == 2 + 3
    assert (run_dir / "generator-psnr" / "generator.safetensors").exists()
    spec = json.loads((run_dir / "generator" / "spec.json").read_text())
    assert spec["family"] == "srgan" and spec["scale"] == 2
    from ganpipe import runs
    from ganpipe.evaluate import evaluate_run

    evaluation = evaluate_run(run_dir, runs.load_run_config(run_dir))
    metrics = evaluation["metrics"]
    assert set(metrics) == {"psnr", "psnr_bicubic", "ssim", "ssim_bicubic"}
    assert metrics["psnr"]["num_images"] == 2 and 0 < metrics["psnr"]["value"] < 60
    assert metrics["psnr_bicubic"]["value"] == metrics["psnr"]["bicubic"] > 15
    check_lpips_beside_bicubic(run_dir, tmp_path, capsys)
    refused = run_cli("generate", "--model", str(run_dir), "--num-images", "4", "--out", str(tmp_path / "g.png"))
    assert refused.returncode == 2 and error_lines(refused.stderr) == [
        "error: --model: a srgan generator super-resolves images; `ganpipe generate` samples from seeds and does "
        "not apply to it (see README, Super-resolution)"], refused.stderr


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sets", "message"), [
    (["model.scale=3"], "key 'model.scale': Input should be 2, 4 or 8 (got 3)"),
    (["data.kind=vector", "data.columns=[a]"], "data.kind: model.family srgan super-resolves images, not vectors"),
    (["train.vgg_weights=/nonexistent/vgg19.pth"], "train.vgg_weights /nonexistent/vgg19.pth: file not found"),
    (["data.resize=center_crop"], "data.resize: model.family srgan keeps images at their own size"),
])
def test_bad_input_exits_2_naming_the_key(tmp_path: Path, photos: Path, sets: list[str], message: str) -> None:
    config = write_config(tmp_path / "c.yaml", sr_config(photos))
    result = run_cli("train", str(config), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_weights_file_of_the_wrong_layout_is_refused_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ganpipe.sr_losses import VGGFeatureLoss

    path = tmp_path / "other.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 1, 3, 3)}, str(path))
    with pytest.raises(UserError, match=r"other.safetensors: not VGG19 weights in torchvision's layout "
                                        r"\(features.0.weight has shape \(64, 1, 3, 3\), expected \(64, 3, 3, 3\)\)"):
        VGGFeatureLoss(path)
    pickled = tmp_path / "vgg19.pth"
    torch.save({"features.0.weight": object()}, pickled)
    with pytest.raises(UserError, match="vgg19.pth: not a weights file"):
        VGGFeatureLoss(pickled)

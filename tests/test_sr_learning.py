"""A tiny super-resolution run learns: after a few hundred pretraining steps on photographs (CPU,
seconds), the PSNR-stage generator it writes (RUN/generator-psnr) beats bicubic upscaling on the
held-out images, and beats itself untrained, so the margin is learnt, not the interpolation's.

The settings that make this quick and reliable (seeded, so the run is the same every time):
`model.sr_input_skip: bicubic` (the generator learns a residual over the bicubic upscale, starting
at zero: SRResNet's own form needs thousands of steps even to reach bicubic), Adam at 5e-4 (faster
rates make the first steps of the zero-initialised output layer overshoot), an EMA of 0.95 (the
run is short), x2 with 32 px crops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ganpipe.config_files import load_config
from ganpipe.generators import read_generator
from ganpipe.metrics.sr import evaluate_super_resolution
from ganpipe.networks import build_generator
from ganpipe.runs import STAGE_FOLDERS
from tests.conftest import write_config
from tests.fixtures import new_run_dir, one_torch_thread, write_photo_folder

STEPS = 200


@pytest.fixture
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def test_a_tiny_run_beats_bicubic_on_held_out_photographs(tmp_path: Path, one_thread: None) -> None:
    from ganpipe.sr_trainer import SRTrainer

    photos = write_photo_folder(tmp_path / "photos", count=20)
    cfg = load_config(write_config(tmp_path / "c.yaml", f"""
seed: 0
data: {{source: {photos}, resolution: 32, holdout_fraction: 0.2}}
model: {{family: srgan, scale: 2, g_width: 16, d_width: 8, sr_blocks: 1, sr_input_skip: bicubic}}
eval: {{metrics: [psnr, ssim]}}
register: {{name: sr-learns, primary_metric: psnr}}
train: {{pretrain_steps: {STEPS}, critic_pretrain_steps: 0, steps: 1, batch_size: 8, cpu: true, best_metric: none,
         g_lr: 0.0005, betas: [0.9, 0.999], ema_decay: 0.95, checkpoint_every: 100000, sample_every: 100000,
         log_every: 100000}}
"""))
    trainer = SRTrainer(cfg, new_run_dir(cfg))
    held = trainer.holdout_indices
    assert len(held) == 4 and not set(held) & set(trainer.train_indices)

    def measured(generator: torch.nn.Module) -> dict[str, dict]:
        return evaluate_super_resolution(generator.eval(), trainer.spec, trainer.data, held, "bicubic", ["psnr", "ssim"])

    untrained = measured(build_generator(trainer.spec))
    while trainer.step < STEPS:
        trainer.iteration()
        trainer.step += 1
    generator, spec, _, _ = read_generator(trainer.run_dir / STAGE_FOLDERS["psnr"])  # what the run wrote
    assert spec == trainer.spec
    trained = measured(generator)
    psnr, bicubic = trained["psnr"]["value"], trained["psnr"]["bicubic"]
    assert psnr > bicubic + 0.15, (psnr, bicubic)
    assert psnr > untrained["psnr"]["value"] + 0.15, (psnr, untrained["psnr"]["value"])
    assert trained["ssim"]["value"] > trained["ssim"]["bicubic"], trained["ssim"]


def test_the_bicubic_input_skip_starts_at_bicubic_and_is_in_spec_json_only_when_set() -> None:
    import torch.nn.functional as F

    from ganpipe.networks import NetworkSpec

    spec = NetworkSpec(family="srgan", sample_shape=(3, 32, 32), latent_dim=0, g_width=8, scale=4, sr_blocks=1,
                       sr_input_skip="bicubic")
    lr = torch.rand(2, 3, 5, 7) * 2 - 1
    expected = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.equal(build_generator(spec).eval()(lr), expected)  # untrained: exactly the upscale
    assert spec.to_json()["sr_input_skip"] == "bicubic"
    plain = NetworkSpec(family="srgan", sample_shape=(3, 32, 32), latent_dim=0, g_width=8, scale=4, sr_blocks=1)
    assert "sr_input_skip" not in plain.to_json()  # older srgan spec.json files stay byte for byte
    assert not torch.equal(build_generator(plain).eval()(lr), expected)

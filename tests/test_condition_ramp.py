"""train.condition_ramp: the labels' strength in G and D, from 0 (an unconditional GAN) to 1 (fully
conditional). Its schedule, every conditional network at strengths 0 and 1, the trainer moving it
(and resuming with it bitwise), checkpoint scores inside the ramp, and bad settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ganpipe import schedules
from ganpipe.config import TrainConfig
from ganpipe.config_files import load_config
from ganpipe.networks import (
    NetworkSpec,
    build_discriminator,
    build_generator,
    condition_strengths,
    set_condition_strength,
)
from ganpipe.train import checkpoint_score
from ganpipe.trainer import Trainer
from tests.conftest import TINY_DIGITS, error_lines, run_cli, write_config
from tests.fixtures import (
    assert_bitwise_equal,
    new_run_dir,
    one_torch_thread,
    resumed_halfway,
    train_iterations,
    trainer_weights,
)

CONDITIONAL = ["model.conditional=true", "model.d_conditioning=concat", "train.cpu=true"]


def test_strength_is_zero_then_linear_then_one() -> None:
    t = TrainConfig(steps=100, condition_ramp=(0.2, 0.6))
    values = {step: schedules.condition_strength(t, step) for step in (0, 10, 20, 30, 40, 50, 60, 99)}
    assert values == pytest.approx({0: 0, 10: 0, 20: 0, 30: 0.25, 40: 0.5, 50: 0.75, 60: 1, 99: 1})
    assert {schedules.condition_strength(TrainConfig(steps=100), s) for s in (0, 50, 99)} == {1.0}
    assert schedules.follows_steps(t) and not schedules.follows_steps(TrainConfig(steps=100))


NETWORKS = [  # (family, g_conditioning, d_conditioning, sample shape)
    ("dcgan", "embedding", "concat", (1, 16, 16)),
    ("dcgan", "cbn", "projection", (1, 16, 16)),
    ("mlp", "embedding", "concat", (6,)),
    ("mlp", "embedding", "projection", (6,)),
    ("resnet", "cbn", "projection", (3, 32, 32)),
]


@pytest.mark.parametrize(("family", "g_conditioning", "d_conditioning", "shape"), NETWORKS)
def test_networks_ignore_labels_at_zero_and_are_unchanged_at_one(family: str, g_conditioning: str,
                                                                 d_conditioning: str, shape: tuple[int, ...]) -> None:
    spec = NetworkSpec(family, shape, latent_dim=8, num_classes=4, g_width=8, d_width=8,
                       g_conditioning=g_conditioning, d_conditioning=d_conditioning,
                       mean=(0.0,) * 6 if len(shape) == 1 else (), std=(1.0,) * 6 if len(shape) == 1 else ())
    torch.manual_seed(0)
    g, d = build_generator(spec).eval(), build_discriminator(spec).eval()
    with torch.no_grad():  # off the initialisation, where conditional batch norm is the same for every class
        for parameter in [*g.parameters(), *d.parameters()]:
            parameter.add_(0.1 * torch.randn_like(parameter))
    # The strength is not part of the weights: checkpoints and exports keep their layout.
    assert not any("condition_strength" in k for k in [*g.state_dict(), *d.state_dict()])
    z, x = torch.randn(4, 8), torch.randn(4, *shape)
    labels, other = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    with torch.no_grad():
        full_g, full_d = g(z, labels), d(x, labels)
        fresh_g, fresh_d = copy.deepcopy(g), copy.deepcopy(d)
        set_condition_strength(0.0, g)
        set_condition_strength(0.0, d)
        assert torch.equal(g(z, labels), g(z, other)) and torch.equal(d(x, labels), d(x, other))
        assert not torch.equal(fresh_g(z, labels), fresh_g(z, other))  # the labels did matter
        assert not torch.equal(fresh_d(x, labels), fresh_d(x, other))
        set_condition_strength(0.5, g)  # in between: neither
        assert not torch.equal(g(z, labels), g(z, other)) and not torch.equal(g(z, labels), full_g)
        set_condition_strength(1.0, g)
        set_condition_strength(1.0, d)
        assert torch.equal(g(z, labels), full_g) and torch.equal(d(x, labels), full_d)  # bitwise


def strengths(trainer: Trainer) -> list[float]:
    return [float(b) for b in condition_strengths(trainer.nets.g_raw, trainer.nets.d_raw, trainer.nets.ema)]


def test_trainer_moves_the_strength_and_a_ramped_run_resumes_bitwise(tmp_path: Path) -> None:
    """Ramp over steps 4-12 of 20: the trainer sets every network's strength (EMA included) from
    the step and logs it; 10 steps, saved, then 10 more in a new Trainer give bitwise the weights
    of 20 in one go (the strength is not in the checkpoint: it comes from the step)."""
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    settings = [*CONDITIONAL, "model.g_conditioning=cbn", "train.condition_ramp=[0.2, 0.6]"]

    def trainer(steps: int, name: str) -> Trainer:
        cfg = load_config(config, [*settings, f"train.steps={steps}", f"train.run_name={name}"])
        return Trainer(cfg, new_run_dir(cfg))

    with one_torch_thread():
        straight = trainer(20, "straight")
        seen = []
        for _ in range(20):
            straight.iteration()
            seen.append(straight.scheduled["condition_strength"])
            assert set(strengths(straight)) == {seen[-1]}
            straight.step += 1
        assert seen[:5] == [0.0] * 5 and seen[5:12] == pytest.approx([i / 8 for i in range(1, 8)])
        assert seen[12:] == [1.0] * 8
        expected = trainer_weights(straight)
        straight.close()

        second = resumed_halfway(trainer, 20, 20, "resumed")
        assert_bitwise_equal(trainer_weights(second), expected)
        second.close()


def test_checkpoints_inside_the_ramp_are_not_scored(tmp_path: Path) -> None:
    """A checkpoint's weights, loaded, run at full strength: one scored below it would be picked
    as `best` for a generator it is not."""
    cfg = load_config(write_config(tmp_path / "c.yaml", TINY_DIGITS),
                      [*CONDITIONAL, "train.condition_ramp=[0.0, 0.5]", "train.best_metric=fd_domain",
                       "train.best_num_samples=64"])
    trainer = Trainer(cfg, new_run_dir(cfg))
    with one_torch_thread():
        train_iterations(trainer, 10)  # the last update at step 9: strength 0.9
        assert checkpoint_score(trainer) is None
        train_iterations(trainer, 1)  # step 10: full strength
        score = checkpoint_score(trainer)
    assert score is not None and score > 0
    trainer.close()


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.condition_ramp=[0.2, 0.6]"], "train.condition_ramp: ramps the labels' strength of a conditional model"),
    ([*CONDITIONAL, "model.family=r3gan", "model.d_conditioning=projection", "train.condition_ramp=[0.2, 0.6]"],
     "train.condition_ramp: r3gan's discriminator has no unconditional output"),
])
def test_cli_refuses_a_ramp_the_model_cannot_take(tmp_path: Path, overrides: list[str], expected: str) -> None:
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    result = run_cli("train", str(config), *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 2, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr

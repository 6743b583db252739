"""Hyperparameter schedules (ganpipe.schedules): their values at chosen steps, continuity, that
they are functions of the step alone (what resume relies on), in the trainer and in whole runs,
and schedules that do not fit the run refused at the door."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from ganpipe import runs, schedules
from ganpipe.config import TrainConfig
from ganpipe.config_files import config_from_yaml_text, load_config
from ganpipe.errors import UserError
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


def train(**values) -> TrainConfig:
    return TrainConfig(**{"steps": 100, **values})


def test_ramp_shapes_end_to_end() -> None:
    assert [schedules.ramp(2.0, 1.0, p, "linear") for p in (-1, 0, 0.25, 1, 2)] == [2.0, 2.0, 1.75, 1.0, 1.0]
    assert [schedules.ramp(2.0, 1.0, p, "cosine") for p in (0, 0.5, 1)] == pytest.approx([2.0, 1.5, 1.0])
    assert schedules.ramp(2.0, 1.0, 0.25, "cosine") == pytest.approx(1.5 + 0.5 * math.cos(math.pi / 4))


def test_learning_rates_keep_the_linear_decay_and_add_a_cosine() -> None:
    t = train(lr_decay="linear", lr_decay_start=0.5, g_lr=1e-3, d_lr=2e-3)
    # The decay the trainer always had: full rate until step 50, then linearly to 0 at step 100.
    for step in (0, 30, 50, 60, 99):
        factor = 1.0 - max(0.0, step - 50) / 50
        assert schedules.learning_rates(t, step) == (1e-3 * factor, 2e-3 * factor)
    cosine = train(lr_decay="cosine", lr_decay_start=0.5, g_lr=1e-3)
    assert [schedules.learning_rates(cosine, s)[0] for s in (0, 50, 75, 100)] == pytest.approx([1e-3, 1e-3, 5e-4, 0])
    assert schedules.learning_rates(train(g_lr=3e-4), 80)[0] == 3e-4


def test_gamma_decay_beta2_ramp_and_ada_target_at_chosen_steps() -> None:
    t = train(gamma_decay="cosine", gamma_final_ratio=0.1, beta2_final=0.99, betas=(0.0, 0.9),
              ada_target_final=0.3, anneal_steps=80)
    assert [schedules.gamma(t, 2.0, s) for s in (0, 40, 80, 100)] == pytest.approx([2.0, 1.1, 0.2, 0.2])
    assert [schedules.beta2(t, s) for s in (0, 40, 80, 99)] == pytest.approx([0.9, 0.945, 0.99, 0.99])
    assert [schedules.ada_target(t, s) for s in (0, 40, 80)] == pytest.approx([0.6, 0.45, 0.3])
    linear = train(gamma_decay="linear", gamma_final_ratio=0.5)  # over the whole run (100 steps)
    assert [schedules.gamma(linear, 1.0, s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.75, 0.5])
    # Without a schedule each value is the configured constant at every step.
    plain = train(r1_gamma=1.0, betas=(0.5, 0.999))
    assert {schedules.gamma(plain, 1.0, s) for s in range(100)} == {1.0}
    assert {schedules.beta2(plain, s) for s in range(100)} == {0.999}
    assert {schedules.ada_target(plain, s) for s in range(100)} == {0.6}


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_schedules_are_continuous(shape: str) -> None:
    """No jumps: one step moves a value at most its total change times pi/2 over the horizon
    (the cosine's steepest slope)."""
    t = train(steps=200, gamma_decay=shape, gamma_final_ratio=0.0, beta2_final=0.99, betas=(0.5, 0.9),
              ada_target_final=0.9, lr_decay=shape, lr_decay_start=0.25)
    curves = {"gamma": ([schedules.gamma(t, 1.0, s) for s in range(201)], 1.0, 200),
              "beta2": ([schedules.beta2(t, s) for s in range(201)], 0.09, 200),
              "ada_target": ([schedules.ada_target(t, s) for s in range(201)], 0.3, 200),
              "lr": ([schedules.lr_factor(t, s) for s in range(201)], 1.0, 150)}
    for name, (values, change, horizon) in curves.items():
        biggest = max(abs(b - a) for a, b in zip(values, values[1:], strict=False))
        assert 0 < biggest <= change * math.pi / 2 / horizon + 1e-12, name


def test_schedules_depend_on_the_step_alone() -> None:
    """Resume: a run restarted at step k, from its saved config, gets exactly the values an
    uninterrupted run gets at k, whatever was evaluated before."""
    t = train(gamma_decay="cosine", beta2_final=0.99, betas=(0.0, 0.9), ada_target_final=0.3,
              lr_decay="linear", anneal_steps=60, condition_ramp=(0.1, 0.7))
    reloaded = load_config_from_train(t)

    def values(cfg: TrainConfig, step: int) -> tuple:
        return (schedules.learning_rates(cfg, step), schedules.gamma(cfg, 0.7, step), schedules.beta2(cfg, step),
                schedules.ada_target(cfg, step), schedules.penalty_weight(cfg, 0.7, step, step),
                schedules.condition_strength(cfg, step))

    in_order = [values(t, s) for s in range(100)]
    shuffled = list(range(100))
    random.Random(0).shuffle(shuffled)
    assert {s: values(reloaded, s) for s in shuffled} == dict(enumerate(in_order))


def load_config_from_train(t: TrainConfig) -> TrainConfig:
    """The train section as a resumed run reads it: from the run's saved YAML."""
    cfg = config_from_yaml_text(f"data: {{source: builtin:digits}}\ntrain: {t.model_dump_json()}\n", "saved")
    return cfg.train


def test_lazy_regularisation_weights() -> None:
    t = train(reg_every=4, gamma_decay="linear", gamma_final_ratio=0.5)
    weights = [schedules.penalty_weight(t, 2.0, 0, u) for u in range(9)]
    assert weights == [4.0, 0, 0, 0, 4.0, 0, 0, 0, 4.0]  # every 4th update, gamma/2 x 4
    assert schedules.penalty_weight(t, 2.0, 50, 8) == pytest.approx(0.5 * 1.5 * 4)  # the decayed gamma
    assert [schedules.penalty_weight(train(), 2.0, 0, u) for u in range(3)] == [1.0, 1.0, 1.0]


def test_steps_join_the_run_identity_when_a_schedule_follows_them(tmp_path: Path) -> None:
    """Raising train.steps continues a run, unless a schedule stretches with the steps."""
    path = write_config(tmp_path / "c.yaml", TINY_DIGITS)

    def same_run(*overrides: str) -> bool:
        short = load_config(path, [*overrides, "train.steps=20"])
        longer = load_config(path, [*overrides, "train.steps=40"])
        return runs.run_identity(short) == runs.run_identity(longer)

    assert same_run()
    assert same_run("train.gamma_decay=cosine", "train.r1_gamma=1", "train.anneal_steps=20")
    assert not same_run("train.gamma_decay=cosine", "train.r1_gamma=1")
    assert not same_run("train.beta2_final=0.99")
    assert not same_run("train.ada_target_final=0.3")
    assert not same_run("train.lr_decay=cosine")
    assert not same_run("model.conditional=true", "train.condition_ramp=[0.2, 0.6]")


def test_trainer_sets_the_scheduled_rates_and_betas(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", TINY_DIGITS),
                      ["train.cpu=true", "train.betas=[0.0, 0.9]", "train.beta2_final=0.99", "train.r2_gamma=1",
                       "train.gamma_decay=linear", "train.gamma_final_ratio=0.5", "train.lr_decay=linear"])
    trainer = Trainer(cfg, new_run_dir(cfg))
    trainer.step = 10  # of 20: halfway
    trainer.set_hyperparameters()
    for optimizer, base in ((trainer.nets.opt_g, 2e-4), (trainer.nets.opt_d, 2e-4)):
        group = optimizer.param_groups[0]
        assert group["betas"] == (0.0, pytest.approx(0.945)) and group["lr"] == pytest.approx(base)
    assert trainer.scheduled == pytest.approx({"g_lr": 2e-4, "d_lr": 2e-4, "beta2": 0.945, "r2_gamma": 0.75})


def test_a_scheduled_run_extended_in_two_invocations_matches_one(tmp_path: Path) -> None:
    """Relativistic loss, R1 + R2 with lazy regularisation, gamma decay and a beta2 ramp: 10 steps
    saved, then a new Trainer on the same run with train.steps raised to 20 (what `--resume auto`
    builds), gives bitwise the weights of 20 steps in one go (schedules from the step, the G
    update's real batches from the checkpointed sampler, the lazy-regularisation count from the
    checkpointed D updates). In this process: test_training resumes through the CLI."""
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    settings = ["train.cpu=true", "train.loss=relativistic", "train.r1_gamma=1", "train.r2_gamma=0.5",
                "train.reg_every=3", "train.gamma_decay=cosine", "train.beta2_final=0.99", "train.betas=[0.0, 0.9]",
                "train.anneal_steps=10", "model.conditional=true"]

    def trainer(steps: int, name: str) -> Trainer:
        cfg = load_config(config, [*settings, f"train.steps={steps}", f"train.run_name={name}"])
        return Trainer(cfg, new_run_dir(cfg))

    with one_torch_thread():
        straight = trainer(20, "straight")
        train_iterations(straight, 20)
        expected = trainer_weights(straight)
        straight.close()

        second = resumed_halfway(trainer, 10, 20, "extended")
        assert second.total_steps == 20
        assert_bitwise_equal(trainer_weights(second), expected)
        second.close()


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.anneal_steps=21"], "train.anneal_steps 21 does not fit train.steps 20"),
    (["train.reg_every=0"], "key 'train.reg_every'"),
    (["train.r2_gamma=-1"], "key 'train.r2_gamma'"),
    (["train.beta2_final=1"], "key 'train.beta2_final'"),
    (["train.gamma_decay=exponential"], "key 'train.gamma_decay'"),
    (["train.ada_target_final=1.5"], "key 'train.ada_target_final'"),
    (["train.loss=rpgan"], "key 'train.loss'"),
    (["train.augment=ada", "train.ada_transforms=[translate, translate]"], "a transform is listed twice"),
    (["train.augment=ada", "train.ada_transforms=[shear]"], "key 'train.ada_transforms"),
    (["train.augment=ada", "train.ada_transforms=[]"], "key 'train.ada_transforms'"),
    (["train.augment=diffaug", "train.ada_transforms=[translate]"],
     "train.ada_transforms: chooses ADA's transforms; train.augment is diffaug"),
    (["train.condition_ramp=[0.6, 0.2]"], "the start must come before the end"),
    (["train.condition_ramp=[0.2, 1.5]"], "key 'train.condition_ramp"),
    (["train.mode_seeking=-1"], "key 'train.mode_seeking'"),
])
def test_bad_schedule_penalty_and_augmentation_settings_name_the_key(tmp_path: Path, overrides: list[str],
                                                                     expected: str) -> None:
    path = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    assert expected in str(info.value) and str(path) in str(info.value)




def test_cli_refuses_a_schedule_that_does_not_fit_the_run(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    result = run_cli("train", str(config), "--set", "train.gamma_decay=cosine", "--set", "train.anneal_steps=500")
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "train.anneal_steps 500 does not fit train.steps 20" in errors[0], result.stderr
    assert "Traceback" not in result.stderr

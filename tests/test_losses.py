"""Each GAN objective against its textbook formula, the penalties against hand and autograd
computations (in fp32 under bf16), lazy regularisation in the trainer, and a relativistic run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ganpipe import losses
from ganpipe.config_files import load_config
from tests.conftest import ROOT, TINY_DIGITS, last_json, run_cli, write_config

REAL = torch.tensor([2.0, -1.0, 0.5])
FAKE = torch.tensor([-3.0, 0.0, 1.5])


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def test_discriminator_logistic_loss_is_the_minimax_value() -> None:
    expected = -(torch.log(sigmoid(REAL)).mean() + torch.log(1 - sigmoid(FAKE)).mean())
    assert torch.allclose(losses.d_logistic(REAL, FAKE), expected, atol=1e-6)


def test_generator_minimax_and_non_saturating() -> None:
    assert torch.allclose(losses.g_minimax(FAKE), torch.log(1 - sigmoid(FAKE)).mean(), atol=1e-6)
    assert torch.allclose(losses.g_non_saturating(FAKE), -torch.log(sigmoid(FAKE)).mean(), atol=1e-6)


def test_minimax_saturates_where_non_saturating_does_not() -> None:
    """When D confidently rejects a fake (logit -10), the minimax gradient nearly vanishes."""
    fake = torch.tensor([-10.0], requires_grad=True)
    (g_minimax,) = torch.autograd.grad(losses.g_minimax(fake), fake)
    (g_ns,) = torch.autograd.grad(losses.g_non_saturating(fake), fake)
    assert abs(g_minimax.item()) < 1e-4
    assert abs(g_ns.item()) > 0.99


def test_discriminator_at_equilibrium_says_half() -> None:
    """D(x) = 0.5 everywhere (logit 0): the D loss is 2 log 2, the value at the minimax equilibrium."""
    zeros = torch.zeros(8)
    assert math.isclose(losses.d_logistic(zeros, zeros).item(), 2 * math.log(2), rel_tol=1e-6)


def test_hinge_least_squares_wasserstein() -> None:
    assert torch.allclose(losses.d_hinge(REAL, FAKE),
                          torch.relu(1 - REAL).mean() + torch.relu(1 + FAKE).mean())
    assert torch.allclose(losses.g_hinge(FAKE), -FAKE.mean())
    assert torch.allclose(losses.d_least_squares(REAL, FAKE),
                          0.5 * ((REAL - 1) ** 2).mean() + 0.5 * (FAKE**2).mean())
    assert torch.allclose(losses.g_least_squares(FAKE), 0.5 * ((FAKE - 1) ** 2).mean())
    assert torch.allclose(losses.d_wasserstein(REAL, FAKE), FAKE.mean() - REAL.mean())
    assert torch.allclose(losses.g_wasserstein(FAKE), -FAKE.mean())


def test_every_configured_loss_is_registered() -> None:
    from typing import get_args

    from ganpipe.config_values import LossName

    assert set(get_args(LossName)) == set(losses.LOSSES)


def test_gradient_penalty_of_a_linear_critic() -> None:
    """critic(x) = w.x has gradient w everywhere: the penalty is (|w| - 1)^2 exactly."""
    w = torch.tensor([3.0, 4.0])

    def critic(x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return x @ w

    real, fake = torch.randn(16, 2), torch.randn(16, 2)
    penalty = losses.gradient_penalty(critic, real, fake, None, torch.Generator().manual_seed(0))
    assert penalty.item() == pytest.approx((5.0 - 1.0) ** 2)


def test_gradient_penalty_reaches_the_critic_weights() -> None:
    critic = torch.nn.Linear(2, 1)
    penalty = losses.gradient_penalty(lambda x, y: critic(x).flatten(), torch.randn(4, 2), torch.randn(4, 2), None)
    penalty.backward()
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0


def test_r1_penalty_of_a_quadratic_discriminator() -> None:
    """D(x) = sum(x^2) has gradient 2x: the R1 penalty is E[|2x|^2]."""
    real = torch.randn(10, 3)
    expected = (4 * real**2).sum(dim=1).mean()
    assert torch.allclose(losses.r1_penalty(lambda x, y: (x**2).sum(dim=1), real, None), expected, atol=1e-5)


# --- relativistic loss, R1 and R2 --------------------------------------------------------------

def test_relativistic_losses_match_their_formulas_on_paired_logits() -> None:
    """RpGAN: D minimises -log sigmoid(D(x_i) - D(G(z_i))), G the mirror, pair by pair."""
    d_expected = -torch.log(sigmoid(REAL - FAKE)).mean()
    g_expected = -torch.log(sigmoid(FAKE - REAL)).mean()
    assert torch.allclose(losses.d_relativistic(REAL, FAKE), d_expected, atol=1e-6)
    assert torch.allclose(losses.g_relativistic(FAKE, REAL), g_expected, atol=1e-6)
    # Pairs, not batch means: re-pairing the same logits changes the value.
    assert not torch.allclose(losses.d_relativistic(REAL, FAKE.flip(0)), d_expected, atol=1e-3)
    # Equal logits: the discriminator cannot tell real from fake, log 2 on both sides.
    same = torch.full((4,), 1.7)
    assert losses.d_relativistic(same, same).item() == pytest.approx(math.log(2))
    assert losses.g_relativistic(same, same).item() == pytest.approx(math.log(2))


def test_only_the_relativistic_generator_reads_real_logits() -> None:
    assert [name for name, objective in losses.LOSSES.items() if objective.g_needs_real] == ["relativistic"]
    with pytest.raises(ValueError, match="needs real logits"):
        losses.g_relativistic(FAKE, None)
    for name, objective in losses.LOSSES.items():
        if not objective.g_needs_real:  # the other generator losses ignore the real logits
            assert torch.equal(objective.g(FAKE, None), objective.g(FAKE, REAL)), name


class SmallD(torch.nn.Module):
    """A conditional MLP discriminator with a projection term, in the shape ganpipe's take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 16),
                                        torch.nn.LeakyReLU(0.2))
        self.out = torch.nn.Linear(16, 1)
        self.embed = torch.nn.Embedding(3, 16)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        logits = self.out(h).flatten()
        return logits if labels is None else logits + (self.embed(labels) * h).sum(dim=1)


def squared_input_gradient_by_definition(d: SmallD, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_i ||dD(x_i)/dx_i||^2, one sample at a time (no batching trick)."""
    terms = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(d(xi, labels[i:i + 1]).sum(), xi, create_graph=True)
        terms.append(grad.pow(2).sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("penalty", [losses.r1_penalty, losses.r2_penalty], ids=["r1", "r2"])
def test_r1_and_r2_equal_their_definitions_and_train_d(penalty) -> None:
    """R1 (on real samples) and R2 (on generated samples) are the same penalty on different
    inputs: its value and its gradient in D's weights equal a direct autograd computation."""
    d = SmallD()
    x, labels = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    if penalty is losses.r2_penalty:  # generated samples come with G's graph: the penalty trains D only
        x = x.clone().requires_grad_(True) * 1.0
    value = penalty(d, x, labels)
    expected = squared_input_gradient_by_definition(d, x, labels)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # (The output bias does not move the input gradient: its gradient is zero.)
    ours = torch.autograd.grad(value, list(d.parameters()), allow_unused=True, materialize_grads=True)
    reference = torch.autograd.grad(expected, list(d.parameters()), allow_unused=True, materialize_grads=True)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in ours) > 0


@pytest.mark.parametrize("name", ["r1", "r2", "gradient_penalty"])
def test_penalties_are_fp32_under_bf16_autocast(name: str) -> None:
    """Under bf16 autocast D's forward runs in bf16, but each penalty runs its own forward in fp32:
    the result equals the fp32 value, which a penalty taken from the bf16 forward misses."""
    d = SmallD()
    real, fake, labels = torch.randn(16, 6), torch.randn(16, 6), torch.arange(16) % 3

    def compute() -> torch.Tensor:
        if name == "gradient_penalty":
            return losses.gradient_penalty(d, real, fake, labels, torch.Generator().manual_seed(1))
        return (losses.r1_penalty if name == "r1" else losses.r2_penalty)(d, real if name == "r1" else fake, labels)

    reference = compute()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d.body(real).dtype == torch.bfloat16  # autocast is on for D's ordinary forward
        value = compute()
        x = real.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(d(x, labels).sum(), x, create_graph=True)
        from_bf16 = grad.float().pow(2).sum(dim=1).mean()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=0)
    if name == "r1":  # the tolerance above would catch a penalty taken in bf16
        assert abs(from_bf16.item() - reference.item()) > 1e-6 * reference.item() * 10


FP32_UNDER_ACCELERATE = """
import json, sys, torch
from ganpipe.config_files import load_config
from tests.fixtures import new_run_dir
from ganpipe.losses import r1_penalty, r2_penalty
from ganpipe.networks import build_discriminator
from ganpipe.trainer import Trainer

cfg = load_config(sys.argv[1], ["train.mixed_precision=bf16", "train.cpu=true", "train.r1_gamma=1",
                                "train.r2_gamma=1"])
trainer = Trainer(cfg, new_run_dir(cfg))
plain = build_discriminator(trainer.spec)
plain.load_state_dict(trainer.nets.d_raw.state_dict())
x, _ = trainer.real_batch()
out = {}
for name, penalty in (("r1", r1_penalty), ("r2", r2_penalty)):
    ours, reference = penalty(trainer.d_fp32, x, None), penalty(plain, x, None)
    out[name] = {"dtype": str(ours.dtype), "ours": ours.item(), "reference": reference.item(),
                 "through_accelerate": penalty(trainer.nets.D, x, None).item()}
print(json.dumps(out))
"""


def test_trainer_penalties_escape_accelerates_autocast(tmp_path: Path) -> None:
    """Accelerate wraps D's forward in bf16 autocast itself; the trainer's penalties use D's own
    forward (taken before prepare), so they stay fp32 in a bf16 run."""
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS)
    proc = subprocess.run([sys.executable, "-c", FP32_UNDER_ACCELERATE, str(config)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, row in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert row["dtype"] == "torch.float32", name
        assert row["ours"] == pytest.approx(row["reference"], rel=1e-6), name
        assert row["through_accelerate"] != pytest.approx(row["reference"], rel=1e-5), name  # bf16 there


# --- lazy regularisation, in the real trainer ---------------------------------------------------

def test_lazy_regularisation_runs_every_nth_d_update_scaled_by_n(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ganpipe import trainer as trainer_module
    from tests.fixtures import new_run_dir

    cfg = load_config(write_config(tmp_path / "c.yaml", TINY_DIGITS),
                      ["train.r1_gamma=2", "train.r2_gamma=0.5", "train.reg_every=3", "train.cpu=true"])
    trainer = trainer_module.Trainer(cfg, new_run_dir(cfg))
    calls: list[tuple[str, int]] = []

    def counting(name: str, value: float):
        def penalty(critic, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            assert critic == trainer.penalty_critic  # D's fp32 forward, not Accelerate's
            calls.append((name, trainer.d_updates))
            return torch.tensor(value)
        return penalty

    monkeypatch.setattr(trainer_module, "r1_penalty", counting("r1", 10.0))
    monkeypatch.setattr(trainer_module, "r2_penalty", counting("r2", 100.0))
    # Keep D's loss at 0 (with a graph), so the logged d_loss is the penalties' term alone.
    trainer.objective = losses.Objective(lambda real, fake: 0 * (real.sum() + fake.sum()), trainer.objective.g)
    d_losses, r1_logged = [], []
    for _ in range(7):
        stats = trainer.discriminator_update()
        d_losses.append(stats["d_loss"].item())
        r1_logged.append(stats["r1_penalty"].item())
    assert calls == [(name, update) for update in (0, 3, 6) for name in ("r1", "r2")]
    due = 3 * (0.5 * 2 * 10.0 + 0.5 * 0.5 * 100.0)  # N x gamma/2 x penalty, for R1 and R2
    assert d_losses == pytest.approx([due, 0, 0, due, 0, 0, due])
    assert r1_logged == [10.0] * 7  # every step reports the latest penalty


# --- through the CLI ----------------------------------------------------------------------------

def test_relativistic_training_with_r1_r2_and_lazy_regularisation(tmp_path: Path) -> None:
    import mlflow

    config = write_config(tmp_path / "c.yaml", TINY_DIGITS.replace("steps: 20", "steps: 6")
                          .replace("log_every: 10", "log_every: 3"))
    result = run_cli("train", str(config), "--set", "train.loss=relativistic", "--set", "train.r1_gamma=1",
                     "--set", "train.r2_gamma=1", "--set", "train.reg_every=2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert out["steps"] == 6 and (out["d_updates"], out["g_updates"]) == (6, 6)
    mlflow.set_tracking_uri(f"sqlite:///{os.environ['GANPIPE_HOME']}/mlflow.db")
    client = mlflow.MlflowClient()
    for key in ("d_loss", "g_loss", "r1_penalty", "r2_penalty"):
        history = client.get_metric_history(out["mlflow_run_id"], key)
        assert [m.step for m in history] == [3, 6], key
        assert all(math.isfinite(m.value) for m in history), key
    assert client.get_run(out["mlflow_run_id"]).data.metrics["r2_gamma"] == 1.0

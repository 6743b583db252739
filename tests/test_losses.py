"""Each GAN objective against its textbook formula, and the penalties against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ganpipe import losses

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

    from ganpipe.config import LossName

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
    real = torch.randn(10, 3, requires_grad=True)
    logits = (real**2).sum(dim=1)
    expected = (4 * real.detach() ** 2).sum(dim=1).mean()
    assert torch.allclose(losses.r1_penalty(logits, real), expected, atol=1e-5)

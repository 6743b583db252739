"""GAN objectives, each a small function of discriminator logits.

Discriminator losses take (real_logits, fake_logits) and are minimised by D; generator losses
take fake_logits and are minimised by G. With D(x) = sigmoid(logit):

- minimax (Goodfellow et al. 2014): D maximises log D(x) + log(1 - D(G(z))); G minimises
  log(1 - D(G(z))). Saturates: when D rejects fakes confidently, G's gradient vanishes.
- non_saturating: the same D; G maximises log D(G(z)) instead (the paper's practical variant).
- hinge (Lim & Ye; Miyato et al.), least_squares (Mao et al.), wgan_gp (Gulrajani et al.: the
  critic's Wasserstein estimate plus a gradient penalty toward unit norm on interpolates).
- r1_penalty (Mescheder et al.): squared gradient norm on real data, a regulariser for any loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def d_logistic(real: Tensor, fake: Tensor) -> Tensor:
    """-log D(x) - log(1 - D(G(z))), shared by minimax and non-saturating."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_minimax(fake: Tensor) -> Tensor:
    """log(1 - D(G(z))) = -softplus(logit)."""
    return -F.softplus(fake).mean()


def g_non_saturating(fake: Tensor) -> Tensor:
    """-log D(G(z)) = softplus(-logit)."""
    return F.softplus(-fake).mean()


def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_hinge(fake: Tensor) -> Tensor:
    return -fake.mean()


def d_least_squares(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * ((real - 1.0) ** 2).mean() + 0.5 * (fake**2).mean()


def g_least_squares(fake: Tensor) -> Tensor:
    return 0.5 * ((fake - 1.0) ** 2).mean()


def d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def g_wasserstein(fake: Tensor) -> Tensor:
    return -fake.mean()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "minimax": (d_logistic, g_minimax),
    "non_saturating": (d_logistic, g_non_saturating),
    "hinge": (d_hinge, g_hinge),
    "least_squares": (d_least_squares, g_least_squares),
    "wgan_gp": (d_wasserstein, g_wasserstein),
}


def _input_gradients(outputs: Tensor, inputs: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(outputs=outputs.sum(), inputs=inputs, create_graph=True)
    return grad.flatten(1)


def gradient_penalty(critic: Callable[..., Tensor], real: Tensor, fake: Tensor,
                     labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """E[(||grad_x critic(x_hat)||_2 - 1)^2] on random interpolates x_hat of real and fake."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(shape, generator=generator).to(real.device, real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    grad = _input_gradients(critic(mixed, labels), mixed)
    return ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """E[||grad_x D(x)||^2] on real samples (`real` must require grad when D ran on it)."""
    grad = _input_gradients(real_logits, real)
    return grad.pow(2).sum(dim=1).mean()

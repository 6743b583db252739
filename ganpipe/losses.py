"""GAN objectives, each a small function of discriminator logits, and the gradient penalties.

Discriminator losses take (real_logits, fake_logits) and are minimised by D; generator losses
take (fake_logits, real_logits) and are minimised by G; only the relativistic one reads the real
logits (the others accept None there). With D(x) = sigmoid(logit):

- minimax (Goodfellow et al. 2014): D maximises log D(x) + log(1 - D(G(z))); G minimises
  log(1 - D(G(z))). Saturates: when D rejects fakes confidently, G's gradient vanishes.
- non_saturating: the same D; G maximises log D(G(z)) instead (the paper's practical variant).
- hinge (Lim & Ye; Miyato et al.), least_squares (Mao et al.), wgan_gp (Gulrajani et al.: the
  critic's Wasserstein estimate plus a gradient penalty toward unit norm on interpolates).
- relativistic (RpGAN: Jolicoeur-Martineau 2018; Huang et al. 2024, R3GAN): D judges whether a
  real sample looks more real than a generated one, on pairs (x_i, G(z_i)).
- r1_penalty (Mescheder et al. 2018): squared gradient norm on real data; r2_penalty: the same on
  generated data (R3GAN regularises with both).
- mode_seeking (MSGAN: Mao et al. 2019): a generator term against collapse within a class; pairs
  of samples of one class from two latents are pushed apart in proportion to their latents.

The penalties run their own forward pass in fp32 (see `squared_gradient_norm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Critic = Callable[[Tensor, Tensor | None], Tensor]  # D as a function of (inputs, labels)


def d_logistic(real: Tensor, fake: Tensor) -> Tensor:
    """-log D(x) - log(1 - D(G(z))), shared by minimax and non-saturating."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_minimax(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """log(1 - D(G(z))) = -softplus(logit)."""
    return -F.softplus(fake).mean()


def g_non_saturating(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """-log D(G(z)) = softplus(-logit)."""
    return F.softplus(-fake).mean()


def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_hinge(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return -fake.mean()


def d_least_squares(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * ((real - 1.0) ** 2).mean() + 0.5 * (fake**2).mean()


def g_least_squares(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return 0.5 * ((fake - 1.0) ** 2).mean()


def d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def g_wasserstein(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return -fake.mean()


def d_relativistic(real: Tensor, fake: Tensor) -> Tensor:
    """softplus(-(D(x_i) - D(G(z_i)))): -log sigmoid of how much more real x_i looks than its
    paired fake. Pairs are taken element by element (as RSGAN's and R3GAN's code do)."""
    return F.softplus(fake - real).mean()


def g_relativistic(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """The mirror of D's: softplus(-(D(G(z_i)) - D(x_i))). The real logits carry no gradient
    (D is frozen in the generator update); they set the bar each fake is judged against."""
    if real is None:
        raise ValueError("the relativistic generator loss needs real logits")
    return F.softplus(real - fake).mean()


class Objective(NamedTuple):
    """One `train.loss`: D's loss of (real, fake) logits and G's of (fake, real). `g_needs_real`:
    G's loss reads real logits, so the generator update also runs D on a real batch."""

    d: Callable[[Tensor, Tensor], Tensor]
    g: Callable[[Tensor, Tensor | None], Tensor]
    g_needs_real: bool = False


LOSSES: dict[str, Objective] = {
    "minimax": Objective(d_logistic, g_minimax),
    "non_saturating": Objective(d_logistic, g_non_saturating),
    "hinge": Objective(d_hinge, g_hinge),
    "least_squares": Objective(d_least_squares, g_least_squares),
    "wgan_gp": Objective(d_wasserstein, g_wasserstein),
    "relativistic": Objective(d_relativistic, g_relativistic, g_needs_real=True),
}


def squared_gradient_norm(critic: Critic, inputs: Tensor, labels: Tensor | None) -> Tensor:
    """E[||grad_x critic(x)||^2] over the batch `inputs`, differentiable in the critic's weights.

    Computed in fp32 whatever the training precision: a separate forward with autocast disabled
    on float32 copies of the inputs. In bf16 the gradient's 8-bit mantissa makes the squared norm
    too coarse to regularise with, and in fp16 it over- or underflows; the extra forward is the
    price, which lazy regularisation (`train.reg_every`) divides. `critic` must not re-enable
    autocast itself (the trainer passes D's forward from before Accelerate wrapped it)."""
    x = inputs.detach().float().requires_grad_(True)
    with torch.autocast(x.device.type, enabled=False):
        return _input_gradients(critic(x, labels), x).pow(2).sum(dim=1).mean()


def _input_gradients(outputs: Tensor, inputs: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(outputs=outputs.float().sum(), inputs=inputs, create_graph=True)
    return grad.flatten(1)


def gradient_penalty(critic: Critic, real: Tensor, fake: Tensor,
                     labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """E[(||grad_x critic(x_hat)||_2 - 1)^2] on random interpolates x_hat of real and fake, in
    fp32 like `squared_gradient_norm`."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(shape, generator=generator).to(real.device, torch.float32, non_blocking=True)
    mixed = (alpha * real.detach().float() + (1 - alpha) * fake.detach().float()).requires_grad_(True)
    with torch.autocast(mixed.device.type, enabled=False):
        grad = _input_gradients(critic(mixed, labels), mixed)
    return ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


def r1_penalty(critic: Critic, real: Tensor, labels: Tensor | None) -> Tensor:
    """R1: E_x[||grad_x D(x)||^2] on real samples. Zero at a D that is flat on the data, which
    keeps D from pushing G with ever steeper gradients near the data (Mescheder et al. 2018)."""
    return squared_gradient_norm(critic, real, labels)


def r2_penalty(critic: Critic, fake: Tensor, labels: Tensor | None) -> Tensor:
    """R2: E_z[||grad_x D(x)||^2 at x = G(z)], R1 on generated samples (taken as constants: the
    penalty trains D only). With R1 it makes RpGAN converge locally (Huang et al. 2024)."""
    return squared_gradient_norm(critic, fake, labels)


MODE_SEEKING_EPS = 1e-5  # MSGAN's: bounds the term when two samples coincide


def mode_seeking_pairs(labels: Tensor) -> Tensor:
    """The labels with each odd row given its even neighbour's: rows 2i and 2i+1 are then one
    class from two latents, the pairs `diversity_ratio` compares. Same draws, no extra randomness."""
    paired = labels.clone()
    half = len(labels) // 2
    paired[1:2 * half:2] = labels[0:2 * half:2]
    return paired


def diversity_ratio(fake: Tensor, z: Tensor) -> Tensor:
    """mean |G(z_2i) - G(z_2i+1)| / mean |z_2i - z_2i+1| over the batch's pairs (MSGAN's ratio of
    image distance to latent distance; an odd last row is left out). Near 0: G maps distinct
    latents of a class to one image, the collapse the term fights."""
    half = len(fake) // 2
    first, second = fake[0:2 * half:2].float(), fake[1:2 * half:2].float()
    return (first - second).abs().mean() / (z[0:2 * half:2] - z[1:2 * half:2]).abs().mean()


def mode_seeking(ratio: Tensor) -> Tensor:
    """MSGAN's generator term 1 / (ratio + eps), minimised: it grows as the pairs collapse."""
    return 1.0 / (ratio + MODE_SEEKING_EPS)

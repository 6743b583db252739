"""Training hyperparameters as pure functions of the step.

Nothing here keeps state: each value is computed from the config and the step alone, so a resumed
run follows exactly the curve an uninterrupted one would, and a checkpoint needs to hold nothing
for them (the optimisers' saved learning rates and betas are overwritten before every update).

- Learning rates (`train.lr_decay`): constant, or from the base rate to 0 between
  `train.lr_decay_start * train.steps` and the last step, linearly or along a half cosine.
- R1/R2 weights (`train.gamma_decay`): constant, or from `r1_gamma` / `r2_gamma` to
  `train.gamma_final_ratio` times that over the first `train.anneal_steps` steps (R3GAN anneals
  gamma so the regularisation that stabilises early training does not blur the end result).
- Adam's beta2 (`train.beta2_final`): from `train.betas[1]` to it over `train.anneal_steps`
  (R3GAN: 0.9 -> 0.99, a short gradient memory early when the networks change fast, a long one late).
- The ADA target (`train.ada_target`, `train.ada_target_final`): the value the augmentation
  probability steers the discriminator's overfitting signal towards; the augmentation owns ADA.
- The labels' strength (`train.condition_ramp`): 0 (unconditional) until the ramp's start, then
  linearly to 1 (fully conditional) at its end; the networks multiply their label inputs by it.

Annealed values (gamma, beta2, ADA target) follow a half cosine (R3GAN's choice, except gamma,
whose curve is `train.gamma_decay`) and hold their final value after `train.anneal_steps`.
"""

from __future__ import annotations

import math
from typing import Literal

from ganpipe.config import TrainConfig

Shape = Literal["linear", "cosine"]


def ramp(start: float, end: float, progress: float, shape: Shape) -> float:
    """The value `progress` (clamped to [0, 1]) of the way from start to end along `shape`.
    Continuous in progress, exactly `start` at 0 and `end` at 1."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return start + (end - start) * p
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def anneal_horizon(t: TrainConfig) -> int:
    """Steps over which the annealed values move: `train.anneal_steps`, by default the whole run."""
    return t.anneal_steps if t.anneal_steps is not None else t.steps


def follows_steps(t: TrainConfig) -> bool:
    """Whether some value's curve depends on `train.steps` (raising the steps then changes the
    trajectory, so a longer run is a different run)."""
    annealed = t.gamma_decay != "none" or t.beta2_final is not None or t.ada_target_final is not None
    return t.lr_decay != "none" or t.condition_ramp is not None or (annealed and t.anneal_steps is None)


def lr_factor(t: TrainConfig, step: int) -> float:
    """Multiplier of `train.g_lr` and `train.d_lr` for the update at `step` (0-based)."""
    if t.lr_decay == "none":
        return 1.0
    start = t.lr_decay_start * t.steps
    return ramp(1.0, 0.0, max(0.0, step - start) / max(t.steps - start, 1.0), t.lr_decay)


def learning_rates(t: TrainConfig, step: int) -> tuple[float, float]:
    """(generator, discriminator) learning rates for the update at `step`."""
    factor = lr_factor(t, step)
    return t.g_lr * factor, t.d_lr * factor


def gamma(t: TrainConfig, base: float, step: int) -> float:
    """An R1 or R2 weight (`base`: `train.r1_gamma` or `train.r2_gamma`) at `step`."""
    if t.gamma_decay == "none" or base == 0:
        return base
    return ramp(base, base * t.gamma_final_ratio, step / anneal_horizon(t), t.gamma_decay)


def beta2(t: TrainConfig, step: int) -> float:
    """Adam's beta2 for both optimisers at `step`."""
    if t.beta2_final is None:
        return t.betas[1]
    return ramp(t.betas[1], t.beta2_final, step / anneal_horizon(t), "cosine")


def ada_target(t: TrainConfig, step: int) -> float:
    """The ADA target at `step`: `train.ada_target`, annealed to `train.ada_target_final` when set."""
    if t.ada_target_final is None:
        return t.ada_target
    return ramp(t.ada_target, t.ada_target_final, step / anneal_horizon(t), "cosine")


def regularise_now(t: TrainConfig, d_update: int) -> bool:
    """Lazy regularisation: whether the D update numbered `d_update` (0-based) computes R1/R2.
    Every `train.reg_every`-th one does, starting with the first (StyleGAN2's schedule)."""
    return d_update % t.reg_every == 0


def penalty_weight(t: TrainConfig, base: float, step: int, d_update: int) -> float:
    """What multiplies an R1/R2 penalty in the D loss of this update: gamma/2 (the usual
    (gamma/2) E||grad D||^2), times `train.reg_every` on the updates that compute it, so the
    penalty's average strength does not depend on how often it runs; 0 on the others."""
    if not regularise_now(t, d_update):
        return 0.0
    return 0.5 * gamma(t, base, step) * t.reg_every


def condition_strength(t: TrainConfig, step: int) -> float:
    """How strongly the labels enter G and D at `step` (`train.condition_ramp`): 0 before the ramp's
    start, linear to 1 at its end, 1 after it and without a ramp."""
    if t.condition_ramp is None:
        return 1.0
    start, end = (fraction * t.steps for fraction in t.condition_ramp)
    return ramp(0.0, 1.0, (step - start) / max(end - start, 1e-9), "linear")

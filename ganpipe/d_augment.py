"""Differentiable augmentation of what the discriminator sees (`train.augment`).

On a few thousand images or fewer, D memorises the training set and the generator's gradients
stop carrying information. Augmenting every image D sees, real and generated, in both updates,
keeps D from memorising while the generator still learns the un-augmented distribution, as long
as the augmentation is differentiable (G's gradients pass through it) and does not "leak" (the
generator cannot lower its loss by producing augmented-looking images). (`ganpipe.augment` is
something else: it mixes real and synthetic datasets.)

- `diffaug`: DiffAugment (Zhao et al. 2020), always on: colour (brightness, saturation,
  contrast), translation by up to 1/8 of the image with zero padding, cutout of half the size.
- `ada`: adaptive discriminator augmentation (Karras et al. 2020). Each transform is applied to
  each sample with probability p, drawn independently: x-flip, 90-degree rotations, integer
  translation (up to 1/8, reflection padding), isotropic and anisotropic scaling (bilinear,
  reflection padding), brightness, contrast, saturation (RGB), cutout, or the subset
  `train.ada_transforms` names (the others are drawn but never applied, so the stream is the
  same). With p < 1 these do not leak. Every `train.ada_interval` D updates, p moves by
  sign(r_t - target) * batch * interval / (ada_kimg * 1000), where r_t = E[sign(D(real))] over
  those updates on every rank: a D that is confident on real data (overfitting) gets more
  augmentation, one that is not gets less.
  As in ADA, an applied x-flip or rotation draws its parameter (flip or not; 0-3 quarter turns).

The penalties see what D sees: R1 is taken on augmented reals w.r.t. the un-augmented ones
(through the augmentation, as StyleGAN2-ADA does), and WGAN-GP's interpolates lie between
augmented reals and fakes.

All randomness comes from one explicit CPU generator per rank, seeded from the run's seed: the
same seed gives the same augmentation, and its state (with p and the sign statistics of the
current interval) is checkpointed, so a resumed run continues bitwise exactly on CPU. Only
per-sample parameters are drawn on the CPU; the pixels stay on the training device. The parameters
go to the device with non-blocking copies, and the decisions on them (which transforms any sample
needs) are taken on the CPU, so an augmented step never waits for the device; ADA's p update reads
the sign statistics back once every `ada_interval` D updates (its one synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, get_args

import torch

from ganpipe.config_values import AdaTransform

Tensor = torch.Tensor
POLICIES = ("none", "diffaug", "ada")
TRANSLATE = 0.125  # largest translation, as a fraction of the image (both policies)
CUTOUT = 0.5  # cutout square's side, as a fraction of the image (both policies)
P_MAX = 0.999  # p stays below 1: at p = 1 every sample is transformed and augmentations can leak
# ADA's parameter spreads (log2 scale for multiplicative ones), those of the paper's `bgc` pipeline.
SCALE_STD, ANISO_STD, BRIGHTNESS_STD, CONTRAST_STD, SATURATION_STD = 0.2, 0.2, 0.2, 0.5, 1.0
ADA_TRANSFORMS: tuple[str, ...] = get_args(AdaTransform)  # the config's list, in the order they are drawn


def augment_seed(seed: int, rank: int) -> int:
    """The augmentation stream's seed: per rank (each rank augments its own samples), and apart
    from the latent-noise stream (ganpipe.trainer), so switching augmentation on leaves the
    latents of a run unchanged."""
    return seed * 7919 + 1_000_003 + rank


class DiscriminatorAugment:
    """One rank's augmentation: call it on every batch D sees; `observe` D's logits on real
    batches and call `after_d_update` after each D update so ADA can adjust p."""

    def __init__(self, policy: str, seed: int, rank: int = 0, *, batch_size: int = 64, interval: int = 4,
                 kimg: float = 100.0, transforms: tuple[str, ...] = ADA_TRANSFORMS,
                 device: torch.device | str = "cpu"):
        if policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r} (known: {', '.join(POLICIES)})")
        unknown = set(transforms) - set(ADA_TRANSFORMS)
        if unknown:
            raise ValueError(f"unknown ADA transform(s) {sorted(unknown)} (known: {', '.join(ADA_TRANSFORMS)})")
        self.policy, self.seed, self.rank, self.transforms = policy, seed, rank, frozenset(transforms)
        self.interval = interval
        self.p_step = batch_size * interval / (kimg * 1000.0)  # ADA's speed: p can go 0 -> 1 in kimg*1000 images
        self.p = 0.0
        self.generator = torch.Generator().manual_seed(augment_seed(seed, rank))
        self.signs = torch.zeros(2, device=device)  # [sum of sign(D(real)), count] in this interval, this rank

    @property
    def active(self) -> bool:
        """Whether a call can change its input now (no copy of the batch otherwise)."""
        return self.policy == "diffaug" or (self.policy == "ada" and self.p > 0)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        if self.policy == "diffaug":
            return diffaugment(x, self.generator)
        return ada_augment(x, ada_params(x.shape[0], self.p, self.generator, self.transforms))

    def observe(self, real_logits: Tensor) -> None:
        """Accumulate sign(D(real)) for ADA's overfitting heuristic (no host sync)."""
        if self.policy == "ada":
            logits = real_logits.detach().float()
            self.signs[0] += torch.sign(logits).sum()
            self.signs[1] += logits.numel()

    def after_d_update(self, d_updates: int, target: float, reduce: Callable[[Tensor, str], Tensor]) -> None:
        """Every `interval` D updates: r_t from every rank's signs (`reduce(tensor, "sum")`, a
        collective, so every rank gets the same p), then p moves toward the target."""
        if self.policy != "ada" or d_updates % self.interval:
            return
        total, count = reduce(self.signs.clone(), "sum").tolist()
        r_t = total / max(count, 1.0)
        direction = (r_t > target) - (r_t < target)
        self.p = min(max(self.p + direction * self.p_step, 0.0), P_MAX)
        self.signs.zero_()

    def stats(self, device: torch.device) -> dict[str, Tensor]:
        # A fill on the device, not a copy from the host: no wait for the device.
        return {"ada_p": torch.full((), self.p, device=device)} if self.policy == "ada" else {}

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self, gather: Callable[[Tensor], Tensor], reduce: Callable[[Tensor, str], Tensor]
                   ) -> dict[str, Any]:
        """Collective (call on every rank): p, the interval's summed sign statistics, and every
        rank's generator state."""
        rng = gather(self.generator.get_state().to(self.signs.device)[None]).cpu()
        return {"p": self.p, "signs": reduce(self.signs.clone(), "sum").cpu(), "rng": rng}

    def load_state_dict(self, state: dict[str, Any], rank: int, world: int, step: int) -> None:
        """Restore; the summed statistics go to rank 0 (only their sum matters). A different
        number of processes continues with fresh streams, as the latent noise does."""
        self.p = float(state["p"])
        rng = state["rng"]
        if len(rng) == world:
            self.generator.set_state(rng[rank])
        else:
            self.generator.manual_seed(augment_seed(self.seed, rank) + step)
        self.signs.copy_(state["signs"] if rank == 0 else torch.zeros(2))


# --- DiffAugment ---------------------------------------------------------------------------------
def diffaugment(x: Tensor, generator: torch.Generator) -> Tensor:
    """DiffAugment's colour, translation, cutout policy on a batch (B, C, H, W) in [-1, 1]."""
    b, _, h, w = x.shape

    def uniform() -> Tensor:
        return torch.rand(b, 1, 1, 1, generator=generator).to(x.device, x.dtype, non_blocking=True)

    x = x + (uniform() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (uniform() * 2) + mean  # saturation (a no-op on one channel)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (uniform() + 0.5) + mean  # contrast
    shift_h, shift_w = int(h * TRANSLATE + 0.5), int(w * TRANSLATE + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, (b,), generator=generator).to(x.device, non_blocking=True)
    dx = torch.randint(-shift_w, shift_w + 1, (b,), generator=generator).to(x.device, non_blocking=True)
    rows, cols = _pixel_grid(b, h, w, x.device)
    x = _remap(x, rows + dy[:, None, None], cols + dx[:, None, None], zero_outside=True)
    size_h, size_w = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
    # The square's centre lands anywhere in the image (the reference's offsets, odd sizes included).
    top = torch.randint(0, h + (1 - size_h % 2), (b,), generator=generator) - size_h // 2
    left = torch.randint(0, w + (1 - size_w % 2), (b,), generator=generator) - size_w // 2
    full = torch.ones(b)
    return _cutout(x, top.float(), left.float(), full * size_h, full * size_w)


# --- ADA -----------------------------------------------------------------------------------------
def ada_params(batch: int, p: float, generator: torch.Generator,
               transforms: Collection[str] = ADA_TRANSFORMS) -> dict[str, Tensor]:
    """Per-sample parameters of every ADA transform (CPU tensors of length `batch`): each of
    `transforms` is applied with probability p (`applied_<name>`), else it holds its identity
    value; the others never are. The same draws whatever p and `transforms` are, so the stream's
    position depends on the batches alone (and the default set's draws are those of before)."""
    params: dict[str, Tensor] = {}

    def applied_mask(name: str) -> Tensor:
        mask = torch.rand(batch, generator=generator) < p
        return mask if name in transforms else torch.zeros_like(mask)

    def draw(name: str, values: Tensor, identity: float) -> Tensor:
        applied = applied_mask(name)
        params[f"applied_{name}"] = applied
        return torch.where(applied, values, torch.full_like(values, identity))

    params["xflip"] = draw("xflip", torch.randint(0, 2, (batch,), generator=generator).float(), 0.0)
    params["rotate90"] = draw("rotate90", torch.randint(0, 4, (batch,), generator=generator).float(), 0.0)
    shift = (torch.rand(2, batch, generator=generator) * 2 - 1) * TRANSLATE  # fraction of the image
    applied = applied_mask("translate")
    params["applied_translate"] = applied
    params["translate_y"], params["translate_x"] = (torch.where(applied, s, torch.zeros_like(s)) for s in shift)
    params["scale"] = draw("scale", torch.exp2(torch.randn(batch, generator=generator) * SCALE_STD), 1.0)
    params["aniso"] = draw("aniso", torch.exp2(torch.randn(batch, generator=generator) * ANISO_STD), 1.0)
    params["brightness"] = draw("brightness", torch.randn(batch, generator=generator) * BRIGHTNESS_STD, 0.0)
    params["contrast"] = draw("contrast", torch.exp2(torch.randn(batch, generator=generator) * CONTRAST_STD), 1.0)
    params["saturation"] = draw("saturation",
                                torch.exp2(torch.randn(batch, generator=generator) * SATURATION_STD), 1.0)
    centre = torch.rand(2, batch, generator=generator)
    params["cutout"] = draw("cutout", torch.full((batch,), CUTOUT), 0.0)
    params["cutout_y"], params["cutout_x"] = centre
    return params


def ada_augment(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Apply `ada_params` to a batch (B, C, H, W): geometry, then colour, then cutout. A sample
    none of whose transforms applies comes out bitwise unchanged; a transform no sample needs is
    skipped (the decisions are on the CPU: no device sync)."""
    b, c, h, w = x.shape
    flip, quarter = params["xflip"].bool(), params["rotate90"].long()
    dy = torch.round(params["translate_y"] * h).long()
    dx = torch.round(params["translate_x"] * w).long()
    if flip.any() or quarter.any() or dy.any() or dx.any():
        if h != w and quarter.any():
            raise ValueError(f"90-degree rotations need square images, got {h}x{w}")
        # Output pixel (i, j) -> source pixel M (i, j) + o: k quarter turns, then a mirror, then
        # the shift, reflected at the borders. M and o are per-sample integers, built on the CPU.
        turns = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [-1, 0]], [[-1, 0], [0, -1]], [[0, -1], [1, 0]]])
        offsets = torch.tensor([[0, 0], [0, h - 1], [h - 1, w - 1], [w - 1, 0]])
        matrix, offset = turns[quarter].clone(), offsets[quarter].clone()
        matrix[flip, 1] = -matrix[flip, 1]
        offset[flip, 1] = w - 1 - offset[flip, 1]
        offset = offset - torch.stack([dy, dx], dim=1)
        matrix = matrix.to(x.device, non_blocking=True).view(b, 2, 2, 1, 1)
        offset = offset.to(x.device, non_blocking=True).view(b, 2, 1, 1)
        i = torch.arange(h, device=x.device).view(1, h, 1)
        j = torch.arange(w, device=x.device).view(1, 1, w)
        rows = _reflect(matrix[:, 0, 0] * i + matrix[:, 0, 1] * j + offset[:, 0], h)
        cols = _reflect(matrix[:, 1, 0] * i + matrix[:, 1, 1] * j + offset[:, 1], w)
        x = _remap(x, rows, cols, zero_outside=False)
    scale_y, scale_x = params["scale"] / params["aniso"], params["scale"] * params["aniso"]
    if (scale_y != 1).any() or (scale_x != 1).any():
        x = _rescale(x, scale_y.to(x.device, non_blocking=True), scale_x.to(x.device, non_blocking=True))
    per_sample = (b, 1, 1, 1)
    if params["applied_brightness"].any():
        x = x + params["brightness"].view(per_sample).to(x.device, x.dtype, non_blocking=True)
    if params["applied_contrast"].any():  # about mid-grey (0 in network space), as ADA does
        x = x * params["contrast"].view(per_sample).to(x.device, x.dtype, non_blocking=True)
    if c > 1 and params["applied_saturation"].any():  # lerp away from / toward the grey axis
        mean = x.mean(dim=1, keepdim=True)
        saturated = mean + (x - mean) * params["saturation"].view(per_sample).to(x.device, x.dtype, non_blocking=True)
        x = torch.where(params["applied_saturation"].view(per_sample).to(x.device, non_blocking=True), saturated, x)
    if params["applied_cutout"].any():
        size = params["cutout"]
        x = _cutout(x, params["cutout_y"] * h - size * h / 2, params["cutout_x"] * w - size * w / 2,
                    size * h, size * w)
    return x


# --- shared pixel operations (all differentiable w.r.t. the image, to any order) ----------------
def _pixel_grid(b: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows = torch.arange(h, device=device).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w, device=device).view(1, 1, w).expand(b, h, w)
    return rows, cols


def _reflect(index: Tensor, n: int) -> Tensor:
    """Mirror indices into [0, n) (shifts are at most 1/8 of n, so one reflection suffices)."""
    index = index.abs()
    return torch.where(index >= n, 2 * (n - 1) - index, index)


def _remap(x: Tensor, rows: Tensor, cols: Tensor, zero_outside: bool) -> Tensor:
    """out[b, :, i, j] = x[b, :, rows[b, i, j], cols[b, i, j]] (0 outside the image when asked):
    a gather, whose gradient is a scatter-add, both differentiable again (R1 through it)."""
    b, c, h, w = x.shape
    inside = None
    if zero_outside:
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    index = (rows * w + cols).reshape(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out * inside[:, None].to(x.dtype) if inside is not None else out


def _source_coordinates(n: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for zooming by `scale` (B,) about the centre, reflection
    padded: (low index, high index, weight of high), each (B, n). Scale 1 gives the identity
    exactly (integer coordinates, weight 0)."""
    centre = n / 2
    position = (torch.arange(n, device=scale.device, dtype=torch.float32)[None] + 0.5 - centre) \
        / scale[:, None].float() + centre - 0.5
    period = 2 * (n - 1)
    position = torch.remainder(position, period)
    position = torch.where(position > n - 1, period - position, position)
    low = position.floor()
    return low.long(), (low + 1).clamp(max=n - 1).long(), position - low


def _rescale(x: Tensor, scale_y: Tensor, scale_x: Tensor) -> Tensor:
    """Per-sample axis-aligned zoom, separable: interpolate along rows, then along columns."""
    b, c, h, w = x.shape
    low, high, weight = _source_coordinates(h, scale_y)
    shape = (b, c, h, w)
    taps = [x.gather(2, i.view(b, 1, h, 1).expand(shape)) for i in (low, high)]
    x = torch.lerp(taps[0], taps[1], weight.view(b, 1, h, 1).to(x.dtype))
    low, high, weight = _source_coordinates(w, scale_x)
    taps = [x.gather(3, i.view(b, 1, 1, w).expand(shape)) for i in (low, high)]
    return torch.lerp(taps[0], taps[1], weight.view(b, 1, 1, w).to(x.dtype))


def _cutout(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Zero, per sample, the pixels whose centre lies in [top, top+height) x [left, left+width)
    (pixel units, CPU tensors (B,); a zero size cuts nothing)."""
    b, _, h, w = x.shape
    centres_y = torch.arange(h, dtype=torch.float32) + 0.5
    centres_x = torch.arange(w, dtype=torch.float32) + 0.5
    in_y = (centres_y[None] >= top[:, None]) & (centres_y[None] < (top + height)[:, None])
    in_x = (centres_x[None] >= left[:, None]) & (centres_x[None] < (left + width)[:, None])
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep.view(b, 1, h, w).to(x.device, x.dtype, non_blocking=True)


"""What a training run is made of, decided from the config and the prepared data before any
process starts: the networks' spec and the order of the real batches. The launcher checks the
spec before it starts workers; every training rank builds from the same two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ganpipe.config import Config
from ganpipe.data import PreparedData
from ganpipe.errors import UserError
from ganpipe.networks import NetworkSpec, check_spec
from ganpipe.sr_losses import VGGFeatureLoss


def network_spec(cfg: Config, data: PreparedData) -> NetworkSpec:
    """What to build, from the config and the prepared data. Bad combinations are UserErrors."""
    m = cfg.model
    if m.conditional and not data.classes:
        raise UserError("model.conditional: the prepared data has no labels (set data.label_column)")
    if m.family != "mlp" and data.kind != "image":
        raise UserError(f"model.family: {m.family} needs image data; use mlp for data.kind: vector")
    if cfg.train.augment != "none" and data.kind != "image":
        raise UserError(f"train.augment: {cfg.train.augment} augments images; data.kind is {data.kind} "
                        "(set train.augment: none)")
    sr = m.family == "srgan"
    if sr:
        check_super_resolution(cfg, data)
    if m.pack > 1 and m.conditional:
        raise UserError("model.pack: packing is for unconditional models")
    if cfg.train.condition_ramp is not None and not m.conditional:
        raise UserError("train.condition_ramp: ramps the labels' strength of a conditional model "
                        "(set model.conditional: true, or the ramp to null)")
    if cfg.train.condition_ramp is not None and m.family == "r3gan":
        raise UserError("train.condition_ramp: r3gan's discriminator has no unconditional output (its logit is "
                        "the label projection alone); use model.family dcgan, resnet or mlp, or the ramp null")
    if m.attention_resolution and m.family in ("mlp", "dcgan"):
        raise UserError(f"model.attention_resolution: only the resnet family has attention (model.family: {m.family})")
    if m.family == "dcgan":
        resolution = data.sample_shape[1]
        if resolution < 8 or resolution & (resolution - 1):
            raise UserError(f"data.resolution: DCGAN needs a power of two >= 8, got {resolution}")
    g_conditioning, d_norm, spectral_norm = _family_options(cfg)
    mean, std = data.vector_stats if data.kind == "vector" else ((), ())
    spec = NetworkSpec(
        family=m.family, sample_shape=data.sample_shape, latent_dim=0 if sr else m.latent_dim,
        num_classes=data.num_classes if m.conditional else 0, g_width=m.g_width, d_width=m.d_width,
        mlp_layers=m.mlp_layers, g_conditioning=g_conditioning, d_conditioning=m.d_conditioning,
        spectral_norm=spectral_norm, d_norm=d_norm, pack=m.pack, attention_resolution=m.attention_resolution,
        r3gan_expansion=m.r3gan_expansion, r3gan_group_size=m.r3gan_group_size, r3gan_blocks=m.r3gan_blocks,
        **({"scale": m.scale, "sr_blocks": m.sr_blocks, "sr_batch_norm": m.sr_batch_norm,
            "sr_input_skip": m.sr_input_skip} if sr else {}),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        columns=tuple(data.meta.get("columns") or ()), classes=tuple(data.classes or ()))
    try:
        check_spec(spec)  # the family's own rules (resolutions, attention, group sizes), before any process starts
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return spec


def check_super_resolution(cfg: Config, data: PreparedData) -> None:
    """What srgan needs beyond its networks' sizes: images kept at their own sizes, and settings
    of the latent families that have no meaning for it refused rather than ignored."""
    t = cfg.train
    if not data.native:
        raise UserError("model.family: srgan needs images prepared at their own sizes (data.resize: native)")
    if t.augment != "none":
        raise UserError(f"train.augment: srgan augments its crops itself (flips, rotations); set none, "
                        f"not {t.augment}")
    if t.best_metric != "none" or t.final_generator != "last":
        raise UserError("train.best_metric: srgan's checkpoints are not scored (set none; the run's generator "
                        "is the last EMA)")
    if t.lr_decay != "none" or t.beta2_final is not None:
        raise UserError("train.lr_decay: srgan keeps its rates constant across its stages (set none, and "
                        "train.beta2_final null)")
    if t.vgg_weights:  # a missing or wrong file fails here, before any process starts
        VGGFeatureLoss(Path(t.vgg_weights))
    if t.loss == "wgan_gp" or t.r1_gamma or t.r2_gamma:
        raise UserError("train.loss: srgan's adversarial objective is train.sr_gan_loss; gradient penalties "
                        "(wgan_gp, r1_gamma, r2_gamma) are not supported")


# The residual families build one way: G's conditioning, and a discriminator without batch norm.
RESIDUAL_G_CONDITIONING = {"resnet": "cbn", "r3gan": "embedding"}


def _family_options(cfg: Config) -> tuple[str, str, bool]:
    """(g_conditioning, d_norm, spectral_norm) as the family builds them. For resnet and r3gan the
    spec records what their builders do; a setting they cannot honour is a UserError, not ignored
    (except spectral_norm for resnet, whose discriminator always has it)."""
    m = cfg.model
    if m.family not in RESIDUAL_G_CONDITIONING:
        d_norm = m.d_norm
        if d_norm == "auto":
            t = cfg.train  # batch norm mixes samples: per-sample input gradients (penalties) need none
            d_norm = "none" if m.spectral_norm or t.loss == "wgan_gp" or t.r1_gamma or t.r2_gamma else "batch"
        return m.g_conditioning_used(), d_norm, m.spectral_norm
    family, g_conditioning = m.family, RESIDUAL_G_CONDITIONING[m.family]
    if m.g_conditioning not in ("auto", g_conditioning):
        raise UserError(f"model.g_conditioning: {family} conditions its generator by {g_conditioning}, "
                        f"not {m.g_conditioning} (use auto)")
    if m.d_conditioning != "projection":
        raise UserError(f"model.d_conditioning: {family} conditions its discriminator by projection, not {m.d_conditioning}")
    if m.d_norm == "batch":
        raise UserError(f"model.d_norm: {family}'s discriminator has no batch norm (use auto or none)")
    if family == "r3gan" and m.spectral_norm:
        raise UserError("model.spectral_norm: r3gan has no normalisation of any kind (set false)")
    return g_conditioning, "none", family == "resnet"


class BatchSampler:
    """Global batches from a stream of seeded permutations, split across processes.

    Its whole state is (epoch, cursor): a resumed run draws exactly the batches an uninterrupted
    run would. Batches run across epoch boundaries, so a dataset smaller than a batch still works."""

    def __init__(self, num_records: int, global_batch: int, seed: int, rank: int, world: int):
        self.n, self.batch, self.seed, self.rank, self.world = num_records, global_batch, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).numpy()

    def next_indices(self) -> np.ndarray:
        parts, need = [], self.batch
        while need:
            take = min(need, self.n - self.cursor)
            parts.append(self._perm[self.cursor:self.cursor + take])
            self.cursor += take
            need -= take
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        global_indices = np.concatenate(parts)
        local = self.batch // self.world
        return global_indices[self.rank * local:(self.rank + 1) * local]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)

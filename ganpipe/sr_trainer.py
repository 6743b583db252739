"""The super-resolution trainer (model.family srgan): the generic Trainer's networks, optimisers,
EMA, checkpoints, resume and schedules (ganpipe.trainer), with image-to-image updates and
fastai's/BasicSR's two-stage schedule, step by step:

1. `train.pretrain_steps` generator updates on the content loss alone (pixel, plus VGG19
   features when train.vgg_weights is set): the PSNR model, kept as `generator-psnr/`;
2. `train.critic_pretrain_steps` discriminator updates, real crops against that generator's
   outputs;
3. `train.steps` adversarial steps: content loss plus train.adversarial_weight x the adversarial
   term, with k discriminator updates per generator update (train.schedule fixed) or fastai's
   ping-pong (adaptive: switch sides when a side's loss is below its threshold).

Batches are (HR crop, LR input) pairs of the training part of the data only (held-out images are
never drawn), made by ganpipe.data.pairs with randomness keyed by the update counters, which the
checkpoints hold: a resumed run draws the same crops as an uninterrupted one.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from ganpipe import checkpoint, runs
from ganpipe.config import Config
from ganpipe.data.pairs import holdout_split, training_pairs
from ganpipe.metrics.sr import comparison_rows
from ganpipe.networks import images_to_network_space
from ganpipe.recipe import BatchSampler
from ganpipe.sr_losses import VGG_HOWTO, VGGFeatureLoss, d_adversarial, g_adversarial, pixel_loss
from ganpipe.trainer import Trainer, add_d_stats, add_stat

PREVIEW_IMAGES = 8


class SRTrainer(Trainer):
    def __init__(self, cfg: Config, run_dir: Path):
        super().__init__(cfg, run_dir)
        t = cfg.train
        self.feature_loss = VGGFeatureLoss(Path(t.vgg_weights)).to(self.device) if t.vgg_weights else None
        if self.feature_loss is None and self.accelerator.is_main_process and self.resumed_from is None:
            print(f"warning: {VGG_HOWTO}", file=sys.stderr, flush=True)

    # --- the schedule --------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.pretrain_steps + t.critic_pretrain_steps + t.steps

    def stage(self) -> str:
        """pretrain | critic | adversarial: the stage of the step about to run."""
        t = self.cfg.train
        if self.step < t.pretrain_steps:
            return "pretrain"
        return "critic" if self.step < t.pretrain_steps + t.critic_pretrain_steps else "adversarial"

    def iteration(self) -> dict[str, torch.Tensor]:
        t = self.cfg.train
        self.set_hyperparameters()
        stage, stats = self.stage(), {}
        if stage == "pretrain":
            stats.update(self.generator_update())
            if self.step + 1 == t.pretrain_steps:
                self.write_psnr_generator()
        elif stage == "critic":
            stats.update(self.discriminator_update())
        else:
            stats.update(self.adversarial_updates())
        self.record_finite(stats)
        return stats

    # --- data ----------------------------------------------------------------------------------
    def new_sampler(self) -> BatchSampler:
        """Batches over the training part only: positions in `train_indices`."""
        self.train_indices, self.holdout_indices = holdout_split(self.data.num_records,
                                                                 self.cfg.data.effective_holdout_fraction)
        acc = self.accelerator
        return BatchSampler(len(self.train_indices), self.cfg.train.batch_size, self.cfg.seed, acc.process_index,
                            acc.num_processes)

    def new_batches(self) -> None:
        """No real-batch stream: pairs are cropped and degraded per draw (`pair_batch`), from the
        sampler itself, whose position is then the data's."""
        return None

    def pair_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR, LR) in network space on the device. The key (seed, updates so far, rank) is unique
        to this draw and restored with the counters on resume."""
        indices = self.train_indices[self.sampler.next_indices()]
        key = (self.cfg.seed, self.d_updates, self.g_updates, self.accelerator.process_index)
        hr, lr = training_pairs(self.data, indices, self.spec.sample_shape[1], self.spec.scale,
                                self.cfg.data.degradation, key)
        return tuple(images_to_network_space(torch.from_numpy(x)).to(self.device).contiguous(
            memory_format=self.memory_format) for x in (hr, lr))

    # --- the two updates -----------------------------------------------------------------------
    def discriminator_update(self) -> dict[str, torch.Tensor]:
        nets, acc, kind = self.nets, self.accelerator, self.cfg.train.sr_gan_loss
        hr_all, lr_all = self.pair_batch()
        nets.D.requires_grad_(True)
        stats: dict[str, torch.Tensor] = {}
        micro = self._micro_batches(hr_all, lr_all)
        for i, (hr, lr) in enumerate(micro):
            with torch.no_grad():
                fake = nets.G(lr)
            with acc.no_sync(nets.D) if i < len(micro) - 1 else nullcontext():
                real_logits, fake_logits = nets.D(hr).float(), nets.D(fake).float()
                loss = d_adversarial(kind, real_logits, fake_logits)
                acc.backward(loss / len(micro))
            add_d_stats(stats, loss, real_logits, fake_logits, len(micro))
        self.step_discriminator(stats)
        return stats

    def content_loss(self, output: torch.Tensor, target: torch.Tensor, stats: dict[str, torch.Tensor],
                     parts: int) -> torch.Tensor:
        t = self.cfg.train
        loss = pixel_loss(t.pixel_loss, output.float(), target)
        add_stat(stats, "g_pixel", loss, parts)
        if self.feature_loss is not None and t.feature_weight:
            feature = self.feature_loss(output.float(), target)
            add_stat(stats, "g_feature", feature, parts)
            loss = loss + t.feature_weight * feature
        return loss

    def generator_update(self) -> dict[str, torch.Tensor]:
        """Content loss, plus the weighted adversarial term outside pretraining. `g_loss` is the
        whole loss G minimises (what the adaptive schedule's threshold compares, as fastai's)."""
        nets, acc, t = self.nets, self.accelerator, self.cfg.train
        adversarial = self.stage() != "pretrain" and t.adversarial_weight > 0
        hr_all, lr_all = self.pair_batch()
        nets.D.requires_grad_(False)
        stats: dict[str, torch.Tensor] = {}
        micro = self._micro_batches(hr_all, lr_all)
        for i, (hr, lr) in enumerate(micro):
            with acc.no_sync(nets.G) if i < len(micro) - 1 else nullcontext(), acc.no_sync(nets.D):
                fake = nets.G(lr)
                loss = self.content_loss(fake, hr, stats, len(micro))
                if adversarial:
                    with torch.no_grad():
                        real_logits = nets.D(hr).float()
                    adv = g_adversarial(t.sr_gan_loss, nets.D(fake).float(), real_logits)
                    add_stat(stats, "g_adversarial", adv, len(micro))
                    loss = loss + t.adversarial_weight * adv
                acc.backward(loss / len(micro))
            add_stat(stats, "g_loss", loss, len(micro))
        self.step_generator(stats)
        return stats

    # --- outputs -------------------------------------------------------------------------------
    def write_psnr_generator(self) -> None:
        """The pretraining stage's EMA generator, beside the run's final one: the PSNR model
        users often want as well as the GAN one."""
        if self.accelerator.is_main_process:
            checkpoint.write_generator_folder(runs.generator_dir(self.run_dir, "psnr"), self.nets.ema.state_dict(),
                                              self.spec.to_json(), {
                                                  "step": self.step + 1, "selected": "pretrained", "score": None,
                                                  "data_fingerprint": self.data.fingerprint,
                                                  "config_hash": self.cfg.hash()})

    def preview_images(self) -> torch.Tensor:
        """Rows of (bicubic, EMA super-resolved, original) centre crops of held-out images."""
        return comparison_rows(self.nets.ema, self.spec, self.data, self.holdout_indices[:PREVIEW_IMAGES],
                               self.cfg.data.degradation, self.device)

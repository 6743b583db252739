"""One training process's state and its updates: the networks, optimisers, data sampler and noise
streams of one rank, the discriminator and generator updates (with R1/R2 and lazy
regularisation), the EMA, the scheduled hyperparameters (ganpipe.schedules), resume from and save
to checkpoints. The loop that drives it is `ganpipe.train`.

All randomness comes from explicit generators whose states are checkpointed, so a resumed run
continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ganpipe import checkpoint, losses, runs, schedules
from ganpipe.batches import RealBatches, real_batches
from ganpipe.config import Config, batch_split_problem
from ganpipe.d_augment import DiscriminatorAugment
from ganpipe.data import open_prepared
from ganpipe.errors import Diverged, UserError
from ganpipe.losses import LOSSES, gradient_penalty, r1_penalty, r2_penalty
from ganpipe.networks import build_discriminator, build_generator, set_condition_strength
from ganpipe.recipe import BatchSampler, network_spec


@dataclass
class Nets:
    G: nn.Module  # prepared (DDP-wrapped under several processes)
    D: nn.Module
    g_raw: nn.Module  # the plain modules: what checkpoints hold
    d_raw: nn.Module
    ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


class Trainer:
    """Holds what one process needs for the loop; the updates are small methods below."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir, t = cfg, run_dir, cfg.train
        self.accelerator = Accelerator(cpu=t.cpu or not torch.cuda.is_available(),
                                       mixed_precision=t.mixed_precision)
        acc = self.accelerator
        self.device = acc.device
        info = runs.read_info(run_dir)
        self.data = open_prepared(info["data"]["location"], cfg.storage.endpoint_url)
        self.spec = network_spec(cfg, self.data)
        problem = batch_split_problem(t.batch_size, acc.num_processes, t.grad_accum, cfg.model.pack)
        if problem:  # the config was checked against train.num_processes; this is what accelerate started
            raise UserError(problem)
        self.objective = LOSSES[t.loss]

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        g_raw, d_raw = build_generator(self.spec), build_discriminator(self.spec)
        memory_format = torch.channels_last if t.channels_last and self.spec.is_image else torch.contiguous_format
        g_raw.to(self.device, memory_format=memory_format)
        d_raw.to(self.device, memory_format=memory_format)
        self.memory_format = memory_format
        ema = copy.deepcopy(g_raw).eval().requires_grad_(False)
        fused = self.device.type == "cuda"
        opt_g = torch.optim.Adam(g_raw.parameters(), lr=t.g_lr, betas=t.betas, fused=fused or None)
        opt_d = torch.optim.Adam(d_raw.parameters(), lr=t.d_lr, betas=t.betas, fused=fused or None)

        self.sampler = self.new_sampler()
        self.noise = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + acc.process_index)
        self.augment = DiscriminatorAugment(t.augment, cfg.seed, acc.process_index, batch_size=t.batch_size,
                                            interval=t.ada_interval, kimg=t.ada_kimg,
                                            transforms=tuple(t.ada_transforms), device=self.device)
        self.step, self.d_updates, self.g_updates, self.phase, self.phase_updates = 0, 0, 0, "d", 0
        self.resumed_from = self._resume(g_raw, d_raw, ema, opt_g, opt_d)
        # After the resume: the data path starts from the sampler's restored position.
        self.batches = self.new_batches()

        compiled_g = torch.compile(g_raw) if t.compile else g_raw
        # Double backward (gradient penalties) is not supported through compiled graphs.
        penalised = t.loss == "wgan_gp" or t.r1_gamma or t.r2_gamma
        compiled_d = torch.compile(d_raw) if t.compile and not penalised else d_raw
        # The penalties' fp32 forward (ganpipe.losses.squared_gradient_norm): D's own forward,
        # taken before prepare(), which under mixed precision replaces it with one that enters
        # autocast itself (so an outer autocast(enabled=False) would not reach it).
        self.d_fp32 = d_raw.forward
        self.last_penalties: dict[str, torch.Tensor] = {}
        self.scheduled: dict[str, float] = {}
        self.strength_set = 1.0  # the label strength the networks hold (built at full strength)
        G, D, opt_g, opt_d = acc.prepare(compiled_g, compiled_d, opt_g, opt_d)
        self.nets = Nets(G, D, g_raw, d_raw, ema, opt_g, opt_d)
        if self.resumed_from is not None and acc.scaler is not None and "scaler" in self._resume_state:
            acc.scaler.load_state_dict(self._resume_state["scaler"])
        self._resume_state = {}
        self.first_bad_step = torch.tensor(-1, device=self.device)

    @property
    def total_steps(self) -> int:
        """The loop's length: train.steps (the super-resolution trainer adds its pretraining)."""
        return self.cfg.train.steps

    def new_sampler(self) -> BatchSampler:
        """The order of the real batches, over every record."""
        acc = self.accelerator
        return BatchSampler(self.data.num_records, self.cfg.train.batch_size, self.cfg.seed, acc.process_index,
                            acc.num_processes)

    # --- resume ------------------------------------------------------------------------------
    def _resume(self, g_raw, d_raw, ema, opt_g, opt_d) -> int | None:
        self._resume_state: dict[str, Any] = {}
        if self.accelerator.is_main_process:
            checkpoint.remove_partial(self.run_dir)
        self.accelerator.wait_for_everyone()
        latest = checkpoint.latest_checkpoint(self.run_dir)
        if latest is None:
            return None
        networks, state = checkpoint.load_checkpoint(latest)  # UserError naming a file that is not one
        try:  # a checkpoint of other networks, or with parts missing: the input is at fault, not training
            g_raw.load_state_dict(networks["G"])
            d_raw.load_state_dict(networks["D"])
            ema.load_state_dict(networks["G_ema"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            self.step, self.g_updates = int(state["step"]), int(state["g_updates"])
            self.d_updates = int(state["d_updates"])
            self.phase, self.phase_updates = str(state["phase"]), int(state["phase_updates"])
            self.sampler.load_state_dict(state["sampler"])
            noise_states = state["noise"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"{latest}: not a checkpoint of this run's networks "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        if len(noise_states) == self.accelerator.num_processes:
            self.noise.set_state(noise_states[self.accelerator.process_index])
        else:  # a different number of processes: continue, with fresh per-rank noise streams
            self.noise.manual_seed(self.cfg.seed * 7919 + 1 + self.accelerator.process_index + self.step)
        if "augment" in state:
            self.augment.load_state_dict(state["augment"], self.accelerator.process_index,
                                         self.accelerator.num_processes, self.step)
        torch.set_rng_state(state["torch_rng"])
        self._resume_state = state
        return self.step

    # --- data and noise ---------------------------------------------------------------------
    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next real batch on the device, in network space (ganpipe.batches)."""
        return self.batches.next()

    def latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.spec.latent_dim, generator=self.noise).to(self.device, non_blocking=True)

    def penalty_critic(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """D's fp32 forward on augmented `x`: what R1 and R2 differentiate."""
        return self.d_fp32(self.d_input(x), labels)

    def d_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees: `x` through train.augment (the identity with none)."""
        if not self.augment.active:
            return x
        return self.augment(x).contiguous(memory_format=self.memory_format)

    def _micro_batches(self, *tensors: torch.Tensor | None) -> list[tuple]:
        """Split each tensor into train.grad_accum micro-batches (None stays None)."""
        accum = self.cfg.train.grad_accum
        parts = [t.chunk(accum) if t is not None else [None] * accum for t in tensors]
        return list(zip(*parts, strict=True))

    # --- the two updates --------------------------------------------------------------------
    def discriminator_update(self) -> dict[str, torch.Tensor]:
        t, nets, acc = self.cfg.train, self.nets, self.accelerator
        real_all, labels_all = self.real_batch()
        # Draw the whole batch's noise at once: accumulation then sees exactly the full batch.
        z_all = self.latents(real_all.shape[0])
        nets.D.requires_grad_(True)
        stats: dict[str, torch.Tensor] = {}
        weights = self.penalty_weights()
        micro = self._micro_batches(real_all, labels_all, z_all)
        for i, (real, labels, z) in enumerate(micro):
            with torch.no_grad():
                generated = nets.G(z, labels)
            fake = self.d_input(generated)
            sync = acc.no_sync(nets.D) if i < len(micro) - 1 else nullcontext()
            with sync:
                seen = self.d_input(real)
                real_logits = nets.D(seen, labels).float()
                fake_logits = nets.D(fake, labels).float()
                self.augment.observe(real_logits)
                loss = self.objective.d(real_logits, fake_logits)
                if t.loss == "wgan_gp":  # interpolates between what D saw
                    gp = gradient_penalty(self.d_fp32, seen, fake, labels, self.noise)
                    loss = loss + t.gp_weight * gp
                    add_stat(stats, "gradient_penalty", gp, len(micro))
                loss = loss + self.penalties(real, generated, labels, weights, stats, len(micro))
                acc.backward(loss / len(micro))
            add_d_stats(stats, loss, real_logits, fake_logits, len(micro))
        self.step_discriminator(stats)
        self.augment.after_d_update(self.d_updates, schedules.ada_target(t, self.step), acc.reduce)
        stats.update(self.augment.stats(self.device))
        # Lazy regularisation skips updates: report the latest penalties on every step, so each
        # logged step has them.
        self.last_penalties.update({k: stats[k] for k in weights if k in stats})
        return {**self.last_penalties, **stats}

    # --- R1 / R2 -----------------------------------------------------------------------------
    def penalty_weights(self) -> dict[str, float]:
        """This D update's weight of each configured penalty: gamma/2 at this step, times
        train.reg_every on the updates lazy regularisation runs it on, 0 on the others."""
        t = self.cfg.train
        gammas = {"r1_penalty": t.r1_gamma, "r2_penalty": t.r2_gamma}
        return {name: schedules.penalty_weight(t, base, self.step, self.d_updates)
                for name, base in gammas.items() if base}

    def penalties(self, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None,
                  weights: dict[str, float], stats: dict[str, torch.Tensor], parts: int) -> torch.Tensor | float:
        """R1 on the real and R2 on the generated micro-batch, weighted, for D's loss (fp32,
        through D's own forward: see `d_fp32`). Both are taken w.r.t. the un-augmented images,
        through train.augment, as StyleGAN2-ADA takes R1 (the augmentation draws its own
        parameters for this forward).

        Added to the loss rather than back-propagated on their own as StyleGAN2 does: the
        gradients would sum in .grad before the one optimiser step anyway, so the update is the
        same, with one backward pass and one gradient all-reduce instead of two. (StyleGAN2 also
        steps the optimiser for its regularisation phase alone, and so has to rescale Adam's
        rate and betas; with one step per update there is nothing to correct.)"""
        total: torch.Tensor | float = 0.0
        for name, penalty, inputs in (("r1_penalty", r1_penalty, real), ("r2_penalty", r2_penalty, fake)):
            if weights.get(name):
                value = penalty(self.penalty_critic, inputs, labels)
                total = total + weights[name] * value
                add_stat(stats, name, value, parts)
        return total

    def step_discriminator(self, stats: dict[str, torch.Tensor]) -> None:
        """D's optimiser step on the accumulated gradients (their norm logged), then its batch-norm
        statistics averaged across ranks."""
        stats["d_grad_norm"] = grad_norm(self.nets.d_raw)
        self.nets.opt_d.step()
        self.nets.opt_d.zero_grad(set_to_none=True)
        self.average_buffers(self.nets.d_raw)
        self.d_updates += 1

    def generator_update(self) -> dict[str, torch.Tensor]:
        t, nets, acc = self.cfg.train, self.nets, self.accelerator
        accum, n = t.grad_accum, t.batch_size // acc.num_processes
        z_all = self.latents(n)
        labels_all = None
        if self.spec.conditional:  # classes drawn uniformly, so every class gets trained
            labels_all = torch.randint(self.spec.num_classes, (n,), generator=self.noise).to(
                self.device, non_blocking=True)
        # A loss that judges fakes against real data (relativistic) draws its own real batch: each
        # step reads d_steps + 1 batches (the checkpointed sampler position keeps resume exact).
        # Reusing D's last batch would break under the adaptive schedule (G after no D update).
        real_all, real_labels_all = self.real_batch() if self.objective.g_needs_real else (None, None)
        nets.D.requires_grad_(False)  # frozen: no gradients for D, and no gradient sync for it
        stats: dict[str, torch.Tensor] = {}
        micro = self._micro_batches(z_all, labels_all, real_all, real_labels_all)
        for i, (z, labels, real, real_labels) in enumerate(micro):
            sync = acc.no_sync(nets.G) if i < accum - 1 else nullcontext()
            if t.mode_seeking and labels is not None:
                labels = losses.mode_seeking_pairs(labels)
            with sync, acc.no_sync(nets.D):
                fake = nets.G(z, labels)
                fake_logits = nets.D(self.d_input(fake), labels).float()
                with torch.no_grad():  # no graph: the real logits are a constant bar for G
                    real_logits = None if real is None else nets.D(self.d_input(real), real_labels).float()
                loss = total = self.objective.g(fake_logits, real_logits)
                if t.mode_seeking:  # g_loss stays the adversarial loss (the adaptive schedule reads it)
                    ratio = losses.diversity_ratio(fake, z)
                    add_stat(stats, "g_diversity", ratio.detach(), accum)
                    total = loss + t.mode_seeking * losses.mode_seeking(ratio)
                acc.backward(total / accum)
            add_stat(stats, "g_loss", loss, accum)
        self.step_generator(stats)
        return stats

    def step_generator(self, stats: dict[str, torch.Tensor]) -> None:
        """G's optimiser step (gradient norm logged), D trainable again, batch-norm statistics
        averaged across ranks, then the EMA of G's weights."""
        stats["g_grad_norm"] = grad_norm(self.nets.g_raw)
        self.nets.opt_g.step()
        self.nets.opt_g.zero_grad(set_to_none=True)
        self.nets.D.requires_grad_(True)
        self.average_buffers(self.nets.g_raw)
        self.g_updates += 1
        self.update_ema()

    def average_buffers(self, module: nn.Module) -> None:
        """Batch-norm statistics are updated from each rank's own batch, and DDP would only copy
        rank 0's at the next forward. Averaging them after each update gives every rank (and the
        EMA copy) statistics of the whole global batch. One all-reduce of a flat tensor."""
        if self.accelerator.num_processes == 1:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = self.accelerator.reduce(torch.cat([b.reshape(-1) for b in buffers]), "mean")
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def update_ema(self) -> None:
        # Ramp the decay up from 0 so short runs do not export their random initialisation.
        decay = min(self.cfg.train.ema_decay, (1 + self.g_updates) / (10 + self.g_updates))
        update_ema(self.nets.ema, self.nets.g_raw, decay)

    def set_hyperparameters(self) -> None:
        """This step's rates, beta2, R1/R2 weights and label strength from ganpipe.schedules (functions of the
        step alone: a resumed run follows the same curves); `scheduled` keeps them for logging."""
        t = self.cfg.train
        g_lr, d_lr = schedules.learning_rates(t, self.step)
        beta2 = schedules.beta2(t, self.step)
        for optimizer, lr in ((self.nets.opt_g, g_lr), (self.nets.opt_d, d_lr)):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = lr, (t.betas[0], beta2)
        self.scheduled = {"g_lr": g_lr, "d_lr": d_lr, "beta2": beta2}
        for key, base in (("r1_gamma", t.r1_gamma), ("r2_gamma", t.r2_gamma)):
            if base:
                self.scheduled[key] = schedules.gamma(t, base, self.step)
        if t.condition_ramp is not None:
            strength = self.scheduled["condition_strength"] = schedules.condition_strength(t, self.step)
            if strength != self.strength_set:  # it holds outside the ramp: no fills there
                set_condition_strength(strength, self.nets.g_raw, self.nets.d_raw, self.nets.ema)
                self.strength_set = strength

    def iteration(self) -> dict[str, torch.Tensor]:
        """One training step: k D updates then one G update, or one update of the side the
        adaptive schedule is on."""
        self.set_hyperparameters()
        stats = self.adversarial_updates()
        self.record_finite(stats)
        return stats

    def adversarial_updates(self) -> dict[str, torch.Tensor]:
        """train.d_steps D updates then one G update (`fixed`), or the adaptive schedule's side."""
        stats: dict[str, torch.Tensor] = {}
        if self.cfg.train.schedule == "fixed":
            for _ in range(self.cfg.train.d_steps):
                stats.update(self.discriminator_update())
            stats.update(self.generator_update())
        else:
            stats.update(self.adaptive_update())
        return stats

    def record_finite(self, stats: dict[str, torch.Tensor]) -> None:
        """Remember the first step with a non-finite loss, without a host sync (check_finite reads it)."""
        loss_values = [v for k, v in stats.items() if k.endswith("loss")]
        finite = torch.stack([torch.isfinite(v) for v in loss_values]).all()
        # A Python scalar, not a tensor made from one: that would be a copy from the host, which
        # waits for the device to finish its queued work.
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, self.step + 1, self.first_bad_step)

    def adaptive_update(self) -> dict[str, torch.Tensor]:
        """Train one side until its loss crosses its threshold, then the other (capped at 50
        updates in a row, so neither side starves). Needs the loss on every step (a sync)."""
        t = self.cfg.train
        if self.phase == "d":
            stats = self.discriminator_update()
            done = stats["d_loss"].item() < t.adaptive_d_threshold
        else:
            stats = self.generator_update()
            done = stats["g_loss"].item() < t.adaptive_g_threshold
        self.phase_updates += 1
        if done or self.phase_updates >= 50:
            self.phase, self.phase_updates = ("g" if self.phase == "d" else "d"), 0
        stats["phase_is_d"] = torch.full((), float(self.phase == "d"), device=self.device)
        return stats

    def new_batches(self) -> RealBatches | None:
        """The real-batch stream (ganpipe.batches) from the sampler's position."""
        t = self.cfg.train
        return real_batches(self.data, self.sampler, self.spec, self.device, self.memory_format, t.prefetch,
                            t.data_on_device_fraction, log=self.accelerator.is_main_process)

    def data_position(self) -> dict[str, int]:
        """Where the data resumes: the sampler's position after the batches trained on (not
        those prefetched)."""
        return self.batches.state_dict() if self.batches is not None else self.sampler.state_dict()

    def close(self) -> None:
        """Stop the data path's prefetching thread."""
        if self.batches is not None:
            self.batches.close()

    # --- saving ------------------------------------------------------------------------------
    def check_finite(self, weights: bool = False) -> None:
        """Stop on a non-finite loss since the last check (naming its step); with `weights`,
        also on non-finite weights, so no checkpoint ever holds them."""
        bad = self.accelerator.reduce(self.first_bad_step.clone(), "max")
        if weights:
            tensors = [t.detach() for m in (self.nets.g_raw, self.nets.d_raw, self.nets.ema)
                       for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
            bad = torch.where(~finite & (bad < 0), torch.tensor(self.step, device=self.device), bad)
        bad = int(bad.item())
        if bad >= 0:
            last = checkpoint.latest_checkpoint(self.run_dir)
            raise Diverged(f"training diverged at step {bad}: non-finite loss or weights; last good checkpoint: "
                           f"{last if last else 'none'}")

    def save(self, info: dict[str, Any], score: float | None = None) -> Path | None:
        acc = self.accelerator
        noise_states = acc.gather(self.noise.get_state().to(self.device)[None]).cpu()
        augment = self.augment.state_dict(acc.gather, acc.reduce)  # collective: before the ranks part
        if not acc.is_main_process:
            return None
        state = {
            "step": self.step, "d_updates": self.d_updates, "g_updates": self.g_updates, "phase": self.phase,
            "phase_updates": self.phase_updates, "sampler": self.data_position(),
            "opt_g": self.nets.opt_g.state_dict(), "opt_d": self.nets.opt_d.state_dict(),
            "noise": noise_states, "torch_rng": torch.get_rng_state(), "augment": augment,
        }
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        networks = {"G": self.nets.g_raw.state_dict(), "D": self.nets.d_raw.state_dict(),
                    "G_ema": self.nets.ema.state_dict()}
        return checkpoint.save_checkpoint(self.run_dir, self.step, networks, state, info,
                                          self.cfg.train.keep_checkpoints, score)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BN statistics) copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


def add_stat(stats: dict[str, torch.Tensor], key: str, value: torch.Tensor, parts: int) -> None:
    """Accumulate a micro-batch's share of a statistic as a tensor (no host sync per step)."""
    value = value.detach().float() / parts
    stats[key] = stats[key] + value if key in stats else value


def add_d_stats(stats: dict[str, torch.Tensor], loss: torch.Tensor, real_logits: torch.Tensor,
                fake_logits: torch.Tensor, parts: int) -> None:
    """D's loss and mean probabilities on real and generated data (0.5 everywhere: G matches the data)."""
    add_stat(stats, "d_loss", loss, parts)
    add_stat(stats, "d_real", torch.sigmoid(real_logits).mean(), parts)
    add_stat(stats, "d_fake", torch.sigmoid(fake_logits).mean(), parts)


def grad_norm(module: nn.Module) -> torch.Tensor:
    """Global L2 norm of a module's gradients, logged to spot exploding updates."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

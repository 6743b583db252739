"""Training throughput: ganpipe's training step against a minimal hand-written PyTorch loop with
the same networks, batch size and precision.

    python -m benchmarks.train_throughput                                   # CPU: DCGAN 32x32, batch 64
    python -m benchmarks.train_throughput --resolution 64 --batch-size 128 \
        --precision bf16 --channels-last --compile                          # GPU: ganpipe's fast path vs plain fp32

ganpipe's side is `Trainer.iteration()`, the body of the real loop: data gathered from the
prepared shards, the discriminator and generator updates through Accelerate, the EMA update and
the divergence bookkeeping. The plain loop draws batches from an in-memory tensor, uses Adam and
the non-saturating loss, and nothing else. Prints images/s (real images per second) and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from ganpipe.config_files import load_config
from ganpipe.launch import prepared_run
from ganpipe.losses import d_logistic, g_non_saturating
from ganpipe.networks import build_discriminator, build_generator, to_network_space
from ganpipe.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ganpipe(trainer: Trainer, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        trainer.iteration()
    _sync(trainer.device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.iteration()
    trainer.first_bad_step.item()  # the loop checks this at log steps; include one sync
    _sync(trainer.device)
    return steps * trainer.cfg.train.batch_size / (time.perf_counter() - started)


def time_plain(trainer: Trainer, steps: int, warmup: int, precision: str) -> float:
    """The same networks, trained the way a short hand-written script would."""
    device, spec, batch = trainer.device, trainer.spec, trainer.cfg.train.batch_size
    torch.manual_seed(0)
    G, D = build_generator(spec).to(device), build_discriminator(spec).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    raw, _ = trainer.data.load_all()
    images = to_network_space(torch.from_numpy(raw), spec).to(device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        real = images[torch.randint(len(images), (batch,), device=device)]
        z = torch.randn(batch, spec.latent_dim, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                fake = G(z)
            loss_d = d_logistic(D(real).float(), D(fake).float())
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss_g = g_non_saturating(D(G(torch.randn(batch, spec.latent_dim, device=device))).float())
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="DCGAN base channels (G and D)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no", help="ganpipe's precision")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two loops this many times")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        import os

        os.environ["GANPIPE_HOME"] = home
        cfg = load_config("configs/digits-dcgan.yaml", [
            f"data.resolution={args.resolution}", f"train.batch_size={args.batch_size}",
            f"model.g_width={args.width}", f"model.d_width={args.width}", "model.latent_dim=100",
            f"train.mixed_precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}",
            f"train.compile={str(args.compile).lower()}"])
        with prepared_run(cfg) as prepared:  # a temporary home: no other writer after it
            trainer = Trainer(cfg, prepared.run_dir)
        # The baseline stays plain fp32 on the GPU (the goal); on CPU it matches ganpipe's precision.
        plain_precision = "no" if trainer.device.type == "cuda" else args.precision
        print(f"device {trainer.device}, threads {torch.get_num_threads()}, DCGAN {args.resolution}x"
              f"{args.resolution}, width {args.width}, batch {args.batch_size}; ganpipe precision "
              f"{args.precision}{', channels_last' if args.channels_last else ''}"
              f"{', compile' if args.compile else ''}; plain loop precision {plain_precision}")
        ours, plain = [], []
        for _ in range(args.repeats):
            ours.append(time_ganpipe(trainer, args.steps, args.warmup))
            plain.append(time_plain(copy.copy(trainer), args.steps, args.warmup, plain_precision))
        best_ours, best_plain = max(ours), max(plain)
        print(f"ganpipe: {best_ours:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in ours)})")
        print(f"plain:   {best_plain:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in plain)})")
        print(f"ratio ganpipe/plain: {best_ours / best_plain:.3f}")


if __name__ == "__main__":
    main()

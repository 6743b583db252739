"""The adversarial training loop. One script from one CPU to many GPUs: `ganpipe train` starts it
with `accelerate launch -m ganpipe.train RUN_DIR`, one process per device.

Each iteration: k discriminator updates on fresh real batches, then one generator update with
the discriminator frozen, then an EMA step of the generator's weights (ganpipe.trainer). Around
it: logging, previews, checkpoints scored for `best`, and the run's generator at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ganpipe import checkpoint, runs, schedules, storage
from ganpipe.config import Config
from ganpipe.errors import Diverged
from ganpipe.generators import LoadedGenerator, label_weights
from ganpipe.metrics import EvalContext, evaluate
from ganpipe.metrics.samples import GeneratedSamples, RealSamples
from ganpipe.networks import generate
from ganpipe.previews import save_grid, save_scatter
from ganpipe.progress import Progress, duration
from ganpipe.sr_trainer import SRTrainer
from ganpipe.tracking import MlflowLogger
from ganpipe.trainer import Trainer
from ganpipe.workers import worker_main

PREVIEW_SEEDS = list(range(64))


def checkpoint_score(trainer: Trainer) -> float | None:
    """fd_domain of the EMA generator (lower is better), which picks the `best` checkpoint.

    The main process scores on fixed seeds; the forked RNG keeps training bit-identical to a
    run that scores nothing (the feature network's first training seeds the global RNG)."""
    t = trainer.cfg.train
    if t.best_metric == "none" or not trainer.accelerator.is_main_process:
        return None
    if schedules.condition_strength(t, trainer.step - 1) < 1:
        # The last update was inside train.condition_ramp: the EMA runs below full strength, which
        # these weights, loaded, never do. A score would describe another generator.
        return None
    loaded = LoadedGenerator(trainer.nets.ema, trainer.spec, {})
    fake = GeneratedSamples(loaded, t.best_num_samples, trainer.cfg.seed + 1,
                            label_weights(trainer.data, trainer.spec), trainer.device)
    ctx = EvalContext(RealSamples(trainer.data, t.best_num_samples, trainer.cfg.seed), fake, bootstrap=0,
                      seed=trainer.cfg.seed)
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        return evaluate(ctx, [t.best_metric])[t.best_metric]["value"]


def save_preview(trainer: Trainer) -> Path | None:
    """EMA samples on fixed seeds: an image grid, or for vectors a scatter over real data."""
    if not trainer.accelerator.is_main_process:
        return None
    path = trainer.run_dir / "samples" / f"step-{trainer.step:08d}.png"
    if trainer.spec.image_to_image:  # bicubic, super-resolved and original crops of held-out images
        save_grid(trainer.preview_images(), path)
        return path
    seeds = PREVIEW_SEEDS if trainer.spec.is_image else list(range(1000))
    labels = [i % trainer.spec.num_classes for i in seeds] if trainer.spec.conditional else None
    samples = generate(trainer.nets.ema, trainer.spec, seeds, labels, device=trainer.device)
    if trainer.spec.is_image:
        save_grid(samples, path)
    else:
        real, _ = trainer.data.gather(np.arange(min(1000, trainer.data.num_records)))
        save_scatter(samples.numpy(), real, path)
    return path


def write_generator(trainer: Trainer) -> dict[str, Any] | None:
    """Write the run's generator, which evaluation, registration and export use: the last EMA,
    or with `train.final_generator: best` the EMA of the best-scoring checkpoint. Returns
    which one it is (`step`, `selected`, `score`) on the main process, None on the others."""
    if not trainer.accelerator.is_main_process:
        return None
    weights = trainer.nets.ema.state_dict()
    chosen: dict[str, Any] = {"step": trainer.step, "selected": "last", "score": None}
    if trainer.cfg.train.final_generator == "best":
        best = checkpoint.best_checkpoint(trainer.run_dir)
        if best is None:
            print("warning: train.final_generator is 'best' but no checkpoint has a finite score; "
                  "the run's generator is the last EMA", file=sys.stderr, flush=True)
        else:
            meta = checkpoint.read_meta(best)
            weights = load_file(str(best / "G_ema.safetensors"))
            chosen = {"step": meta["step"], "selected": "best", "score": meta.get("score")}
    checkpoint.write_generator_folder(runs.generator_dir(trainer.run_dir), weights, trainer.spec.to_json(), {
        **chosen, "data_fingerprint": trainer.data.fingerprint, "config_hash": trainer.cfg.hash()})
    return chosen


def training_line(progress: Progress, metrics: dict[str, float] | None) -> str:
    """`step N/M d_loss=... eta=H:MM:SS`: the flow's TrainingProgress parses these lines."""
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in ("d_loss", "g_loss", "d_real", "d_fake", "images_per_sec")
                     if metrics and k in metrics)
    return f"step {progress.position}/{progress.total} {shown} eta={duration(progress.eta())}"


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    t = cfg.train
    trainer = SRTrainer(cfg, run_dir) if cfg.model.family == "srgan" else Trainer(cfg, run_dir)
    acc = trainer.accelerator
    main = acc.is_main_process
    logger = MlflowLogger(cfg, run_dir, enabled=main)
    progress = Progress(trainer.total_steps, "train", "step", training_line, enabled=main, start=trainer.step,
                        bar_keys=("d_loss", "g_loss"))
    if trainer.resumed_from is not None and main:
        print(f"resumed from step {trainer.resumed_from}", file=sys.stderr, flush=True)
    window_start, window_step = time.time(), trainer.step
    last_checkpoint = checkpoint.latest_checkpoint(run_dir)
    try:
        while trainer.step < trainer.total_steps:
            stats = trainer.iteration()
            trainer.step += 1
            step = trainer.step
            metrics = None
            last = step == trainer.total_steps
            if step % t.log_every == 0 or last:
                trainer.check_finite()
                names = sorted(stats)
                reduced = acc.reduce(torch.stack([stats[k].float() for k in names]), "mean")
                metrics = dict(zip(names, reduced.tolist(), strict=True))
                elapsed = time.time() - window_start
                images = (step - window_step) * t.batch_size * (t.d_steps if t.schedule == "fixed" else 1)
                metrics["images_per_sec"] = images / elapsed if elapsed > 0 else 0.0
                metrics.update(trainer.scheduled)  # learning rates, beta2, R1/R2 weights
                window_start, window_step = time.time(), step
                logger.metrics(metrics, step)
            progress.move_to(step, metrics)
            if step % t.sample_every == 0 or last:
                grid = save_preview(trainer)
                if grid is not None:
                    logger.artifact(grid, "samples")
            if step % t.checkpoint_every == 0 or last:
                trainer.check_finite(weights=True)
                score = checkpoint_score(trainer)
                if score is not None:
                    logger.metrics({f"checkpoint_{t.best_metric}": score}, step)
                saved = trainer.save({"metrics": metrics or {}}, score)
                last_checkpoint = saved or last_checkpoint
                acc.wait_for_everyone()
        generator = write_generator(trainer)
    except Diverged as exc:
        if main:
            storage.write_json_atomic(str(run_dir / "result.json"), {
                "status": "diverged", "error": str(exc), "run_dir": str(run_dir), "steps": trainer.step,
                "checkpoint": str(checkpoint.latest_checkpoint(run_dir) or ""),
                "mlflow_run_id": logger.run_id})
        logger.close("FAILED")
        raise
    finally:
        progress.close()
        trainer.close()
    # Every rank reports a checksum of its generator: equal values prove the ranks stayed in step.
    g_tensors = [*trainer.nets.g_raw.parameters(), *trainer.nets.g_raw.buffers()]
    checksum = torch.tensor([float(sum(t.detach().double().sum() for t in g_tensors))],
                            dtype=torch.float64, device=trainer.device)
    rank_checksums = acc.gather(checksum).cpu().tolist()
    result = {
        "status": "completed", "run_dir": str(run_dir), "steps": trainer.step,
        "checkpoint": str(checkpoint.latest_checkpoint(run_dir) or last_checkpoint or ""),
        "mlflow_run_id": logger.run_id, "resumed_from_step": trainer.resumed_from,
        "data_fingerprint": trainer.data.fingerprint, "num_processes": acc.num_processes,
        "d_updates": trainer.d_updates, "g_updates": trainer.g_updates,
        "rank_generator_checksums": rank_checksums,
        "best_checkpoint": str(checkpoint.best_checkpoint(run_dir) or ""),
        "best_score": checkpoint.best_score(run_dir) if main else None,
        "generator": generator,
    }
    if main:
        storage.write_json_atomic(str(run_dir / "result.json"), result)
    logger.close("FINISHED")
    acc.wait_for_everyone()
    acc.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ganpipe.train RUN_DIR (normally started by `ganpipe train`)", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    return worker_main(lambda: train(runs.load_run_config(run_dir), run_dir))


if __name__ == "__main__":
    sys.exit(main())

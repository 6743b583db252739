"""Registry and serving costs: registering a generator, loading it back, sampling from the pyfunc.

    python -m benchmarks.registry_serving                       # DCGAN 32x32 RGB, default widths
    python -m benchmarks.registry_serving --resolution 64 --rows 2048

Uses a generator with random weights (what is measured does not depend on training) in a fresh
GANPIPE_HOME with the embedded MLflow store (or MLFLOW_TRACKING_URI when set). Prints seconds for
store creation, register (first / repeated), load by alias (download / cached), pyfunc load, and rows/s for
`predict`, plus the latent cost per row for export-style 64-bit seeds against small ones.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def fake_run(root: Path, resolution: int, width: int) -> Path:
    """A run directory as `ganpipe train` leaves it, with an untrained generator and an evaluation."""
    from ganpipe import storage
    from ganpipe.config import Config
    from ganpipe.networks import NetworkSpec, build_generator

    cfg = Config.model_validate({"data": {"source": "builtin:digits", "resolution": resolution},
                                 "model": {"g_width": width}, "register": {"name": "benchmark-generator"}})
    spec = NetworkSpec("dcgan", (3, resolution, resolution), latent_dim=cfg.model.latent_dim, g_width=width)
    run = root / "runs" / "benchmark"
    (run / "generator").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "run.json").write_text(json.dumps({"data": {"fingerprint": "benchmark"}, "config_hash": cfg.hash()}))
    torch.manual_seed(0)
    save_file(build_generator(spec).state_dict(), str(run / "generator" / "generator.safetensors"))
    (run / "generator" / "spec.json").write_text(json.dumps(spec.to_json()))
    (run / "generator" / "info.json").write_text(json.dumps({"step": 0, "data_fingerprint": "benchmark",
                                                             "config_hash": cfg.hash()}))
    sha = storage.sha256_file(run / "generator" / "generator.safetensors")
    (run / "evaluation.json").write_text(json.dumps({"status": "ok", "generator_sha256": sha,
                                                     "metrics": {"fd_domain": {"value": 1.0, "uncertainty": 0.1}}}))
    return run


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="model.g_width")
    parser.add_argument("--rows", type=int, default=1024, help="rows per predict call")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        os.environ["GANPIPE_HOME"] = home
        import mlflow
        import pandas as pd

        from ganpipe import tracking
        from ganpipe.generators import load_generator
        from ganpipe.networks import latents_for_seeds
        from ganpipe.registry import register_run

        run = fake_run(Path(home), args.resolution, args.width)
        weights_mb = (run / "generator" / "generator.safetensors").stat().st_size / 2**20
        store, _ = timed(tracking.experiment_id, "benchmark-generator")  # creates the sqlite store
        first, result = timed(register_run, run)
        again, _ = timed(register_run, run)
        uri = f"models:/{result['name']}@champion"
        cold, _ = timed(load_generator, uri)
        warm, _ = timed(load_generator, uri)
        pyfunc_load, model = timed(mlflow.pyfunc.load_model, uri)
        frame = pd.DataFrame({"seed": np.arange(args.rows, dtype=np.int64)})
        model.predict(frame.head(8))  # warm-up
        predict, images = timed(model.predict, frame)

        small = list(range(20_000))
        wide = [7 * 2**32 + i for i in small]  # `ganpipe export --seed 7` row seeds
        small_s, _ = timed(latents_for_seeds, small, 100)
        wide_s, _ = timed(latents_for_seeds, wide, 100)

    print(f"generator: DCGAN {args.resolution}x{args.resolution}x3, g_width {args.width}, "
          f"{weights_mb:.1f} MiB of weights; torch threads {torch.get_num_threads()}")
    print(f"MLflow store creation: {store:.2f} s; register (log + register + card/grid): {first:.2f} s; "
          f"again (idempotent): {again:.2f} s")
    print(f"load_generator by alias: {cold:.2f} s (download), {warm:.3f} s (cached)")
    print(f"mlflow.pyfunc.load_model: {pyfunc_load:.2f} s; predict {args.rows} rows: {predict:.2f} s "
          f"({args.rows / predict:.0f} rows/s, output {images.shape} {images.dtype})")
    print(f"latents (100-d) per row: {small_s / len(small) * 1e6:.1f} us for seeds < 2**32, "
          f"{wide_s / len(wide) * 1e6:.1f} us for 64-bit export seeds")


if __name__ == "__main__":
    main()

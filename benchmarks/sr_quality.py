"""Super-resolution quality: PSNR/SSIM of the PSNR-stage generator (RUN/generator-psnr: pixel loss
alone) and of the GAN-stage one (RUN/generator: after the critic and adversarial stages) against
bicubic upscaling, on the held-out photographs of configs/srgan-x2.yaml (builtin:photos: tiles of
scikit-learn's sample photographs), at x2 and x4 (the same config with --set model.scale=4), each
trained as a user would (`ganpipe train`). Y channel, `scale` pixels of border cropped, mean over
the held-out images and its standard error.

    python -m benchmarks.sr_quality [--scales 2 4] [--set model.sr_input_skip=bicubic] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, ganpipe
from ganpipe import runs
from ganpipe.data import open_prepared
from ganpipe.data.pairs import holdout_split
from ganpipe.generators import read_generator
from ganpipe.metrics.sr import evaluate_super_resolution
from ganpipe.sr_trainer import PSNR_GENERATOR


def measure(run_dir: Path) -> dict[str, dict[str, Any]]:
    """psnr and ssim (with bicubic's) of the run's two generators on its held-out images, with the
    run's own config and prepared data."""
    cfg = runs.load_run_config(run_dir)
    data = open_prepared(runs.read_info(run_dir)["data"]["location"])
    _, held = holdout_split(data.num_records, cfg.data.holdout_fraction or 0.1)
    results = {}
    for stage, folder in (("psnr", run_dir / PSNR_GENERATOR), ("gan", run_dir / "generator")):
        generator, spec, _, _ = read_generator(folder)
        results[stage] = evaluate_super_resolution(generator, spec, data, held, cfg.data.degradation,
                                                   ["psnr", "ssim"], cfg.eval.sr_y_channel)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/srgan-x2.yaml"))
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as home:
        for scale in args.scales:
            overrides = [*args.overrides, f"model.scale={scale}", "train.cpu=true"]
            started = time.time()
            result = ganpipe("train", args.config, *[a for o in overrides for a in ("--set", o)], home=Path(home))
            seconds = time.time() - started
            measured = measure(Path(result["run_dir"]))
            figures[f"x{scale}"] = {"train_seconds": seconds, **measured}
            psnr = measured["psnr"]
            rows.append((f"x{scale}", "bicubic", psnr["psnr"]["bicubic"], psnr["psnr"]["bicubic_uncertainty"],
                         psnr["ssim"]["bicubic"], psnr["ssim"]["bicubic_uncertainty"], psnr["psnr"]["num_images"],
                         seconds))
            for stage, label in (("psnr", "PSNR stage (pixel loss)"), ("gan", "GAN stage (final EMA)")):
                m = measured[stage]
                rows.append((f"x{scale}", label, m["psnr"]["value"], m["psnr"]["uncertainty"], m["ssim"]["value"],
                             m["ssim"]["uncertainty"], m["psnr"]["num_images"], seconds))
    print(f"{'scale':<6}{'model':<26}{'PSNR (dB, Y)':>18}{'SSIM (Y)':>20}{'images':>8}{'train s':>9}")
    for scale, label, p, pe, s, se, n, seconds in rows:
        print(f"{scale:<6}{label:<26}{p:>11.2f} ± {pe:<4.2f}{s:>13.4f} ± {se:<5.4f}{n:>6}{seconds:>9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Bulk super-resolution: images/s of `ganpipe export --input` against the bare model, and the
peak memory of a 2000x2000 input through the tiled pyfunc.

  (a) bare: the same images, decoded beforehand, in a plain loop calling the generator on each
      whole image (network space in, uint8 out), nothing written;
  (b) export: `export --input` of a parquet file of those images (PNG bytes) to parquet shards:
      reading, decoding, tiling, PNG encoding (on a writer thread) and shard commits included;
  (c) pyfunc: the registered model's code (ganpipe/mlflow_model.py, saved with mlflow and loaded
      back as a registered version is) super-resolving one 2000x2000 PNG in tiles: its peak RSS,
      against the same process's RSS before the call (the model and libraries loaded).
Each runs in its own child process (peak RSS = that process's VmHWM). The generator is untrained
(the same cost as a trained one), sized as configs/srgan-x2.yaml by default.

    PYTHONPATH=. python benchmarks/sr_export.py [--num-images 64] [--size 96] [--large 2000]

Timings are wall-clock on whatever else the machine is doing: say how busy it was.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import peak_rss_mb, write_untrained_run  # noqa: E402


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def photo_pngs(count: int, size: int) -> list[bytes]:
    """`count` size x size crops of scikit-learn's sample photographs, as PNG bytes."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos, rng, out = load_sample_images().images, np.random.default_rng(0), []
    for i in range(count):
        photo = photos[i % 2]
        top, left = int(rng.integers(0, photo.shape[0] - size)), int(rng.integers(0, photo.shape[1] - size))
        buffer = io.BytesIO()
        Image.fromarray(photo[top:top + size, left:left + size]).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def write_input(path: Path, pngs: list[bytes]) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image()})
    table = pa.table({"image": [{"bytes": b, "path": None} for b in pngs]}).cast(features.arrow_schema)
    pq.write_table(table.replace_schema_metadata(features.arrow_schema.metadata), path)


def measure(mode: str, work: Path, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    run, source = work / "run", work / "input.parquet"
    if mode == "bare":
        import pyarrow.parquet as pq

        from ganpipe.generators import load_generator
        from ganpipe.networks import from_network_space, images_to_network_space

        loaded = load_generator(str(run))
        images = [np.asarray(Image.open(io.BytesIO(v["bytes"])).convert("RGB"))
                  for v in pq.read_table(source).column("image").to_pylist()]
        started = time.perf_counter()
        with torch.no_grad():
            for image in images:
                x = images_to_network_space(torch.from_numpy(image.copy())[None])
                from_network_space(loaded.generator(x), loaded.spec)
        return {"seconds": time.perf_counter() - started, "images": len(images), "peak_rss_mb": peak_rss_mb()}
    if mode == "export":
        from ganpipe.config import ExportConfig
        from ganpipe.sr_export import export_super_resolved

        started = time.perf_counter()
        result = export_super_resolved(str(run), ExportConfig(input=str(source), out=str(work / "out")),
                                       progress=False)
        return {"seconds": time.perf_counter() - started, "images": result["num_images"],
                "peak_rss_mb": peak_rss_mb()}
    # pyfunc: the registered model's code and files, saved and loaded by mlflow as a version is
    import mlflow
    import pandas as pd

    from ganpipe.registry import PYFUNC_CODE, write_code_package

    model_dir = work / "pyfunc"
    mlflow.pyfunc.save_model(str(model_dir), python_model=str(PYFUNC_CODE),
                             artifacts={"weights": str(run / "generator" / "generator.safetensors"),
                                        "spec": str(run / "generator" / "spec.json")},
                             code_paths=[str(write_code_package(work))])
    model = mlflow.pyfunc.load_model(str(model_dir))
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (args.large, args.large, 3), dtype=np.uint8)).save(buffer, format="PNG")
    request = pd.DataFrame({"image": [buffer.getvalue()]})
    before = current_rss_mb()
    started = time.perf_counter()
    out = model.predict(request)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "output_shape": list(out[0].shape), "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb(), "output_mb": out[0].nbytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=96, help="input images are size x size px")
    parser.add_argument("--large", type=int, default=2000, help="side of the pyfunc's large input")
    parser.add_argument("--width", type=int, default=32, help="model.g_width (configs/srgan-x2.yaml: 32)")
    parser.add_argument("--blocks", type=int, default=4, help="model.sr_blocks (configs/srgan-x2.yaml: 4)")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args)))
        return
    from ganpipe.networks import NetworkSpec

    with tempfile.TemporaryDirectory(prefix="ganpipe-sr-bench-") as tmp:
        work = Path(tmp)
        spec = NetworkSpec(family="srgan", sample_shape=(3, 32, 32), latent_dim=0, g_width=args.width,
                           sr_blocks=args.blocks, scale=args.scale)
        write_untrained_run(work / "run", spec)
        write_input(work / "input.parquet", photo_pngs(args.num_images, args.size))
        results = {}
        for mode in ("bare", "export", "pyfunc"):
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode, str(work)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{mode} failed")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    bare, export, pyfunc = results["bare"], results["export"], results["pyfunc"]
    rate = {k: results[k]["images"] / results[k]["seconds"] for k in ("bare", "export")}
    print(f"model: srgan x{args.scale}, g_width {args.width}, {args.blocks} blocks (untrained); "
          f"{args.num_images} images of {args.size}x{args.size} px")
    print(f"(a) bare generator loop:   {rate['bare']:8.2f} images/s  ({bare['seconds']:.2f} s)")
    print(f"(b) ganpipe export --input: {rate['export']:7.2f} images/s  ({export['seconds']:.2f} s, "
          f"{100 * rate['export'] / rate['bare']:.0f}% of bare, peak RSS {export['peak_rss_mb']:.0f} MB)")
    print(f"(c) pyfunc, one {args.large}x{args.large} PNG in tiles -> {'x'.join(map(str, pyfunc['output_shape']))}: "
          f"{pyfunc['seconds']:.1f} s, peak RSS {pyfunc['peak_rss_mb']:.0f} MB "
          f"(before the call {pyfunc['rss_before_mb']:.0f} MB; the output alone {pyfunc['output_mb']:.0f} MB)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

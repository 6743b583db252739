"""The evaluation stage: `ganpipe evaluate` and the pipeline's evaluate task share this code.

A SRC is a MODEL (models:/..., or a run directory: samples are generated on the device, in
batches, never written as images) or anything `data.source` accepts (ingested, so a second
evaluation reuses the prepared data).

With `num_processes > 1` the evaluation runs under `accelerate launch` (this module's `main` in
every process): features are extracted by all processes, each on its own range of samples, and
the main process computes the metrics and hands them back through a JSON file.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from mlflow import MlflowClient

from ganpipe import runs, storage, tracking
from ganpipe.config import Config, DataConfig
from ganpipe.data import PreparedData, ingest, open_prepared
from ganpipe.data.ingest import MixedSizes
from ganpipe.data.pairs import holdout_split
from ganpipe.errors import UserError
from ganpipe.generators import is_model_ref, label_weights, load_generator, read_generator
from ganpipe.metric_settings import MetricSettings
from ganpipe.metrics import (
    METRICS,
    EvalContext,
    check_metric_names,
    default_device,
    evaluate,
    main_process_first,
)
from ganpipe.metrics.lpips import LPIPS, LPIPS_HOWTO, LPIPSMeasure, load_lpips
from ganpipe.metrics.samples import GeneratedSamples, RealSamples
from ganpipe.metrics.sr import evaluate_super_resolution
from ganpipe.workers import WorkerFailed, run_workers, worker_main

SR_METRICS = ("psnr", "ssim", "lpips")


def _prepare_real(src: str, resolution: int | None, channels: int | None, endpoint_url: str | None
                  ) -> PreparedData:
    """`src` ingested at `resolution`, or at its images' own size when None (eval.resolution's
    default: FID as torch-fidelity and pytorch-fid compute it on image folders, which resize only
    to Inception's 299x299; an extra resize first would change the value)."""
    try:
        result = ingest(DataConfig(source=src, resolution=resolution, channels=channels), endpoint_url)
    except MixedSizes as exc:
        raise UserError(f"--resolution (eval.resolution): evaluating at the images' own size needs square "
                        f"images of one size: {exc.detail}; pass --resolution N to evaluate at N x N") from None
    return open_prepared(result.location, endpoint_url)


def check_request(metrics: list[str], num_samples: int, inception_weights: str | None,
                  keys: tuple[str, str] = ("--num-samples", "--inception-weights"),
                  lpips_weights: str | None = None) -> LPIPS | None:
    """Bad input fails before any work: unknown metrics, too few samples, a weights file that is
    not there (or, for lpips, not of its layout). `keys` name the sample count and Inception
    weights settings as the user wrote them. Returns the LPIPS network when lpips is requested
    and its weights are set."""
    check_metric_names(metrics)
    if num_samples < 2:
        raise UserError(f"{keys[0]}: at least 2 samples are needed (got {num_samples})")
    needs_inception = any(METRICS[m].extractor == "inception" for m in metrics)
    if needs_inception and inception_weights and not Path(inception_weights).expanduser().is_file():
        raise UserError(f"{keys[1]} {inception_weights}: file not found")
    if "lpips" in metrics and lpips_weights:
        return load_lpips(Path(lpips_weights).expanduser())
    return None


def require_standard_weights(metrics: list[str], inception_weights: str | None) -> None:
    """When every requested metric needs the FID weights, missing or non-standard weights are bad
    input (exit 2, one line saying how to provide them), found before any data is prepared. With
    other metrics beside them, those still run and the Inception ones report why they could not."""
    from ganpipe.metrics.inception import WeightsUnavailable, standard_weights

    if not metrics or any(METRICS[m].extractor != "inception" for m in metrics):
        return
    try:
        standard_weights(inception_weights)
    except WeightsUnavailable as exc:
        raise UserError(f"{', '.join(metrics)}: {exc}") from None


def metric_settings(settings: MetricSettings | dict[str, Any] | None) -> MetricSettings:
    """The metric keys alone (an EvalConfig carries them beside its own), or their defaults."""
    if isinstance(settings, MetricSettings):
        settings = settings.model_dump(include=set(MetricSettings.model_fields))
    return MetricSettings(**(settings or {}))


def evaluate_sources(real: str, fake: str, metrics: list[str], num_samples: int, *, bootstrap: int = 20,
                     inception_weights: str | None = None, resolution: int | None = None, seed: int = 0,
                     endpoint_url: str | None = None, num_processes: int = 1,
                     accelerator: Any | None = None, settings: MetricSettings | dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """`ganpipe evaluate --real SRC --fake SRC`. When both are datasets, both are prepared at
    `resolution` (eval.resolution), by default the real data's own (the fake side is brought to
    it). A MODEL is compared against the real data brought to the model's resolution. Every
    metric sees the same samples, and reports the resolution they had. `settings` (the eval
    section, or just its metric keys) tune single metrics."""
    settings = metric_settings(settings)
    check_request(metrics, num_samples, inception_weights, lpips_weights=settings.lpips_weights)
    if accelerator is None:
        require_standard_weights(metrics, inception_weights)
    if num_processes > 1 and accelerator is None:
        request = {"real": real, "fake": fake, "metrics": metrics, "num_samples": num_samples, "bootstrap": bootstrap,
                   "inception_weights": inception_weights, "resolution": resolution, "seed": seed,
                   "endpoint_url": endpoint_url, "settings": settings.model_dump(mode="json")}
        return launch_evaluation(request, num_processes)
    if is_model_ref(real):
        raise UserError("--real: expected a dataset (data.source, image folder), not a model")
    device = default_device(accelerator)
    with main_process_first(accelerator):  # one process ingests and downloads; the others hit the caches
        loaded = load_generator(fake, device) if is_model_ref(fake) else None
        if loaded is not None:
            shape = loaded.spec.sample_shape
            if not loaded.spec.is_image:
                raise UserError("--real: evaluating a vector model needs its training data; "
                                "use the pipeline or `ganpipe evaluate --real RUN_DIR/...`")
            data = _prepare_real(real, shape[1], shape[0], endpoint_url)
            fake_samples: Any = GeneratedSamples(loaded, num_samples, seed + 1, label_weights(data, loaded.spec), device)
        else:
            data = _prepare_real(real, resolution, None, endpoint_url)
            fake_data = _prepare_real(fake, data.sample_shape[1], data.sample_shape[0], endpoint_url)
            fake_samples = RealSamples(fake_data, num_samples, seed + 1)
    ctx = EvalContext(RealSamples(data, num_samples, seed), fake_samples, bootstrap=bootstrap, seed=seed,
                      inception_weights=inception_weights, accelerator=accelerator, settings=settings)
    results = evaluate(ctx, metrics)
    if ctx.is_main and loaded is not None and loaded.source.get("run_dir") and not fake.startswith("models:/"):
        record_evaluation(Path(loaded.source["run_dir"]), results, num_samples, loaded.source["generator_sha256"],
                          data.fingerprint)
    return results


def evaluate_run(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The pipeline's evaluate task: the run's EMA generator against its own training data."""
    e = cfg.eval
    lpips_model = check_request(e.metrics, e.num_samples, e.inception_weights,
                                ("eval.num_samples", "eval.inception_weights"), e.lpips_weights)
    info = runs.read_info(run_dir)
    data = open_prepared(info["data"]["location"], cfg.storage.endpoint_url)
    device = default_device()
    loaded = load_generator(str(run_dir), device)
    if loaded.spec.image_to_image:
        lpips = LPIPSMeasure(lpips_model.to(device), device) if lpips_model is not None else None
        if "lpips" in e.metrics and lpips is None:
            print(f"warning: lpips skipped: {LPIPS_HOWTO}", file=sys.stderr)
        holdout = holdout_split(data.num_records, cfg.data.effective_holdout_fraction)[1]
        psnr_stage = runs.generator_dir(run_dir, "psnr")
        if (psnr_stage / "generator.safetensors").exists():  # the PSNR model: registered on its own (--stage psnr)
            files = read_generator(psnr_stage)
            results = evaluate_super_resolution_run(files.generator.to(device), files.spec, data, holdout, cfg, device,
                                                    lpips)
            record_evaluation(run_dir, results, len(holdout), files.weights_sha256, data.fingerprint, stage="psnr")
        results = evaluate_super_resolution_run(loaded.generator, loaded.spec, data, holdout, cfg, device, lpips)
        return record_evaluation(run_dir, results, len(holdout), loaded.source["generator_sha256"], data.fingerprint)
    fake = GeneratedSamples(loaded, e.num_samples, cfg.seed + 1, label_weights(data, loaded.spec), device)
    ctx = EvalContext(RealSamples(data, e.num_samples, cfg.seed), fake, bootstrap=e.bootstrap, seed=cfg.seed,
                      inception_weights=e.inception_weights, settings=metric_settings(e))
    results = evaluate(ctx, e.metrics)
    return record_evaluation(run_dir, results, e.num_samples, loaded.source["generator_sha256"], data.fingerprint)


def evaluate_super_resolution_run(generator: torch.nn.Module, spec: Any, data: PreparedData, holdout: np.ndarray,
                                  cfg: Config, device: torch.device, lpips: LPIPSMeasure | None = None
                                  ) -> dict[str, Any]:
    """psnr, ssim and lpips of a super-resolution run's generator on its held-out images
    (`holdout`), each with `<name>_bicubic` beside it; other metrics do not apply and say so.
    lpips without its weights (`lpips` None) is unavailable, as fid without Inception's."""
    names = [m for m in cfg.eval.metrics if m in SR_METRICS and (m != "lpips" or lpips is not None)]
    measured = evaluate_super_resolution(generator, spec, data, holdout, cfg.data.degradation, names,
                                         cfg.eval.sr_y_channel, device, lpips)
    results: dict[str, Any] = {}
    for name in cfg.eval.metrics:
        if name not in SR_METRICS:
            results[name] = {"value": None, "uncertainty": None,
                             "error": f"{name} does not apply to super-resolution (use {', '.join(SR_METRICS)})"}
            continue
        if name not in measured:
            results[name] = {"value": None, "uncertainty": None, "error": LPIPS_HOWTO}
            continue
        results[name] = measured[name]
        if measured[name]["value"] is not None:
            results[f"{name}_bicubic"] = {"value": measured[name]["bicubic"],
                                          "uncertainty": measured[name]["bicubic_uncertainty"]}
    return results


def record_evaluation(run_dir: Path, results: dict[str, Any], num_samples: int,
                      generator_sha256: str | None = None, reference_fingerprint: str | None = None,
                      stage: str = "final") -> dict[str, Any]:
    """Write evaluation.json into the run (registration reads it) and log to its MLflow run
    (`stage` psnr: evaluation-psnr.json, metrics eval_psnr_stage_<name>).
    `generator_sha256` names the weights evaluated: registration ignores an evaluation of others.
    `reference_fingerprint` names the real data measured against: registration compares a
    version with the champion only when both were measured against the same data."""
    failed = [name for name, r in results.items() if r.get("value") is None]
    evaluation = {"status": "failed" if len(failed) == len(results) else "ok", "metrics": results,
                  "failed": failed, "num_samples": num_samples, "evaluated_at": time.time(),
                  "generator_sha256": generator_sha256, "reference_fingerprint": reference_fingerprint}
    storage.write_json_atomic(str(run_dir / runs.EVALUATION_FILES[stage]), evaluation)
    prefix = "eval_" if stage == "final" else f"eval_{stage}_stage_"
    run_id = tracking.known_run(runs.read_info(run_dir).get("mlflow_run_id"))
    if run_id:
        client = MlflowClient()
        for name, result in results.items():
            if result.get("value") is not None:
                client.log_metric(run_id, f"{prefix}{name}", float(result["value"]))
                client.log_metric(run_id, f"{prefix}{name}_uncertainty", float(result.get("uncertainty") or 0.0))
                if result.get("best_ratio") is not None:  # uplift: the mix that helped most
                    client.log_metric(run_id, f"{prefix}{name}_best_ratio", float(result["best_ratio"]))
    return evaluation


# --- several processes: `accelerate launch -m ganpipe.evaluate REQUEST.json` ------------------------

def launch_evaluation(request: dict[str, Any], num_processes: int) -> dict[str, Any]:
    """Run `evaluate_sources(**request)` in `num_processes` Accelerate processes; the main one's results."""
    with tempfile.TemporaryDirectory(prefix="ganpipe-evaluate-") as tmp:
        request_file, out = Path(tmp) / "request.json", Path(tmp) / "results.json"
        request_file.write_text(json.dumps(request | {"out": str(out)}))
        run_workers("ganpipe.evaluate", [str(request_file)], what="evaluation", num_processes=num_processes,
                    cpu=not torch.cuda.is_available(), log_file=Path(tmp) / "evaluate.log")
        if not out.exists():
            raise WorkerFailed("evaluation processes wrote no results")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    """One process of a distributed evaluation."""
    request = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    out = request.pop("out")

    def body() -> None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        results = evaluate_sources(**request, accelerator=accelerator)
        if accelerator.is_main_process:
            storage.write_json_atomic(out, results)

    return worker_main(body)


if __name__ == "__main__":
    sys.exit(main())

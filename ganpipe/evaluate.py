"""The evaluation stage: `ganpipe evaluate` and the pipeline's evaluate task share this code.

A SRC is a MODEL (models:/..., or a run directory: samples are generated) or anything
`data.source` accepts (ingested, so a second evaluation reuses the prepared data).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ganpipe import runs, storage
from ganpipe.config import Config, DataConfig
from ganpipe.data import PreparedData, ingest, open_prepared
from ganpipe.errors import UserError
from ganpipe.metrics import EvalContext, evaluate
from ganpipe.metrics.samples import GeneratedSamples, RealSamples
from ganpipe.registry import LoadedGenerator, load_generator


def is_model_ref(src: str) -> bool:
    return src.startswith("models:/") or runs.is_run_dir(storage.local_path(src))


def _label_weights(data: PreparedData, loaded: LoadedGenerator) -> np.ndarray | None:
    """Generate classes in the real data's proportions, so class-aware metrics compare like with like."""
    counts = data.meta.get("class_counts")
    if not loaded.spec.conditional or not counts or len(counts) != loaded.spec.num_classes:
        return None
    return np.asarray(list(counts.values()), dtype=np.float64)


def _prepare_real(src: str, resolution: int, channels: int | None, endpoint_url: str | None) -> PreparedData:
    result = ingest(DataConfig(source=src, resolution=resolution, channels=channels), endpoint_url)
    return open_prepared(result.location, endpoint_url)


def evaluate_sources(real: str, fake: str, metrics: list[str], num_samples: int, *, bootstrap: int = 20,
                     inception_weights: str | None = None, resolution: int | None = None, seed: int = 0,
                     endpoint_url: str | None = None) -> dict[str, Any]:
    """`ganpipe evaluate --real SRC --fake SRC`."""
    if is_model_ref(real):
        raise UserError("--real: expected a dataset (data.source, image folder), not a model")
    loaded = load_generator(fake) if is_model_ref(fake) else None
    if loaded is not None:
        shape = loaded.spec.sample_shape
        data = _prepare_real(real, shape[1], shape[0], endpoint_url) if loaded.spec.is_image else None
        if data is None:
            raise UserError("--real: evaluating a vector model needs its training data; "
                            "use the pipeline or `ganpipe evaluate --real RUN_DIR/...`")
        fake_samples: Any = GeneratedSamples(loaded, num_samples, seed + 1, _label_weights(data, loaded))
    else:
        data = _prepare_real(real, resolution or 64, None, endpoint_url)
        fake_data = _prepare_real(fake, data.sample_shape[1], data.sample_shape[0], endpoint_url)
        fake_samples = RealSamples(fake_data, num_samples, seed + 1)
    ctx = EvalContext(RealSamples(data, num_samples, seed), fake_samples, bootstrap=bootstrap, seed=seed,
                      inception_weights=inception_weights)
    results = evaluate(ctx, metrics)
    if loaded is not None and loaded.source.get("run_dir") and not fake.startswith("models:/"):
        record_evaluation(Path(loaded.source["run_dir"]), results, num_samples, loaded.source["generator_sha256"])
    return results


def evaluate_run(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The pipeline's evaluate task: the run's EMA generator against its own training data."""
    info = runs.read_info(run_dir)
    data = open_prepared(info["data"]["location"], cfg.storage.endpoint_url)
    loaded = load_generator(str(run_dir))
    n = cfg.eval.num_samples
    ctx = EvalContext(RealSamples(data, n, cfg.seed), GeneratedSamples(loaded, n, cfg.seed + 1,
                                                                       _label_weights(data, loaded)),
                      bootstrap=cfg.eval.bootstrap, seed=cfg.seed, inception_weights=cfg.eval.inception_weights)
    results = evaluate(ctx, cfg.eval.metrics)
    return record_evaluation(run_dir, results, n, loaded.source["generator_sha256"])


def record_evaluation(run_dir: Path, results: dict[str, Any], num_samples: int,
                      generator_sha256: str | None = None) -> dict[str, Any]:
    """Write evaluation.json into the run (registration reads it) and log to its MLflow run.
    `generator_sha256` names the weights evaluated: registration ignores an evaluation of others."""
    failed = [name for name, r in results.items() if r.get("value") is None]
    evaluation = {"status": "failed" if len(failed) == len(results) else "ok", "metrics": results,
                  "failed": failed, "num_samples": num_samples, "evaluated_at": time.time(),
                  "generator_sha256": generator_sha256}
    storage.write_json_atomic(str(run_dir / "evaluation.json"), evaluation)
    from ganpipe import tracking

    run_id = tracking.known_run(runs.read_info(run_dir).get("mlflow_run_id"))
    if run_id:
        from mlflow import MlflowClient

        client = MlflowClient()
        for name, result in results.items():
            if result.get("value") is not None:
                client.log_metric(run_id, f"eval_{name}", float(result["value"]))
                client.log_metric(run_id, f"eval_{name}_uncertainty", float(result.get("uncertainty") or 0.0))
    return evaluation

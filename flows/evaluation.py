"""Evaluation as a Prefect flow: a generator (by default the config's champion,
`models:/<register.name>@champion`) against the config's `data.source`, with the config's `eval`
section - `ganpipe evaluate --real <data.source> --fake MODEL` on a schedule."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import (
    champion_uri,
    load_flow_config,
    metrics_markdown,
    publish_metrics_table,
    resolve_model_task,
    run_stage,
)
from ganpipe.errors import EvaluationFailed


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model_task(model_uri: str, config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    from ganpipe.evaluate import evaluate_sources

    cfg = load_flow_config(config_path, overrides)
    e = cfg.eval
    metrics = evaluate_sources(cfg.data.source, model_uri, e.metrics, e.num_samples, bootstrap=e.bootstrap,
                               inception_weights=e.inception_weights, seed=cfg.seed,
                               endpoint_url=cfg.storage.endpoint_url, num_processes=e.num_processes)
    if all(result.get("value") is None for result in metrics.values()):
        raise EvaluationFailed("; ".join(f"{name}: {r.get('error')}" for name, r in metrics.items()))
    return metrics


@flow(name="ganpipe-evaluation")
def evaluation_flow(config_path: str, overrides: list[str] | None = None,
                    model_uri: str | None = None) -> dict[str, Any]:
    cfg = load_flow_config(config_path, overrides)
    model = run_stage("resolve-model", resolve_model_task, model_uri or champion_uri(cfg))
    metrics = run_stage("evaluate", evaluate_model_task, model["model_uri"], config_path, overrides)
    rows = publish_metrics_table(metrics)
    create_markdown_artifact("\n".join([
        f"# ganpipe evaluation: {model['model_uri']}", "",
        f"- real data: `{cfg.data.source}`, {cfg.eval.num_samples} samples per side", "",
        *metrics_markdown(rows)]), key="ganpipe-evaluation", description="evaluation summary")
    return {"model_uri": model["model_uri"], "metrics": metrics}

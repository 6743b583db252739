"""The training pipeline as a Prefect flow: ingest -> train -> evaluate -> register -> export.

Thin by design: each task loads the config from its path and overrides, calls ganpipe's library,
and returns plain JSON (URIs, fingerprints, numbers). Nothing heavier crosses between tasks.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from ganpipe import storage, tracking
from ganpipe.config import Config, load_config
from ganpipe.errors import StageError, UserError


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (storage, registry, network); never bad input."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_unless_bad_input}


def _config(config_path: str, overrides: list[str] | None) -> Config:
    return load_config(config_path, list(overrides or []))


@task(name="ingest", cache_policy=NO_CACHE, **RETRIES)
def ingest_task(config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    from ganpipe.data import ingest

    cfg = _config(config_path, overrides)
    result = ingest(cfg.data, cfg.storage.endpoint_url).to_json()
    get_run_logger().info("ingest: %s records, fingerprint %s (%s)", result["num_records"],
                          result["fingerprint"], "cache hit" if result["cached"] else "prepared")
    return result


class TrainingProgress:
    """Streams the trainer's output into the run log and keeps a progress artifact current."""

    STEP = re.compile(r"^step (\d+)/(\d+)\b(.*)$")

    def __init__(self, total_steps: int):
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(0.0, key="ganpipe-training-progress",
                                                 description="training: starting")
        self.total = total_steps
        self.last_update = 0.0

    def on_line(self, line: str) -> None:
        self.logger.info(line)
        match = self.STEP.match(line.strip())
        if not match:
            return
        step, total = int(match.group(1)), int(match.group(2))
        now = time.time()
        if now - self.last_update > 2.0 or step == total:
            update_progress_artifact(self.artifact, progress=100.0 * step / max(total, 1),
                                     description=f"step {step}/{total}{match.group(3)}")
            self.last_update = now


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_bad_input)
def train_task(config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    """A retry (or a rerun of the flow) resumes from the run's last checkpoint."""
    from ganpipe.launch import launch_training

    cfg = _config(config_path, overrides)
    progress = TrainingProgress(cfg.train.steps)
    return launch_training(cfg, resume="auto", on_line=progress.on_line)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(run_dir: str, config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    from ganpipe.evaluate import evaluate_run

    return evaluate_run(Path(run_dir), _config(config_path, overrides))


@task(name="register", cache_policy=NO_CACHE, **RETRIES)
def register_task(run_dir: str) -> dict[str, Any]:
    from ganpipe.registry import register_run

    result = register_run(Path(run_dir))
    get_run_logger().info("registered %s: %s", result["model_uri"], result["decision"])
    return result


def default_export_uri(cfg: Config, version: int) -> str:
    return str(storage.ganpipe_home() / "exports" / cfg.registry.name / f"v{version}")


@task(name="export", cache_policy=NO_CACHE, **RETRIES)
def export_task(model_uri: str, out: str, config_path: str, overrides: list[str] | None,
                training_counts: dict[str, int] | None) -> dict[str, Any]:
    from ganpipe.export import export

    cfg = _config(config_path, overrides)
    e = cfg.export
    return export(model_uri, e.num_images, out, fmt=e.format, shard_size=e.shard_size,
                  class_balance=e.class_balance, seed=e.seed, endpoint_url=cfg.storage.endpoint_url,
                  training_counts=training_counts, num_processes=e.num_processes)


def run_stage(name: str, fn: Any, *args: Any) -> Any:
    """Call a stage; on failure, fail the flow with the stage named and its cause logged."""
    try:
        return fn(*args)
    except Exception as exc:
        get_run_logger().error("stage %s failed: %s", name, exc)
        raise StageError(name, exc) from exc


@flow(name="ganpipe-training-pipeline")
def training_pipeline(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = _config(config_path, overrides)
    data = run_stage("ingest", ingest_task, config_path, overrides)
    trained = run_stage("train", train_task, config_path, overrides)
    evaluation = run_stage("evaluate", evaluate_task, trained["run_dir"], config_path, overrides)
    registered = run_stage("register", register_task, trained["run_dir"])
    exported = None
    if cfg.export.num_images > 0:
        out = cfg.export.out or default_export_uri(cfg, registered["version"])
        counts = _class_counts(data)
        exported = run_stage("export", export_task, registered["model_uri"], out, config_path, overrides, counts)
    summary = {
        "model_uri": registered["model_uri"], "version": registered["version"], "name": registered["name"],
        "aliases": registered["aliases"], "decision": registered["decision"],
        "metrics": evaluation["metrics"], "export": exported, "run_dir": trained["run_dir"],
        "mlflow_run_id": trained.get("mlflow_run_id"), "data_fingerprint": data["fingerprint"],
    }
    publish_summary(summary)
    return summary


def _class_counts(data: dict[str, Any]) -> dict[str, int] | None:
    from ganpipe.data import open_prepared

    try:
        return open_prepared(data["location"]).meta.get("class_counts")
    except Exception:  # noqa: BLE001 - counts only steer label proportions of the export
        return None


def mlflow_links(summary: dict[str, Any]) -> list[str]:
    uri = tracking.tracking_uri()
    run_id, name, version = summary.get("mlflow_run_id"), summary["name"], summary["version"]
    if uri.startswith("http"):
        return [f"[MLflow run]({uri.rstrip('/')}/#/runs/{run_id})",
                f"[Registered model]({uri.rstrip('/')}/#/models/{name}/versions/{version})"]
    return [f"MLflow run `{run_id}` and model `{name}` v{version}: `mlflow ui --backend-store-uri {uri}`"]


def publish_summary(summary: dict[str, Any]) -> None:
    rows = [{"metric": name, "value": r.get("value"), "uncertainty": r.get("uncertainty"),
             "note": r.get("warning") or r.get("error") or ""} for name, r in summary["metrics"].items()]
    create_table_artifact(rows, key="ganpipe-metrics", description="evaluation metrics")
    metric_lines = "\n".join(f"| {r['metric']} | {_fmt(r['value'], '.4g')} | {_fmt(r['uncertainty'], '.3g')} |"
                             for r in rows)
    export = summary.get("export")
    export_line = f"{export['out']} ({export['num_images']} rows, manifest `{export['manifest']}`)" if export \
        else "not configured"
    markdown = "\n".join([
        f"# ganpipe pipeline: {summary['name']} v{summary['version']}",
        "", f"- model: `{summary['model_uri']}` (aliases: {', '.join(summary['aliases']) or 'none'})",
        f"- alias decision: {summary['decision']}", f"- data fingerprint: `{summary['data_fingerprint']}`",
        f"- export: {export_line}", *[f"- {link}" for link in mlflow_links(summary)],
        "", "| metric | value | uncertainty |", "|---|---|---|", metric_lines])
    create_markdown_artifact(markdown, key="ganpipe-summary", description="pipeline summary")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)

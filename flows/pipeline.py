"""The training pipeline as a Prefect flow: ingest -> train -> evaluate -> register -> export.

Thin by design: each task loads the config from its path and overrides, calls ganpipe's library,
and returns plain JSON (URIs, fingerprints, numbers). Nothing heavier crosses between tasks.
The export and evaluation flows (flows/export.py, flows/evaluation.py) reuse these tasks.
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

from ganpipe import network, tracking
from ganpipe.config import Config
from ganpipe.config_files import load_config
from ganpipe.errors import EvaluationFailed, StageError, UserError


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (storage, registry); never bad input, nor an endpoint that did not
    answer: the request already spent its retries (storage.retries) within storage.timeout_s, and
    retrying the task would multiply that time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception as exc:  # noqa: BLE001 - anything else may be transient
        return network.unreachable(exc) is None
    return False


RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_unless_bad_input}


def load_flow_config(config_path: str, overrides: list[str] | None) -> Config:
    """The flow's config, its network budget in force (a worker runs flows without the CLI)."""
    cfg = load_config(config_path, list(overrides or []))
    network.use(cfg.storage.timeout_s, cfg.storage.retries)
    return cfg


def champion_uri(cfg: Config) -> str:
    return f"models:/{cfg.registry.name}@champion"


# --- tasks -----------------------------------------------------------------------------------------

@task(name="ingest", cache_policy=NO_CACHE, **RETRIES)
def ingest_task(config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    """Prepared data is keyed by a fingerprint of the source's content and the preprocessing: an
    unchanged dataset is a cache hit that decodes nothing, in this flow run or any later one."""
    from ganpipe.data import ingest

    cfg = load_flow_config(config_path, overrides)
    result = ingest(cfg.data, cfg.storage.endpoint_url).to_json()
    get_run_logger().info("ingest: %s records, fingerprint %s (%s)", result["num_records"],
                          result["fingerprint"], "cache hit" if result["cached"] else "prepared")
    return result


class TrainingProgress:
    """Streams the trainer's output into the run log and keeps a progress artifact current with
    the step, the throughput and the latest losses."""

    STEP = re.compile(r"^step (\d+)/(\d+)\b(.*)$")
    KEY_VALUE = re.compile(r"(\w+)=(\S+)")

    def __init__(self) -> None:
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(0.0, key="ganpipe-training-progress",
                                                 description="training: starting")
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
                                     description=self.describe(step, total, match.group(3)))
            self.last_update = now

    def describe(self, step: int, total: int, rest: str) -> str:
        values = dict(self.KEY_VALUE.findall(rest))
        parts = [f"step {step}/{total}"]
        if "images_per_sec" in values:
            parts.append(f"{float(values.pop('images_per_sec')):.0f} images/s")
        eta = values.pop("eta", None)
        parts.append(" ".join(f"{k}={v}" for k, v in values.items()))
        if eta:
            parts.append(f"eta {eta}")
        return " · ".join(p for p in parts if p)


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_bad_input)
def train_task(config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    """A retry (or a rerun of the flow) resumes from the run's last checkpoint. Cancelling the
    flow run or hitting its timeout kills the training's whole process tree (ganpipe.launch)."""
    from ganpipe.launch import launch_training

    return launch_training(load_flow_config(config_path, overrides), resume="auto", on_line=TrainingProgress().on_line)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(run_dir: str, config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    from ganpipe.evaluate import evaluate_run

    cfg = load_flow_config(config_path, overrides)
    evaluation = evaluate_run(Path(run_dir), cfg)
    require_primary_metric(cfg, evaluation["metrics"])
    return evaluation


def check_evaluation(cfg: Config) -> None:
    """Bad evaluation settings fail the flow before anything is trained: unknown metrics, too few
    samples, a missing weights file, and a promotion metric the pipeline would not compute."""
    from ganpipe.evaluate import check_request

    e = cfg.eval
    check_request(e.metrics, e.num_samples, e.inception_weights, ("eval.num_samples", "eval.inception_weights"),
                  e.lpips_weights)
    primary = cfg.registry.primary_metric
    if primary not in e.metrics:
        raise UserError(f"register.primary_metric: {primary!r} is not among eval.metrics ({', '.join(e.metrics)})")
    if primary == "lpips" and not e.lpips_weights:  # lpips would come back unavailable: nothing to promote by
        raise UserError("register.primary_metric: lpips needs eval.lpips_weights (README, Super-resolution)")


def require_primary_metric(cfg: Config, metrics: dict[str, Any]) -> None:
    """No value for the primary metric means no alias decision: fail the stage, register nothing."""
    primary = cfg.registry.primary_metric
    result = metrics.get(primary) or {}
    if result.get("value") is None:
        raise EvaluationFailed(f"{primary} has no value ({result.get('error') or 'not computed'}); "
                               "nothing was registered")


@task(name="register", cache_policy=NO_CACHE, **RETRIES)
def register_task(run_dir: str) -> dict[str, Any]:
    """Idempotent: a retry after a partial failure finds the version by its weights' hash and
    finishes its tags and alias instead of registering a second copy."""
    from ganpipe.registry import register_run

    result = register_run(Path(run_dir))
    get_run_logger().info("registered %s: %s", result["model_uri"], result["decision"])
    return result


@task(name="export", cache_policy=NO_CACHE, **RETRIES)
def export_task(model_uri: str, out: str, config_path: str, overrides: list[str] | None,
                training_counts: dict[str, int] | None, held_out_of: str | None = None) -> dict[str, Any]:
    """The config's `export` section (quality gates and class counts included), written to `out`.
    Super-resolution configs super-resolve `export.input`, else the held-out images of the run
    `held_out_of`, instead of sampling. Finished shards are kept, so a retry continues where the
    failed attempt stopped."""
    cfg = load_flow_config(config_path, overrides)
    settings = cfg.export.model_copy(update={"out": out})
    if cfg.model.family == "srgan":
        from ganpipe.sr_export import export_super_resolved

        return export_super_resolved(model_uri, settings, cfg.storage.endpoint_url,
                                     held_out_of=Path(held_out_of) if held_out_of else None)
    from ganpipe.export import export

    return export(model_uri, settings, cfg.storage.endpoint_url, training_counts=training_counts)


@task(name="resolve-model", cache_policy=NO_CACHE, **RETRIES)
def resolve_model_task(model_uri: str) -> dict[str, str]:
    """Pin `models:/NAME@ALIAS` to the version it points at now (an alias can move while a flow
    runs): {"model_uri": models:/NAME/VERSION or the run directory, "label": vVERSION or its name}."""
    from ganpipe.generators import resolve_version

    if not model_uri.startswith("models:/"):
        return {"model_uri": model_uri, "label": Path(model_uri).name}
    version = resolve_version(model_uri)
    get_run_logger().info("%s is version %s", model_uri, version.version)
    return {"model_uri": f"models:/{version.name}/{version.version}", "label": f"v{version.version}"}


def run_stage(name: str, fn: Any, *args: Any) -> Any:
    """Call a stage; on failure, fail the flow with the stage named and its cause logged."""
    try:
        return fn(*args)
    except Exception as exc:
        get_run_logger().error("stage %s failed: %s", name, exc)
        raise StageError(name, exc) from exc


# --- the flow --------------------------------------------------------------------------------------

@flow(name="ganpipe-training-pipeline")
def training_pipeline(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """ingest -> train -> evaluate -> register -> export (when export.num_images > 0; always for
    super-resolution, of export.input or else the run's held-out images) of the config at
    `config_path` with `overrides` (dotted.key=value). Each stage starts only when the one before
    it succeeded: a failed evaluation registers nothing."""
    cfg = load_flow_config(config_path, overrides)
    check_evaluation(cfg)
    data = run_stage("ingest", ingest_task, config_path, overrides)
    trained = run_stage("train", train_task, config_path, overrides)
    evaluation = run_stage("evaluate", evaluate_task, trained["run_dir"], config_path, overrides)
    registered = run_stage("register", register_task, trained["run_dir"])
    exported = None
    super_resolution = cfg.model.family == "srgan"
    if cfg.export.num_images > 0 or super_resolution:
        from ganpipe.export import export_location  # torch: loaded when a flow runs, not when it is imported

        out = export_location(cfg.export, cfg.registry.name, f"v{registered['version']}")
        counts = None if super_resolution else _class_counts(data)
        exported = run_stage("export", export_task, registered["model_uri"], out, config_path, overrides, counts,
                             trained["run_dir"] if super_resolution else None)
    summary = {
        "model_uri": registered["model_uri"], "version": registered["version"], "name": registered["name"],
        "aliases": registered["aliases"], "decision": registered["decision"],
        "metrics": evaluation["metrics"], "export": exported, "run_dir": trained["run_dir"],
        "mlflow_run_id": trained.get("mlflow_run_id"), "data_fingerprint": data["fingerprint"],
        "sample_grid": registered.get("sample_grid"),
    }
    publish_summary(summary)
    return summary


def _class_counts(data: dict[str, Any]) -> dict[str, int] | None:
    from ganpipe.data import open_prepared

    try:
        return open_prepared(data["location"]).meta.get("class_counts")
    except Exception as exc:  # noqa: BLE001 - counts only steer label proportions of the export
        network.reraise_if_unreachable(exc)
        return None


# --- artifacts -------------------------------------------------------------------------------------

def mlflow_links(summary: dict[str, Any]) -> list[str]:
    uri = tracking.tracking_uri()
    run_id, name, version = summary.get("mlflow_run_id"), summary["name"], summary["version"]
    if uri.startswith("http"):
        return [f"[MLflow run]({uri.rstrip('/')}/#/runs/{run_id})",
                f"[Registered model]({uri.rstrip('/')}/#/models/{name}/versions/{version})"]
    return [f"MLflow run `{run_id}` and model `{name}` v{version}: `mlflow ui --backend-store-uri {uri}`"]


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": name, "value": r.get("value"), "uncertainty": r.get("uncertainty"),
             "note": r.get("warning") or r.get("error") or ""} for name, r in metrics.items()]


def publish_metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = metric_rows(metrics)
    create_table_artifact(rows, key="ganpipe-metrics", description="evaluation metrics")
    return rows


def metrics_markdown(rows: list[dict[str, Any]]) -> list[str]:
    return ["| metric | value | uncertainty |", "|---|---|---|",
            *(f"| {r['metric']} | {_fmt(r['value'], '.4g')} | ± {_fmt(r['uncertainty'], '.3g')} |" for r in rows)]


def export_line(export: dict[str, Any] | None) -> str:
    if not export:
        return "not configured"
    return f"`{export['out']}` ({export['num_images']} rows, manifest `{export['manifest']}`)"


def uplift_line(uplift: dict[str, Any] | None) -> list[str]:
    """What the synthetic data is worth to a downstream classifier, in one line (none when the
    pipeline did not compute `uplift`)."""
    if not uplift:
        return []
    if uplift.get("value") is None:
        return [f"- uplift: n/a ({uplift.get('error') or 'not computed'})"]
    best = uplift.get("best_ratio")
    at_best = next((r for r in uplift.get("ratios") or [] if r.get("ratio") == best), {})
    real = (uplift.get("real_only") or {}).get("mean")
    accuracies = f" (held-out accuracy {_fmt(real, '.1%')} real only, {_fmt(at_best.get('accuracy_mean'), '.1%')} at best)"
    return [f"- uplift: {uplift['value']:+.4g} ± {_fmt(uplift.get('uncertainty'), '.3g')} accuracy; best ratio: "
            f"{'none' if best is None else f'{best:g}x synthetic rows per real row'}"
            + (accuracies if real is not None else "")]


def summary_pictures(summary: dict[str, Any]) -> list[str]:
    """The version's sample grid and, with `uplift`, accuracy against the synthetic ratio, embedded
    as data: URIs (Prefect serves no files; its UI renders data:image/ sources in markdown). A
    picture that cannot be made is named, not fatal: the version is registered by now."""
    import tempfile

    from ganpipe.previews import png_data_uri, save_uplift_plot  # torch: loaded when a flow runs

    lines = []
    grid, uplift = summary.get("sample_grid"), (summary["metrics"].get("uplift") or {})
    if grid:
        try:
            lines += [f"**Samples of v{summary['version']}** (seeds 0-63, the grid logged with the version)", "",
                      f"![samples of {summary['name']} v{summary['version']}]({png_data_uri(Path(grid))})", ""]
        except OSError as exc:
            lines += [f"_sample grid unavailable: {exc}_", ""]
    if uplift.get("ratios"):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                save_uplift_plot(uplift["ratios"], uplift.get("real_only") or {}, Path(tmp) / "uplift.png")
                lines += ["**Held-out accuracy against the synthetic ratio** (mean ± standard error over repeats)", "",
                          f"![accuracy against synthetic ratio]({png_data_uri(Path(tmp) / 'uplift.png')})", ""]
            except (OSError, KeyError, TypeError, ValueError) as exc:
                lines += [f"_uplift plot unavailable: {exc}_", ""]
    return ["## Pictures", "", *lines] if lines else []


def summary_markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The `ganpipe-summary` artifact: what a person scanning runs in the Prefect UI needs first."""
    return "\n".join([
        f"# ganpipe pipeline: {summary['name']} v{summary['version']}",
        "", f"- model: `{summary['model_uri']}` (aliases: {', '.join(summary['aliases']) or 'none'})",
        f"- alias decision: {summary['decision']}", *uplift_line(summary["metrics"].get("uplift")),
        f"- data fingerprint: `{summary['data_fingerprint']}`",
        f"- export: {export_line(summary.get('export'))}", *[f"- {link}" for link in mlflow_links(summary)],
        "", *metrics_markdown(rows), "", *summary_pictures(summary)])


def publish_summary(summary: dict[str, Any]) -> None:
    rows = publish_metrics_table(summary["metrics"])
    create_markdown_artifact(summary_markdown(summary, rows), key="ganpipe-summary", description="pipeline summary")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)

"""Bulk synthetic data as a Prefect flow: a registered generator (by default the config's
champion, `models:/<register.name>@champion`) to parquet shards or an image folder, locally or on
S3, with the config's `export` section."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import (
    champion_uri,
    export_line,
    export_task,
    load_flow_config,
    resolve_model_task,
    run_stage,
)
from ganpipe.errors import UserError


@flow(name="ganpipe-export")
def export_flow(config_path: str, overrides: list[str] | None = None, model_uri: str | None = None,
                out: str | None = None) -> dict[str, Any]:
    """`out` defaults to export.out, else $GANPIPE_HOME/exports/<register.name>/v<version>."""
    from ganpipe.export import export_location  # torch: loaded when the flow runs, not when it is imported

    cfg = load_flow_config(config_path, overrides)
    if cfg.model.family == "srgan" and not cfg.export.input:
        raise UserError("export.input: set the dataset to super-resolve (e.g. --set export.input=path/to/images)")
    if cfg.model.family != "srgan" and cfg.export.num_images < 1:
        raise UserError("export.num_images: set how many rows to export (e.g. --set export.num_images=10000)")
    model = run_stage("resolve-model", resolve_model_task, model_uri or champion_uri(cfg))
    out = out or export_location(cfg.export, cfg.registry.name, model["label"])
    exported = run_stage("export", export_task, model["model_uri"], out, config_path, overrides, None)
    create_markdown_artifact("\n".join([
        f"# ganpipe export: {model['model_uri']}", "",
        f"- export: {export_line(exported)}", f"- shards: {exported['num_shards']}",
        f"- rows per class: {exported.get('per_class_counts') or 'unconditional'}"]),
        key="ganpipe-export", description="export summary")
    return {"model_uri": model["model_uri"], **exported}

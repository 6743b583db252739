"""The human-readable lines commands print beside their JSON result (`--json` prints the JSON
alone): kept apart from the command-line parsing in ganpipe.cli."""

from __future__ import annotations

from typing import Any

from ganpipe import tracking


def metric_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per metric: value ± uncertainty (uplift: its best ratio; a warning in brackets), or why
    it is unavailable."""
    lines = []
    for name, result in metrics.items():
        if result.get("value") is None:
            lines.append(f"{name}: unavailable ({result.get('error', 'failed')})")
        else:
            lines.append(f"{name}: {result['value']:.4f} ± {result.get('uncertainty') or 0:.4f}"
                         + (f" (best ratio {result['best_ratio']:g})" if result.get("best_ratio") else "")
                         + (f"  [{result['warning']}]" if result.get("warning") else ""))
    return lines


def pipeline_summary_lines(summary: dict[str, Any]) -> list[str]:
    """What `ganpipe pipeline` prints when it finishes: the model, the decision, the metrics, the
    export, and where to look (MLflow, Prefect)."""
    lines = ["", "ganpipe pipeline finished",
             f"  model:    {summary['model_uri']} (version {summary['version']}, "
             f"aliases: {', '.join(summary.get('aliases') or []) or 'none'})",
             f"  decision: {summary.get('decision', '')}"]
    lines += [f"  {line}" for line in metric_lines(summary.get("metrics") or {})]
    export = summary.get("export")
    lines.append(f"  export:   {export['out']} ({export['num_images']} rows)" if export else "  export:   not configured")
    lines.append(f"  MLflow:   mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    lines.append("  Prefect:  prefect server start, then open http://127.0.0.1:4200 (flow runs)")
    return lines

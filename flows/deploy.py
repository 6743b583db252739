"""Prefect deployments for the pipeline and export flows (built with the orchestration issue)."""

from __future__ import annotations

from typing import Any


def deploy(config_path: str | None, overrides: list[str], cfg: Any) -> dict[str, Any]:
    raise NotImplementedError("`ganpipe deploy` is not built yet")

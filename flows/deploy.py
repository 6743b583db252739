"""`ganpipe deploy [CONFIG]`: create or update the Prefect deployments of the training pipeline and
the export flow, for a `process` work pool (created when missing).

- Both deployments are named after `register.name` and take `{config_path, overrides}` as default
  parameters: the config's absolute path and the `--set` values.
- The pipeline runs on the cron schedule `deploy.cron` in `deploy.timezone`; the export flow runs
  on demand (after a promotion, say). Without a config the deployments are named `on-demand`, have
  no schedule, and every run must pass `config_path`.
- Flow runs start in the directory `ganpipe deploy` ran in, as `ganpipe pipeline` would there:
  relative paths in configs and the default GANPIPE_HOME (./.ganpipe) mean the same thing.

prefect.yaml at the repo root declares the same two deployments for the demo config, for
`prefect deploy --all`.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

from ganpipe.config import Config, DeployConfig
from ganpipe.errors import UserError


def deploy(config_path: str | None, overrides: list[str], cfg: Config | None) -> dict[str, Any]:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    from flows.export import export_flow
    from flows.pipeline import training_pipeline

    settings = cfg.deploy if cfg else DeployConfig()
    name = cfg.registry.name if cfg else "on-demand"
    parameters: dict[str, Any] = {"overrides": list(overrides)}
    if config_path:
        parameters["config_path"] = str(Path(config_path).resolve())
    schedule = training_schedule(settings)
    ensure_process_pool(settings.work_pool)
    deployed = []
    for flow, schedules in ((training_pipeline, [schedule] if schedule else []), (export_flow, [])):
        deployment = RunnerDeployment.from_flow(
            flow, name=name, schedules=schedules, parameters=parameters, work_pool_name=settings.work_pool,
            job_variables={"working_dir": str(Path.cwd())}, entrypoint_type=EntrypointType.MODULE_PATH,
            tags=["ganpipe"])
        deployment.apply()
        deployed.append(f"{flow.name}/{name}")
    return {"deployments": deployed, "work_pool": settings.work_pool, "parameters": parameters,
            "schedule": {"cron": settings.cron, "timezone": settings.timezone} if schedule else None}


def training_schedule(settings: DeployConfig) -> Any | None:
    """deploy.cron in deploy.timezone, validated here so a typo is exit 2 naming the key."""
    if not settings.cron:
        return None
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=settings.cron, timezone=settings.timezone)
    except ValueError as exc:
        problem = str(exc).splitlines()[-1].strip() if str(exc) else type(exc).__name__
        key = "deploy.timezone" if "timezone" in str(exc).lower() else "deploy.cron"
        raise UserError(f"{key}: {problem} (cron {settings.cron!r}, timezone {settings.timezone!r})") from None


def ensure_process_pool(name: str) -> None:
    """Create the work pool as a `process` pool unless it exists (of whatever type)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # or someone else created it just now
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))

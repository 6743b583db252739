"""MLflow location and run provenance: the embedded store by default, a real server when configured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ganpipe import locks, network, runs, storage
from ganpipe.config import Config

# MLflow 3 sends usage telemetry to the internet unless told not to; ganpipe talks only to the
# stores it is configured with. An explicit MLFLOW_DISABLE_TELEMETRY=false still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow draws a progress bar for every artifact download (a model load, a registration's
# validation): a few per pipeline run, cluttering its log. An explicit setting still wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_PREPARED_STORES: set[str] = set()  # sqlite stores this process has opened (prepare_embedded_store)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set; else sqlite under GANPIPE_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{storage.ganpipe_home() / 'mlflow.db'}"


def is_server() -> bool:
    """A tracking server owns its artifact location (e.g. --artifacts-destination s3://...)."""
    return tracking_uri().split(":", 1)[0] in ("http", "https", "databricks")


def configure_mlflow() -> None:
    """Point this process's MLflow client at the configured store, registry included."""
    import mlflow

    uri = tracking_uri()
    user_set = {variable: os.environ.get(variable) for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    # The registry lives with the runs (the same sqlite file, or the server) unless
    # MLFLOW_REGISTRY_URI says otherwise; set it every time, as MLflow keeps it process-wide.
    mlflow.set_registry_uri(user_set["MLFLOW_REGISTRY_URI"] or uri)
    # MLflow also exports what it is given to os.environ. Put the environment back as the user
    # set it: otherwise the embedded default would stop following GANPIPE_HOME in this process
    # and override it in every child process.
    for variable, value in user_set.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    prepare_embedded_store(uri, user_set["MLFLOW_REGISTRY_URI"] or uri)


def prepare_embedded_store(uri: str, registry_uri: str) -> None:
    """Create (and migrate) a sqlite store under a file lock beside it. MLflow creates its tables
    on first use with no lock of its own: two processes on a fresh GANPIPE_HOME (two `ganpipe
    train` started together) would both migrate, and one died with a traceback. Once per process."""
    if not uri.startswith("sqlite:///") or uri in _PREPARED_STORES:
        return
    from mlflow import MlflowClient

    database = Path(uri.removeprefix("sqlite:///"))
    with locks.hold(database.with_name(database.name + ".lock"), str(database), "MLflow store set-up",
                    wait=True, quiet=True):
        client = MlflowClient(uri, registry_uri)
        client.search_experiments(max_results=1)  # opening the store creates and migrates it
        if registry_uri == uri:
            client.search_registered_models(max_results=1)
    _PREPARED_STORES.add(uri)


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use. Without a tracking server its artifacts live
    under GANPIPE_HOME (MLflow would otherwise write ./mlruns beside whatever the working directory
    is, and models logged from one directory would not load from another)."""
    import mlflow

    configure_mlflow()
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None if is_server() else (storage.ganpipe_home() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as exc:
        network.reraise_if_unreachable(exc)
        existing = mlflow.get_experiment_by_name(name)  # created concurrently by another process
        if existing is None:
            raise
        return existing.experiment_id


def known_run(run_id: str | None) -> str | None:
    """`run_id` when this tracking store has that run, else None (a run directory trained
    against another store, or a store that was reset)."""
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_mlflow()
    try:
        MlflowClient().get_run(run_id)
        return run_id
    except MlflowException as exc:
        network.reraise_if_unreachable(exc)  # "unknown here" needs an answer from the store
        return None


def git_commit() -> str | None:
    """The commit of the checkout ganpipe runs from, with `-dirty` when it has uncommitted
    changes; None when ganpipe is not a checkout's own `ganpipe/` (an installed copy inside some
    other repository must not report that repository's commit)."""
    package = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package,
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        toplevel, commit = head.stdout.split()
        if Path(toplevel).resolve() / "ganpipe" != package:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                cwd=package, capture_output=True, text=True, timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return commit + ("-dirty" if status.stdout.strip() else "")


def flow_run_id() -> str | None:
    """The Prefect flow run this work belongs to: passed down to subprocesses in GANPIPE_FLOW_RUN_ID."""
    if os.environ.get("GANPIPE_FLOW_RUN_ID"):
        return os.environ["GANPIPE_FLOW_RUN_ID"]
    if "prefect" not in sys.modules:  # not inside a flow; importing prefect just to learn that is slow
        return None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a flow run there is simply none
        return None


class MlflowLogger:
    """Main-process MLflow logging into the run recorded in run.json (created on first use, and when
    this store does not have the recorded one)."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import mlflow  # deferred: seconds to import, and only the main process logs

        self.mlflow = mlflow
        info = runs.read_info(run_dir)
        experiment = experiment_id(cfg.registry.name)
        # A run directory can name a run this store does not have: one copied from another machine,
        # kept across an upgrade without its store, or trained before the store was reset. Resuming
        # it continues the training and logs into a new MLflow run, rather than failing at the start.
        recorded = known_run(info.get("mlflow_run_id"))
        run = mlflow.start_run(run_id=recorded, experiment_id=experiment, run_name=run_dir.name)
        self.run_id = run.info.run_id
        if info.get("mlflow_run_id") and recorded is None:
            print(f"note: MLflow run {info['mlflow_run_id']} is not in {tracking_uri()}; "
                  f"logging to a new run {self.run_id}", file=sys.stderr, flush=True)
        if recorded is None:
            runs.update_info(run_dir, mlflow_run_id=self.run_id)
            flat = _flatten(cfg.to_dict())
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            mlflow.set_tags({"ganpipe.data_fingerprint": info["data"]["fingerprint"],
                             "ganpipe.config_hash": cfg.hash(), "ganpipe.run_dir": str(run_dir),
                             "ganpipe.git_commit": git_commit() or "unknown",
                             "ganpipe.flow_run_id": flow_run_id() or "none"})
            mlflow.log_text(cfg.to_yaml(), "config.yaml")

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            self.mlflow.log_metrics(values, step=step)

    def artifact(self, path: Path, folder: str) -> None:
        if self.enabled:
            self.mlflow.log_artifact(str(path), folder)

    def close(self, status: str) -> None:
        if self.enabled:
            self.mlflow.end_run(status=status)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

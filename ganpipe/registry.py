"""MLflow registration: log the EMA generator as a safe pyfunc, record its lineage, and keep
`champion` pointing at the best generator so far.

Promotion rule: a new version becomes `champion` only when it beats the current champion on the
primary metric by more than max(combined uncertainty, register.margin), where the combined
uncertainty is sqrt(u_new^2 + u_champion^2). Otherwise it is the `challenger`. A version whose
evaluation failed or is missing gets no alias. Every decision and its reason is recorded as a
version tag and returned.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ganpipe import runs, storage, tracking
from ganpipe.errors import UserError
from ganpipe.models import NetworkSpec, build_generator, generate

MODEL_ARTIFACT = "generator"
CHAMPION, CHALLENGER = "champion", "challenger"


# --- loading a MODEL reference ------------------------------------------------------------------

@dataclass
class LoadedGenerator:
    generator: torch.nn.Module
    spec: NetworkSpec
    source: dict[str, Any]  # model_uri, name, version, run_id, run_dir (what is known)


def parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, alias, None
    name, sep, version = body.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise UserError(f"--model {ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or a run directory")
    return name, None, version


def resolve_version(ref: str) -> Any:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure_mlflow()
    name, alias, version = parse_model_uri(ref)
    client = MlflowClient()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise UserError(f"--model {ref}: not found in the registry at {tracking.tracking_uri()} "
                        f"({exc.message.splitlines()[0]})") from None


def load_generator(ref: str, device: str | torch.device = "cpu") -> LoadedGenerator:
    """A generator from the registry (its safetensors and spec only: no artifact code runs) or
    from a local run directory."""
    if ref.startswith("models:/"):
        version = resolve_version(ref)
        folder = _download_version(version)
        source = {"model_uri": f"models:/{version.name}/{version.version}", "name": version.name,
                  "version": int(version.version), "run_id": version.run_id,
                  "run_dir": (version.tags or {}).get("ganpipe.run_dir")}
    else:
        run_dir = storage.local_path(ref).resolve()
        folder = runs.generator_dir(run_dir)
        if not (folder / "generator.safetensors").exists():
            raise UserError(f"--model {ref}: no finished generator in that directory "
                            "(expected a run directory after `ganpipe train`)")
        source = {"model_uri": str(run_dir), "run_dir": str(run_dir),
                  "run_id": runs.read_info(run_dir).get("mlflow_run_id")}
    spec = NetworkSpec.from_json(json.loads((folder / "spec.json").read_text()))
    generator = build_generator(spec)
    generator.load_state_dict(load_file(str(folder / "generator.safetensors")))
    return LoadedGenerator(generator.to(device).eval(), spec, source)


def _download_version(version: Any) -> Path:
    """Registered versions are immutable, so one download per version is cached."""
    import mlflow

    cache = storage.ganpipe_home() / "cache" / "models" / version.name / str(version.version)
    if (cache / "spec.json").exists():
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=tmp))
        found = next(iter(local.rglob("generator.safetensors")), None)
        if found is None:
            raise UserError(f"models:/{version.name}/{version.version} is not a ganpipe generator")
        with storage.atomic_directory(cache) as target:
            shutil.copyfile(found, target / "generator.safetensors")
            shutil.copyfile(found.parent / "spec.json", target / "spec.json")
    return cache


# --- promotion ----------------------------------------------------------------------------------

@dataclass
class Decision:
    alias: str | None
    reason: str


def decide_alias(metric: str, new: dict[str, Any] | None, champion: dict[str, Any] | None,
                 margin: float, higher_is_better: bool) -> Decision:
    """Pure rule (see module doc); `new`/`champion` are {"value", "uncertainty"} or None."""
    if new is None or new.get("value") is None or not math.isfinite(new["value"]):
        return Decision(None, f"no valid {metric} for this version: no alias")
    if champion is None or champion.get("value") is None:
        return Decision(CHAMPION, f"first version with a {metric}: champion")
    sign = 1.0 if higher_is_better else -1.0
    improvement = sign * (new["value"] - champion["value"])
    uncertainty = math.hypot(new.get("uncertainty") or 0.0, champion.get("uncertainty") or 0.0)
    required = max(uncertainty, margin)
    comparison = (f"{metric} {new['value']:.4g} vs champion {champion['value']:.4g}: "
                  f"improvement {improvement:.4g}, required > {required:.4g} "
                  f"(uncertainty {uncertainty:.4g}, margin {margin:.4g})")
    if improvement > required:
        return Decision(CHAMPION, f"{comparison}: promoted to champion")
    return Decision(CHALLENGER, f"{comparison}: challenger")


def _metric_from_tags(tags: dict[str, str], metric: str) -> dict[str, Any] | None:
    if f"ganpipe.metric.{metric}" not in tags:
        return None
    value = float(tags[f"ganpipe.metric.{metric}"])
    uncertainty = float(tags.get(f"ganpipe.metric.{metric}.uncertainty", 0.0) or 0.0)
    return {"value": value, "uncertainty": uncertainty}


# --- registration -------------------------------------------------------------------------------

def _signature(spec: NetworkSpec):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = [ColSpec("long", "seed")] + ([ColSpec("long", "label")] if spec.conditional else [])
    if spec.is_image:
        c, h, w = spec.sample_shape
        output = TensorSpec(np.dtype("uint8"), (-1, h, w, c))
    else:
        output = TensorSpec(np.dtype("float32"), (-1, spec.sample_shape[0]))
    params = ParamSchema([ParamSpec("truncation", "double", 0.0)])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([output]), params=params)


def _input_example(spec: NetworkSpec):
    import pandas as pd

    example = {"seed": [0, 1]}
    if spec.conditional:
        example["label"] = [0, min(1, spec.num_classes - 1)]
    return pd.DataFrame(example)


def _pip_requirements() -> list[str]:
    import mlflow
    import safetensors

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}", "numpy", "pandas"]


def _existing_version(client: Any, name: str, weights_sha: str) -> Any | None:
    """Registering the same generator again (a retried task) returns its version, not a new one."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if (version.tags or {}).get("ganpipe.generator_sha256") == weights_sha:
            return version
    return None


def register_run(run_dir: Path, name: str | None = None, higher_is_better: dict[str, bool] | None = None
                 ) -> dict[str, Any]:
    """Log and register the run's EMA generator, tag its lineage, apply the alias rule."""
    from mlflow import MlflowClient

    from ganpipe.metrics import METRICS

    run_dir = run_dir.resolve()
    if not runs.is_run_dir(run_dir):
        raise UserError(f"--run {run_dir}: not a ganpipe run directory")
    generator = runs.generator_dir(run_dir)
    if not (generator / "generator.safetensors").exists():
        raise UserError(f"--run {run_dir}: training has not finished (no generator/)")
    cfg = runs.load_run_config(run_dir)
    name = name or cfg.registry.name
    info = runs.read_info(run_dir)
    evaluation = runs.read_json(run_dir / "evaluation.json")
    spec = NetworkSpec.from_json(json.loads((generator / "spec.json").read_text()))
    weights_sha = storage.sha256_file(generator / "generator.safetensors")

    tracking.configure_mlflow()
    client = MlflowClient()
    version = _existing_version(client, name, weights_sha)
    if version is None:
        version = _log_and_register(run_dir, name, spec, info, cfg, generator)
    tags = {
        "ganpipe.generator_sha256": weights_sha, "ganpipe.run_dir": str(run_dir),
        "ganpipe.data_fingerprint": info.get("data", {}).get("fingerprint", "unknown"),
        "ganpipe.config_hash": info.get("config_hash", cfg.hash()),
        "ganpipe.git_commit": tracking.git_commit() or "unknown",
        "ganpipe.flow_run_id": tracking.flow_run_id() or "none",
        "ganpipe.evaluation_status": evaluation.get("status", "missing"),
    }
    for metric, result in (evaluation.get("metrics") or {}).items():
        if isinstance(result, dict) and result.get("value") is not None:
            tags[f"ganpipe.metric.{metric}"] = repr(float(result["value"]))
            tags[f"ganpipe.metric.{metric}.uncertainty"] = repr(float(result.get("uncertainty") or 0.0))

    primary = cfg.registry.primary_metric
    directions = higher_is_better or {k: m.higher_is_better for k, m in METRICS.items()}
    new_value = _metric_from_tags(tags, primary) if evaluation.get("status") == "ok" else None
    champion_version = _current(client, name, CHAMPION)
    if champion_version is not None and champion_version.version == version.version:
        decision = Decision(CHAMPION, "this version is already the champion")
    else:
        champion_value = _metric_from_tags(champion_version.tags or {}, primary) if champion_version else None
        decision = decide_alias(primary, new_value, champion_value, cfg.registry.margin,
                                directions.get(primary, False))
    tags["ganpipe.alias_decision"] = decision.reason
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    if decision.alias:
        client.set_registered_model_alias(name, decision.alias, version.version)
    aliases = sorted(client.get_model_version(name, version.version).aliases or [])
    card = model_card(name, int(version.version), spec, info, evaluation, decision, aliases)
    client.update_model_version(name, version.version, description=card)
    if version.run_id:
        client.log_text(version.run_id, card, f"model_card_v{version.version}.md")
        client.log_dict(version.run_id, {"version": int(version.version), "alias": decision.alias,
                                         "reason": decision.reason}, f"promotion_v{version.version}.json")
    return {"name": name, "version": int(version.version), "aliases": aliases,
            "model_uri": f"models:/{name}/{version.version}", "decision": decision.reason}


def _current(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _log_and_register(run_dir: Path, name: str, spec: NetworkSpec, info: dict[str, Any], cfg: Any,
                      generator: Path) -> Any:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "ganpipe_generator"
        package.mkdir()
        (package / "__init__.py").write_text('"""ganpipe\'s networks, shipped with a registered generator."""\n')
        shutil.copyfile(Path(__file__).with_name("models.py"), package / "networks.py")
        experiment = tracking.experiment_id(cfg.registry.name)
        with mlflow.start_run(run_id=tracking.known_run(info.get("mlflow_run_id")), experiment_id=experiment,
                              run_name=run_dir.name):
            logged = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"weights": str(generator / "generator.safetensors"),
                           "spec": str(generator / "spec.json")},
                code_paths=[str(package)], signature=_signature(spec), input_example=_input_example(spec),
                pip_requirements=_pip_requirements(), registered_model_name=name)
            if spec.is_image:
                labels = [i % spec.num_classes for i in range(64)] if spec.conditional else None
                model = build_generator(spec)
                model.load_state_dict(load_file(str(generator / "generator.safetensors")))
                from ganpipe.train import save_grid

                grid = Path(tmp) / "samples.png"
                save_grid(generate(model.eval(), spec, list(range(64)), labels), grid)
                mlflow.log_artifact(str(grid), "registered")
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, str(logged.registered_model_version))


def model_card(name: str, version: int, spec: NetworkSpec, info: dict[str, Any], evaluation: dict[str, Any],
               decision: Decision, aliases: list[str]) -> str:
    rows = []
    for metric, result in (evaluation.get("metrics") or {}).items():
        if isinstance(result, dict) and result.get("value") is not None:
            rows.append(f"| {metric} | {result['value']:.4g} | {result.get('uncertainty') or 0:.3g} |")
    table = "\n".join(["| metric | value | uncertainty |", "|---|---|---|", *rows]) if rows else "_not evaluated_"
    kind = (f"{spec.sample_shape[1]}x{spec.sample_shape[2]} images, {spec.sample_shape[0]} channel(s)"
            if spec.is_image else f"vectors with columns {', '.join(spec.columns)}")
    conditional = f"conditional on {spec.num_classes} classes ({', '.join(spec.classes)})" \
        if spec.conditional else "unconditional"
    example_label = ', "label": [0, 1]' if spec.conditional else ""
    return f"""# {name} v{version}

A {spec.family.upper()} generator of {kind}, {conditional}, trained by ganpipe.

- data fingerprint: `{info.get('data', {}).get('fingerprint', 'unknown')}`
- config hash: `{info.get('config_hash', 'unknown')}`
- aliases: {', '.join(aliases) or 'none'} ({decision.reason})

## Evaluation
{table}

## Use
```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}/{version}")
samples = model.predict(pd.DataFrame({{"seed": [0, 1]{example_label}}}))
```
"""

"""MLflow registration: log the EMA generator as a safe pyfunc, record its lineage, and keep
`champion` pointing at the best generator so far.

Promotion rule: a new version becomes `champion` only when it beats the current champion on the
primary metric by more than max(combined uncertainty, register.margin), where the combined
uncertainty is sqrt(u_new^2 + u_champion^2). Otherwise it is the `challenger`. A version whose
evaluation failed, is missing, or was computed for other weights gets no alias. Every decision
and its reason is recorded as a version tag (`ganpipe.alias_decision`), in the run's
`registry/vN/promotion.json`, and returned.

Safety: registration reads the generator through ganpipe.generators (spec.json and
safetensors only) and tags the version with the sha256 of its weights (SHA_TAG) and of its
spec.json (SPEC_SHA_TAG), which loading checks. A version registered before SPEC_SHA_TAG keeps
only SHA_TAG: registering the same generator again does not vouch for a spec it was not
registered with.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import safetensors
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from ganpipe import network, networks, runs, tracking
from ganpipe.config_values import check_name
from ganpipe.data import open_prepared
from ganpipe.data.pairs import holdout_split
from ganpipe.errors import UserError, show
from ganpipe.generators import BEST_RATIO_TAG, SHA_TAG, SPEC_SHA_TAG, read_generator
from ganpipe.metrics import METRICS
from ganpipe.metrics.sr import comparison_rows
from ganpipe.networks import NetworkSpec, generate
from ganpipe.networks.upscale import DEFAULT_TILE
from ganpipe.previews import save_grid, save_uplift_plot
from ganpipe.shards import encode_png

MODEL_ARTIFACT = "generator"
CHAMPION, CHALLENGER = "champion", "challenger"
REFERENCE_TAG = "ganpipe.eval_reference_fingerprint"  # the real data the metrics were measured against


# --- promotion ----------------------------------------------------------------------------------

@dataclass
class Decision:
    alias: str | None
    reason: str


def _valid(result: dict[str, Any] | None) -> bool:
    return result is not None and result.get("value") is not None and math.isfinite(result["value"])


def decide_alias(metric: str, new: dict[str, Any] | None, champion: dict[str, Any] | None,
                 margin: float, higher_is_better: bool) -> Decision:
    """Pure rule (see module doc); `new`/`champion` are {"value", "uncertainty"} or None."""
    if not _valid(new):
        return Decision(None, f"no valid {metric} for this version: no alias")
    assert new is not None
    if not _valid(champion):
        # No champion yet, or one without this metric (set by hand, or a different primary metric).
        return Decision(CHAMPION, f"first version with a {metric}: champion")
    assert champion is not None
    sign = 1.0 if higher_is_better else -1.0
    improvement = sign * (new["value"] - champion["value"])
    uncertainty = math.hypot(new.get("uncertainty") or 0.0, champion.get("uncertainty") or 0.0)
    required = max(uncertainty, margin)
    comparison = (f"{metric} {new['value']:.4g} vs champion {champion['value']:.4g} "
                  f"({'higher' if higher_is_better else 'lower'} is better): improvement {improvement:.4g}, "
                  f"required > {required:.4g} (uncertainty {uncertainty:.4g}, margin {margin:.4g})")
    if improvement > required:
        return Decision(CHAMPION, f"{comparison}: promoted to champion")
    return Decision(CHALLENGER, f"{comparison}: challenger")


def _metric_from_tags(tags: dict[str, str], metric: str) -> dict[str, Any] | None:
    if f"ganpipe.metric.{metric}" not in tags:
        return None
    value = float(tags[f"ganpipe.metric.{metric}"])
    uncertainty = float(tags.get(f"ganpipe.metric.{metric}.uncertainty", 0.0) or 0.0)
    return {"value": value, "uncertainty": uncertainty}


def _evaluation_for(path: Path, weights_sha: str) -> dict[str, Any]:
    """The run's evaluation file (evaluation.json; evaluation-psnr.json for the PSNR stage) when
    it is about these weights. An evaluation written before the generator changed (training
    extended, not re-evaluated) must not vouch for the new weights."""
    evaluation = runs.read_json(path)
    if not evaluation:
        return {"status": "missing", "metrics": {}}
    evaluated = evaluation.get("generator_sha256")
    if evaluated and evaluated != weights_sha:
        return {"status": "stale", "metrics": {}, "generator_sha256": evaluated}
    return evaluation


def _decide(client: Any, name: str, version: Any, evaluation: dict[str, Any], tags: dict[str, str],
            primary: str, margin: float, higher_is_better: bool) -> Decision:
    status = evaluation.get("status", "missing")
    if status != "ok":
        why = {"missing": "no evaluation.json in the run (run `ganpipe evaluate` or the pipeline)",
               "failed": "its evaluation failed",
               "stale": "evaluation.json was computed for other weights (the run changed since)"}
        return Decision(None, f"{why.get(status, f'evaluation status {status!r}')}: no alias")
    champion = _current(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version.version):
        return Decision(CHAMPION, "this version is already the champion")
    champion_metric = _metric_from_tags(champion.tags or {}, primary) if champion else None
    ours, theirs = tags.get(REFERENCE_TAG), (champion.tags or {}).get(REFERENCE_TAG) if champion else None
    if champion_metric is not None and ours and theirs and ours != theirs:
        # fd_domain and FID are distances to a reference set: against different data they do not compare.
        return Decision(CHALLENGER, f"{primary} was measured against other data (reference {ours}) than "
                                    f"champion v{champion.version}'s ({theirs}): not comparable, challenger")
    return decide_alias(primary, _metric_from_tags(tags, primary), champion_metric, margin, higher_is_better)


# --- registration -------------------------------------------------------------------------------

def _signature(spec: NetworkSpec):
    if spec.image_to_image:  # one encoded image in per row, one array of its own size out: no fixed output shape
        return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                              params=ParamSchema([ParamSpec("tile", "long", DEFAULT_TILE)]))
    inputs = [ColSpec("long", "seed")] + ([ColSpec("long", "label")] if spec.conditional else [])
    if spec.is_image:
        c, h, w = spec.sample_shape
        output = TensorSpec(np.dtype("uint8"), (-1, h, w, c))
    else:
        output = TensorSpec(np.dtype("float32"), (-1, spec.sample_shape[0]))
    params = ParamSchema([ParamSpec("truncation", "double", 0.0)])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([output]), params=params)


def _input_example(spec: NetworkSpec):
    if spec.image_to_image:
        return pd.DataFrame({"image": [encode_png(np.full((8, 8, spec.sample_shape[0]), 128, np.uint8))]})
    example = {"seed": [0, 1]}
    if spec.conditional:
        example["label"] = [0, min(1, spec.num_classes - 1)]
    return pd.DataFrame(example)


def _pip_requirements(spec: NetworkSpec) -> list[str]:
    from PIL import __version__ as pillow_version  # super-resolution models decode their input images

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}", "numpy", "pandas",
            *([f"pillow=={pillow_version}"] if spec.image_to_image else [])]


def _existing_version(client: Any, name: str, weights_sha: str, spec_sha: str) -> Any | None:
    """Registering the same generator again (a retried task) returns its version, not a new one.
    The same weights with another spec (other classes or vector statistics) are another generator;
    a version registered before specs were tagged is matched by its weights."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        network.reraise_if_unreachable(exc)
        return None
    for version in versions:
        tags = version.tags or {}
        if tags.get(SHA_TAG) == weights_sha and tags.get(SPEC_SHA_TAG, spec_sha) == spec_sha:
            return version
    return None


def _lineage_tags(run_dir: Path, info: dict[str, Any], cfg: Any, generator_dir: Path, weights_sha: str,
                  spec_sha: str | None, evaluation: dict[str, Any]) -> dict[str, str]:
    """Where the version came from, and how good it was measured to be."""
    # generator/info.json describes these exact weights; run.json the run's latest invocation.
    produced = runs.read_json(generator_dir / "info.json")
    tags = {
        SHA_TAG: weights_sha, "ganpipe.run_dir": str(run_dir),
        **({SPEC_SHA_TAG: spec_sha} if spec_sha else {}),
        "ganpipe.data_fingerprint": produced.get("data_fingerprint")
        or info.get("data", {}).get("fingerprint", "unknown"),
        "ganpipe.config_hash": produced.get("config_hash") or info.get("config_hash") or cfg.hash(),
        "ganpipe.train_steps": str(produced.get("step", "unknown")),
        "ganpipe.generator_checkpoint": produced.get("selected", "last"),  # train.final_generator
        "ganpipe.git_commit": tracking.git_commit() or "unknown",
        "ganpipe.flow_run_id": tracking.flow_run_id() or "none",
        "ganpipe.evaluation_status": evaluation.get("status", "missing"),
    }
    for metric, result in (evaluation.get("metrics") or {}).items():
        if isinstance(result, dict) and result.get("value") is not None:
            tags[f"ganpipe.metric.{metric}"] = repr(float(result["value"]))
            tags[f"ganpipe.metric.{metric}.uncertainty"] = repr(float(result.get("uncertainty") or 0.0))
    if _valid((evaluation.get("metrics") or {}).get("uplift")):
        tags[BEST_RATIO_TAG] = repr(float(evaluation["metrics"]["uplift"]["best_ratio"]))
    if evaluation.get("num_samples"):
        tags["ganpipe.eval_num_samples"] = str(evaluation["num_samples"])
    if evaluation.get("metrics"):
        # Older evaluations did not record their reference: they were made on the training data.
        tags[REFERENCE_TAG] = evaluation.get("reference_fingerprint") or tags["ganpipe.data_fingerprint"]
    return tags


def register_run(run_dir: Path, name: str | None = None, higher_is_better: dict[str, bool] | None = None,
                 stage: str = "final") -> dict[str, Any]:
    """Log and register the run's EMA generator, tag its lineage, apply the alias rule.
    `higher_is_better` overrides the metric directions of ganpipe.metrics.METRICS. `stage` psnr
    registers a super-resolution run's PSNR-stage generator instead (by default as
    `<register.name>-psnr`: its own model, whose champion competes only with other PSNR models)."""
    if stage not in runs.STAGES:
        raise UserError(f"--stage {show(stage)}: expected one of {', '.join(runs.STAGES)}")
    if name is not None:
        try:
            # MLflow allows more, but a name must survive models:/NAME@ALIAS parsing and search
            # filters, and it names a folder (exports/<name>/): the config's rule for names.
            check_name(name)
        except ValueError as exc:
            raise UserError(f"--name {show(name)}: {exc}") from None
    run_dir = run_dir.resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: is a file, not a run directory")
    if not runs.is_run_dir(run_dir):
        raise UserError(f"--run {run_dir}: not a ganpipe run directory")
    generator_dir = runs.generator_dir(run_dir, stage)
    cfg = runs.load_run_config(run_dir)
    if stage == "psnr" and cfg.model.family != "srgan":
        raise UserError(f"--stage psnr: only super-resolution runs (model.family srgan) have a PSNR-stage generator; "
                        f"{run_dir} is a {cfg.model.family} run")
    if not (generator_dir / "generator.safetensors").exists():
        why = "its pretraining (train.pretrain_steps) has not finished or has no steps" if stage == "psnr" \
            else "training has not finished"
        raise UserError(f"--run {run_dir}: {why} (no {generator_dir.name}/)")
    # register.name was checked as a name when the config loaded; its -psnr form is checked here.
    name = name or (cfg.registry.name if stage == "final" else f"{cfg.registry.name}-psnr")
    if stage == "psnr":
        try:
            check_name(name)
        except ValueError as exc:
            raise UserError(f"--name {show(name)}: {exc}") from None
    primary = cfg.registry.primary_metric
    directions = {k: m.higher_is_better for k, m in METRICS.items()} | (higher_is_better or {})
    if primary not in directions:
        raise UserError(f"{run_dir / 'config.yaml'}: register.primary_metric {primary!r} is not a metric "
                        f"({', '.join(sorted(directions))})")
    info = runs.read_info(run_dir)
    model, spec, weights_sha, spec_sha = read_generator(generator_dir)
    evaluation = _evaluation_for(run_dir / runs.EVALUATION_FILES[stage], weights_sha)

    tracking.configure_mlflow()
    client = MlflowClient()
    version = _existing_version(client, name, weights_sha, spec_sha)
    if version is None:
        version = _log_and_register(run_dir, name, spec, info, cfg, generator_dir, weights_sha, spec_sha)
    elif SPEC_SHA_TAG not in (version.tags or {}):
        spec_sha = None  # registered before specs were tagged: its stored spec was never checked against ours
    tags = _lineage_tags(run_dir, info, cfg, generator_dir, weights_sha, spec_sha, evaluation)
    decision = _decide(client, name, version, evaluation, tags, primary, cfg.registry.margin, directions[primary])
    tags["ganpipe.alias_decision"] = decision.reason
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    if decision.alias:
        client.set_registered_model_alias(name, decision.alias, version.version)
    aliases = sorted(client.get_model_version(name, version.version).aliases or [])
    card = model_card(name, int(version.version), spec, tags, evaluation, decision, aliases)
    client.update_model_version(name, version.version, description=card)
    grid = save_version_grid(run_dir, int(version.version), model, spec, cfg)
    if version.run_id:
        _log_version_artifacts(client, version, card, decision, grid, evaluation)
    return {"name": name, "version": int(version.version), "aliases": aliases,
            "model_uri": f"models:/{name}/{version.version}", "decision": decision.reason,
            "sample_grid": str(grid) if grid else None}


def _current(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        network.reraise_if_unreachable(exc)
        return None


PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")  # the registered model's code (models from code)


def write_code_package(folder: Path) -> Path:
    """The code a registered generator ships with, in `folder`: the package `ganpipe_generator`
    holding ganpipe's networks. Returns the package's path (MLflow's code_paths entry)."""
    package = folder / "ganpipe_generator"
    package.mkdir()
    (package / "__init__.py").write_text('"""ganpipe\'s networks, shipped with a registered generator."""\n')
    # The networks package as `ganpipe_generator.networks`: the import path of versions registered
    # when the networks were one file (networks.py), so a process holding both kinds of version
    # (Python imports `ganpipe_generator` once) still finds what each one's mlflow_model.py imports.
    (package / "networks").mkdir()
    for source in sorted(Path(networks.__file__).parent.glob("*.py")):
        shutil.copyfile(source, package / "networks" / source.name)
    return package


def _log_and_register(run_dir: Path, name: str, spec: NetworkSpec, info: dict[str, Any], cfg: Any,
                      generator_dir: Path, weights_sha: str, spec_sha: str) -> Any:
    """Log the pyfunc into the run's MLflow run (a new run when this store does not know it) and
    register it, tagged with its files' sha256s from the start so a retry finds it."""
    with tempfile.TemporaryDirectory() as tmp:
        package = write_code_package(Path(tmp))
        experiment = tracking.experiment_id(cfg.registry.name)
        with mlflow.start_run(run_id=tracking.known_run(info.get("mlflow_run_id")), experiment_id=experiment,
                              run_name=run_dir.name):
            logged = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(PYFUNC_CODE),
                artifacts={"weights": str(generator_dir / "generator.safetensors"),
                           "spec": str(generator_dir / "spec.json")},
                code_paths=[str(package)], signature=_signature(spec), input_example=_input_example(spec),
                pip_requirements=_pip_requirements(spec))
    return mlflow.register_model(logged.model_uri, name, tags={SHA_TAG: weights_sha, SPEC_SHA_TAG: spec_sha})


def save_version_grid(run_dir: Path, version: int, model: torch.nn.Module, spec: NetworkSpec, cfg: Any
                      ) -> Path | None:
    """64 samples of an image generator (seeds 0-63, labels cycling through the classes) as
    `registry/vN/samples.png` in the run directory: logged with the version, and kept where the
    pipeline's Prefect summary finds it. A super-resolution generator's grid is rows of (bicubic,
    super-resolved, original) crops of held-out images, as its training previews. None for
    vector data."""
    if not spec.is_image:
        return None
    grid = run_dir / "registry" / f"v{version}" / "samples.png"
    if spec.image_to_image:
        data = open_prepared(runs.read_info(run_dir)["data"]["location"], cfg.storage.endpoint_url)
        held_out = holdout_split(data.num_records, cfg.data.effective_holdout_fraction)[1]
        save_grid(comparison_rows(model, spec, data, held_out[:8], cfg.data.degradation), grid)
        return grid
    labels = [i % spec.num_classes for i in range(64)] if spec.conditional else None
    save_grid(generate(model, spec, list(range(64)), labels), grid)
    return grid


def _log_version_artifacts(client: Any, version: Any, card: str, decision: Decision, grid: Path | None,
                           evaluation: dict[str, Any]) -> None:
    """The model card, a sample grid and the promotion decision, under registry/vN/ in the run;
    with an uplift measurement, its per-ratio table (uplift.json) and accuracy-versus-ratio plot
    (uplift.png) too."""
    folder = f"registry/v{version.version}"
    client.log_text(version.run_id, card, f"{folder}/model_card.md")
    client.log_dict(version.run_id, {"version": int(version.version), "alias": decision.alias,
                                     "reason": decision.reason}, f"{folder}/promotion.json")
    if grid is not None:
        client.log_artifact(version.run_id, str(grid), folder)
    uplift = (evaluation.get("metrics") or {}).get("uplift")
    if _valid(uplift):
        client.log_dict(version.run_id, uplift, f"{folder}/uplift.json")
        with tempfile.TemporaryDirectory() as tmp:
            plot = Path(tmp) / "uplift.png"
            save_uplift_plot(uplift["ratios"], uplift["real_only"], plot)
            client.log_artifact(version.run_id, str(plot), folder)


def uplift_section(evaluation: dict[str, Any]) -> str:
    """The model card's per-ratio table of an uplift measurement ('' without one)."""
    uplift = (evaluation.get("metrics") or {}).get("uplift")
    if not _valid(uplift):
        return ""
    real = uplift["real_only"]
    rows = [f"| real only | {real['mean']:.4f} ± {real['std_error']:.4f} | |"]
    rows += [f"| {row['ratio']:g} | {row['accuracy_mean']:.4f} ± {row['accuracy_std_error']:.4f} | "
             f"{row['uplift']:+.4f} ± {row['uplift_std_error']:.4f} |" for row in uplift["ratios"]]
    holdout = uplift["holdout"]
    return (f"\n\n### Augmentation value\nA {uplift['classifier']} classifier on {uplift['num_real']} real rows, "
            f"plus synthetic rows at each ratio, scored on {holdout['num_rows']} held-out real rows "
            f"({holdout['rule']}; seed {holdout['seed']}), {uplift['repeats']} repeats. Best ratio: "
            f"{uplift['best_ratio']:g}. Note: {holdout['caveat']}.\n\n"
            "| synthetic per real | accuracy | uplift |\n|---|---|---|\n" + "\n".join(rows))


def model_card(name: str, version: int, spec: NetworkSpec, tags: dict[str, str], evaluation: dict[str, Any],
               decision: Decision, aliases: list[str]) -> str:
    rows = []
    for metric, result in (evaluation.get("metrics") or {}).items():
        if isinstance(result, dict) and result.get("value") is not None:
            rows.append(f"| {metric} | {result['value']:.4g} | {result.get('uncertainty') or 0:.3g} |")
    table = "\n".join(["| metric | value | uncertainty |", "|---|---|---|", *rows]) if rows \
        else f"_not evaluated ({tags['ganpipe.evaluation_status']})_"
    table += uplift_section(evaluation)
    kind = (f"{spec.sample_shape[1]}x{spec.sample_shape[2]} images, {spec.sample_shape[0]} channel(s)"
            if spec.is_image else f"vectors with columns {', '.join(spec.columns)}")
    conditional = f"conditional on {spec.num_classes} classes ({', '.join(spec.classes)})" \
        if spec.conditional else "unconditional"
    example_label = ', "label": [0, 1]' if spec.conditional else ""
    use = f'samples = model.predict(pd.DataFrame({{"seed": [0, 1]{example_label}}}))'
    if spec.image_to_image:
        kind = f"x{spec.scale} super-resolution ({spec.sample_shape[0]}-channel images of any size)"
        use = ('images = model.predict(pd.DataFrame({"image": [open("photo.png", "rb").read()]}))'
               f"  # one uint8 array, {spec.scale}x the height and width")
    return f"""# {name} v{version}

A {spec.family.upper()} generator of {kind}, {conditional}, trained by ganpipe.

- data fingerprint: `{tags['ganpipe.data_fingerprint']}`
- config hash: `{tags['ganpipe.config_hash']}` (generator: the {tags['ganpipe.generator_checkpoint']} EMA, step {tags['ganpipe.train_steps']})
- git commit: `{tags['ganpipe.git_commit']}`, Prefect flow run: `{tags['ganpipe.flow_run_id']}`
- weights sha256: `{tags[SHA_TAG]}`, spec sha256: `{tags.get(SPEC_SHA_TAG, 'not recorded')}`
- aliases: {', '.join(aliases) or 'none'} ({decision.reason})

## Evaluation
{table}

## Use
```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}/{version}")
{use}
```
"""

"""Registration in the embedded MLflow store: lineage, artifacts, idempotency, the promotion rule,
and loading a registered generator where only mlflow and torch are installed."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ganpipe import networks, registry, storage
from ganpipe.generators import load_generator
from ganpipe.networks import generate
from ganpipe.registry import CHALLENGER, CHAMPION, decide_alias, register_run
from tests.conftest import last_json, run_cli

# --- helpers shared by the registry tests ----------------------------------------------------------


def copy_run(run_dir: Path, dest: Path, perturb: int | None = None, fd: float | None = None,
             uncertainty: float = 0.5, status: str = "ok", config: dict[str, Any] | None = None,
             reference: str | None = None) -> Path:
    """A copy of a trained run's identity and generator (the fixtures are shared and read-only).
    `perturb` adds seeded noise to the weights: another generator, as a later run would produce.
    `fd` (or a `status` other than ok) writes evaluation.json (fd_domain = fd ± uncertainty)
    describing exactly these weights; without either the run has no evaluation.
    `config` overrides keys of config.yaml, e.g. {"register": {"margin": 1.0}}. `reference` is the
    fingerprint of the real data the evaluation measured against (default: not recorded)."""
    dest.mkdir(parents=True)
    for name in ("run.json", "config.yaml"):
        shutil.copyfile(run_dir / name, dest / name)
    shutil.copytree(run_dir / "generator", dest / "generator")
    weights_file = dest / "generator" / "generator.safetensors"
    if perturb is not None:
        g = torch.Generator().manual_seed(perturb)
        weights = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in load_file(str(weights_file)).items()}
        save_file(weights, str(weights_file))
    if config:
        raw = yaml.safe_load((dest / "config.yaml").read_text())
        for section, values in config.items():
            raw[section].update(values)
        (dest / "config.yaml").write_text(yaml.safe_dump(raw))
    if fd is not None or status != "ok":
        write_evaluation(dest, fd, uncertainty, status, reference)
    return dest


def write_evaluation(run_dir: Path, fd: float | None, uncertainty: float = 0.5, status: str = "ok",
                     reference: str | None = None) -> None:
    result = {"value": fd, "uncertainty": uncertainty} if fd is not None else {"value": None, "error": "boom"}
    evaluation = {"status": status, "metrics": {"fd_domain": result}, "failed": [] if fd is not None else ["fd_domain"],
                  "num_samples": 200, "reference_fingerprint": reference,
                  "generator_sha256": storage.sha256_file(run_dir / "generator" / "generator.safetensors")}
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))


def mlflow_client():
    from mlflow import MlflowClient

    from ganpipe import tracking

    tracking.configure_mlflow()
    return MlflowClient()


def aliases_of(name: str) -> dict[str, int]:
    """alias -> version number, as the registry holds them now."""
    model = mlflow_client().get_registered_model(name)
    return {alias: int(version) for alias, version in (model.aliases or {}).items()}


def test_mlflow_store_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process may see several homes and servers (a worker, this test session): the store is
    whatever GANPIPE_HOME / MLFLOW_TRACKING_URI say now, for runs and registry alike."""
    import mlflow

    from ganpipe import tracking

    def configured() -> tuple[str, str]:
        tracking.configure_mlflow()
        return mlflow.get_tracking_uri(), mlflow.get_registry_uri()

    for home in (tmp_path / "a", tmp_path / "b"):
        monkeypatch.setenv("GANPIPE_HOME", str(home))
        assert configured() == (f"sqlite:///{home}/mlflow.db",) * 2
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
        assert not tracking.is_server()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert configured() == ("http://127.0.0.1:9",) * 2 and tracking.is_server()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert configured() == (f"sqlite:///{tmp_path / 'b'}/mlflow.db",) * 2


# --- the promotion rule, pure ----------------------------------------------------------------------


def m(value: float | None, uncertainty: float = 0.0) -> dict[str, Any]:
    return {"value": value, "uncertainty": uncertainty}


@pytest.mark.parametrize("higher_is_better, new, champion, margin, alias", [
    # lower is better (FID-like)
    (False, m(8.0, 0.5), m(10.0, 0.5), 0.0, CHAMPION),      # 2.0 better > hypot(0.5, 0.5) = 0.71
    (False, m(12.0, 0.5), m(10.0, 0.5), 0.0, CHALLENGER),   # worse
    (False, m(9.5, 0.5), m(10.0, 0.5), 0.0, CHALLENGER),    # 0.5 better, within the uncertainty
    (False, m(9.0, 0.01), m(10.0, 0.01), 1.0, CHALLENGER),  # 1.0 better, not more than the margin
    (False, m(8.9, 0.01), m(10.0, 0.01), 1.0, CHAMPION),    # 1.1 better, beyond margin and uncertainty
    (False, m(10.0), m(10.0), 0.0, CHALLENGER),             # a tie is no improvement
    # higher is better (precision-like): the same numbers mean the opposite
    (True, m(8.0, 0.5), m(10.0, 0.5), 0.0, CHALLENGER),
    (True, m(12.0, 0.5), m(10.0, 0.5), 0.0, CHAMPION),
    (True, m(10.5, 0.5), m(10.0, 0.5), 0.0, CHALLENGER),
    (True, m(0.9, 0.0), m(0.5, 0.0), 0.5, CHALLENGER),
    # no valid value for the new version: no alias, whatever the champion
    (False, None, m(10.0), 0.0, None),
    (False, m(None), None, 0.0, None),
    (True, m(math.nan), m(10.0), 0.0, None),
    (False, m(math.inf), m(10.0), 0.0, None),
    # no champion yet, or one without a usable value: the first valid version takes it
    (False, m(50.0, 3.0), None, 0.0, CHAMPION),
    (True, m(0.1), m(None), 0.0, CHAMPION),
    (False, m(50.0), m(math.nan), 0.0, CHAMPION),
])
def test_decide_alias(higher_is_better: bool, new: dict | None, champion: dict | None, margin: float,
                      alias: str | None) -> None:
    decision = decide_alias("fd_domain", new, champion, margin, higher_is_better)
    assert decision.alias == alias, decision.reason
    assert "fd_domain" in decision.reason
    if champion is not None and alias in (CHAMPION, CHALLENGER) and champion.get("value") is not None \
            and math.isfinite(champion["value"]):
        # A comparison states both values and the bar it had to clear.
        assert f"required > {max(math.hypot(new['uncertainty'], champion['uncertainty']), margin):.4g}" \
            in decision.reason


# --- registration ----------------------------------------------------------------------------------


def test_register_records_lineage_and_artifacts_and_is_idempotent(tiny_run: Path, tmp_path: Path,
                                                                  ganpipe_home: Path) -> None:
    run = copy_run(tiny_run, tmp_path / "v1", fd=10.0, uncertainty=0.4)
    flow_run = "5f0c2a9e-0000-4000-8000-000000000001"
    result = run_cli("register", "--run", str(run), "--json", env={"GANPIPE_FLOW_RUN_ID": flow_run})
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert {k: out[k] for k in ("name", "version", "aliases")} == \
        {"name": "tiny-digits", "version": 1, "aliases": ["champion"]}

    client = mlflow_client()
    version = client.get_model_version("tiny-digits", "1")
    tags = version.tags
    info = json.loads((run / "run.json").read_text())
    produced = json.loads((run / "generator" / "info.json").read_text())
    assert tags["ganpipe.data_fingerprint"] == info["data"]["fingerprint"] == produced["data_fingerprint"]
    assert tags["ganpipe.config_hash"] == produced["config_hash"] and len(tags["ganpipe.config_hash"]) == 64
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["ganpipe.git_commit"]), tags["ganpipe.git_commit"]
    assert tags["ganpipe.flow_run_id"] == flow_run
    assert float(tags["ganpipe.metric.fd_domain"]) == 10.0
    assert float(tags["ganpipe.metric.fd_domain.uncertainty"]) == 0.4
    assert tags["ganpipe.evaluation_status"] == "ok" and tags["ganpipe.train_steps"] == "20"
    assert tags["ganpipe.generator_checkpoint"] == "last"
    assert tags[registry.SHA_TAG] == storage.sha256_file(run / "generator" / "generator.safetensors")
    assert tags["ganpipe.run_dir"] == str(run.resolve())
    assert tags["ganpipe.alias_decision"] == out["decision"] == "first version with a fd_domain: champion"

    # Model card, sample grid and the promotion decision, next to the version's run.
    folder = Path(client.download_artifacts(version.run_id, "registry/v1", str(tmp_path / "artifacts")))
    card = (folder / "model_card.md").read_text()
    assert card == version.description
    assert card.startswith("# tiny-digits v1") and info["data"]["fingerprint"] in card
    assert "| fd_domain | 10 | 0.4 |" in card and flow_run in card and "models:/tiny-digits/1" in card
    assert json.loads((folder / "promotion.json").read_text()) == \
        {"version": 1, "alias": "champion", "reason": out["decision"]}
    from PIL import Image

    grid = np.asarray(Image.open(folder / "samples.png"))
    assert grid.shape == (146, 146)  # 64 greyscale samples of 16x16, 8 a row, 2 px apart
    loaded = load_generator(str(run))
    first = generate(loaded.generator, loaded.spec, [0, 9])
    assert (grid[2:18, 2:18] == first[0, :, :, 0].numpy()).all()  # seed 0, top left
    assert (grid[20:36, 20:36] == first[1, :, :, 0].numpy()).all()  # seed 9, row 2 column 2
    # The same grid stays in the run, where the pipeline's Prefect summary embeds it.
    assert out["sample_grid"] == str(run.resolve() / "registry" / "v1" / "samples.png")
    assert Path(out["sample_grid"]).read_bytes() == (folder / "samples.png").read_bytes()

    # The signature and input example travel with the model.
    import mlflow

    model_info = mlflow.models.get_model_info("models:/tiny-digits/1")
    assert model_info.signature.inputs.input_names() == ["seed"]
    assert model_info.signature.outputs.inputs[0].shape == (-1, 16, 16, 1)
    assert model_info.signature.params.params[0].name == "truncation"
    assert model_info.saved_input_example_info is not None

    # Registering the same generator again (a retried task) returns the same version.
    again = register_run(run)
    assert again["version"] == 1 and again["aliases"] == ["champion"]
    assert again["decision"] == "this version is already the champion"
    assert len(client.search_model_versions("name = 'tiny-digits'")) == 1


def test_promotion_by_quality(tiny_run: Path, tmp_path: Path) -> None:
    """A sequence of registrations under one name, each a different generator (lower fd is better)."""
    def register(k: int, **kwargs: Any) -> dict[str, Any]:
        return register_run(copy_run(tiny_run, tmp_path / f"run{k}", perturb=k, **kwargs))

    first = register(1, fd=10.0, uncertainty=0.5)
    assert first["aliases"] == ["champion"]

    better = register(2, fd=5.0, uncertainty=0.5)
    assert (better["version"], better["aliases"]) == (2, ["champion"])
    assert "promoted to champion" in better["decision"]
    assert aliases_of("tiny-digits") == {"champion": 2}

    worse = register(3, fd=8.0, uncertainty=0.5)
    assert worse["aliases"] == ["challenger"] and "challenger" in worse["decision"]
    assert aliases_of("tiny-digits") == {"champion": 2, "challenger": 3}

    # 0.5 better than the champion, but the combined uncertainty is 0.71.
    within = register(4, fd=4.5, uncertainty=0.5)
    assert within["aliases"] == ["challenger"]
    assert "improvement 0.5, required > 0.7071" in within["decision"]

    # 1.0 better and beyond the uncertainty (0.5), but not beyond the configured margin.
    margin = register(5, fd=4.0, uncertainty=0.01, config={"register": {"margin": 1.0}})
    assert margin["aliases"] == ["challenger"] and "margin 1" in margin["decision"]

    failed = register(6, fd=None, status="failed")
    assert failed["aliases"] == [] and "evaluation failed" in failed["decision"]
    missing = register(7)
    assert missing["aliases"] == [] and "no evaluation.json" in missing["decision"]
    # Evaluated, then the weights changed (training extended) without a new evaluation.
    stale = copy_run(tiny_run, tmp_path / "run8", perturb=8, fd=0.1)
    save_file({k: v * 0.5 for k, v in load_file(str(stale / "generator" / "generator.safetensors")).items()},
              str(stale / "generator" / "generator.safetensors"))
    stale_result = register_run(stale)
    assert stale_result["aliases"] == [] and "computed for other weights" in stale_result["decision"]
    assert mlflow_client().get_model_version("tiny-digits", "8").tags["ganpipe.evaluation_status"] == "stale"

    # After all that, the champion is still version 2, and every decision was recorded with its reason.
    assert aliases_of("tiny-digits") == {"champion": 2, "challenger": 5}
    client = mlflow_client()
    for result in (first, better, worse, within, margin, failed, missing, stale_result):
        tags = client.get_model_version("tiny-digits", str(result["version"])).tags
        assert tags["ganpipe.alias_decision"] == result["decision"]
    assert len(client.search_model_versions("name = 'tiny-digits'")) == 8

    # A failed evaluation that is fixed later: registering the run again applies the rule.
    write_evaluation(tmp_path / "run6", 1.0, 0.1)
    fixed = register_run(tmp_path / "run6")
    assert fixed["version"] == 6 and fixed["aliases"] == ["champion"]
    assert aliases_of("tiny-digits")["champion"] == 6

    # Measured against other data (`ganpipe evaluate --real OTHER --fake RUN`): however low, not comparable.
    other = register_run(copy_run(tiny_run, tmp_path / "run9", perturb=9, fd=0.01, reference="other-data"))
    assert other["aliases"] == ["challenger"] and "not comparable" in other["decision"]
    assert aliases_of("tiny-digits") == {"champion": 6, "challenger": 9}
    # The same reference as the champion's (its training data) compares as usual.
    fingerprint = json.loads((tiny_run / "run.json").read_text())["data"]["fingerprint"]
    same = register_run(copy_run(tiny_run, tmp_path / "run10", perturb=10, fd=0.01, uncertainty=0.01,
                                 reference=fingerprint))
    assert same["aliases"] == ["champion"], same["decision"]


def test_register_rejects_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    result = run_cli("register", "--run", str(tmp_path), "--json")
    assert result.returncode == 2 and "not a ganpipe run directory" in result.stderr
    run = copy_run(tiny_run, tmp_path / "run", config={"register": {"primary_metric": "fid_typo"}})
    from ganpipe.errors import UserError

    with pytest.raises(UserError, match="register.primary_metric 'fid_typo' is not a metric"):
        register_run(run)
    with pytest.raises(UserError, match="--name"):
        register_run(run, name="bad/name")
    with pytest.raises(UserError, match="not found in the registry"):
        load_generator("models:/no-such-model@champion")


# --- loading where ganpipe is not installed ---------------------------------------------------------

# The start of a script for a fresh interpreter, where importing ganpipe fails outright.
WITHOUT_GANPIPE = r"""
import importlib.abc, json, sys

class NoGanpipe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ganpipe" or name.startswith("ganpipe."):
            raise ImportError(f"{name} imported while loading a registered model")
        return None

sys.meta_path.insert(0, NoGanpipe())
import mlflow, numpy as np, pandas as pd, torch
"""


def run_without_ganpipe(script: str, *args: str, cwd: Path, drop_env: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run WITHOUT_GANPIPE + script in a fresh interpreter (not on this checkout's path); its last
    stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and k not in drop_env}
    check = subprocess.run([sys.executable, "-c", WITHOUT_GANPIPE + script, *args], capture_output=True,
                           text=True, cwd=cwd, env=env, timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]
    return json.loads(check.stdout.strip().splitlines()[-1])


FRESH_PROCESS = r"""

mlflow.set_tracking_uri(sys.argv[1])
plain = mlflow.pyfunc.load_model("models:/tiny-digits@champion")
cond = mlflow.pyfunc.load_model("models:/tiny-digits-cgan@champion")
out = {
    "plain": plain.predict(pd.DataFrame({"seed": [5, 6, 2**40 + 7]})),
    "plain_again": plain.predict(pd.DataFrame({"seed": [2**40 + 7, 5]})),
    "truncated": plain.predict(pd.DataFrame({"seed": [5, 6]}), params={"truncation": 0.5}),
    "cond": cond.predict(pd.DataFrame({"seed": [5, 5, 6], "label": [0, 3, 9]})),
    "empty": plain.predict(pd.DataFrame({"seed": pd.Series([], dtype="int64")})),
}
errors = {}
for case, frame in {"label_out_of_range": pd.DataFrame({"seed": [1], "label": [10]}),
                    "label_missing": pd.DataFrame({"seed": [1]})}.items():
    try:
        cond.predict(frame)
        errors[case] = None
    except Exception as exc:
        errors[case] = str(exc)
np.savez(sys.argv[2], **out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ganpipe", "ganpipe_generator"))
print(json.dumps({"modules": loaded, "errors": errors}))
"""


@pytest.mark.slow
def test_load_by_alias_in_a_fresh_process(tiny_run: Path, tiny_conditional_run: Path, tmp_path: Path,
                                          ganpipe_home: Path) -> None:
    register_run(copy_run(tiny_run, tmp_path / "plain", fd=3.0))
    register_run(copy_run(tiny_conditional_run, tmp_path / "cond", fd=3.0))
    arrays = tmp_path / "out.npz"
    from ganpipe import tracking

    report = run_without_ganpipe(FRESH_PROCESS, tracking.tracking_uri(), str(arrays), cwd=tmp_path)
    shipped = [f"ganpipe_generator.networks.{p.stem}" for p in Path(networks.__file__).parent.glob("*.py")
               if p.stem not in ("__init__", "upscale")]  # upscale: what super-resolution models load, these are not
    assert report["modules"] == sorted(["ganpipe_generator", "ganpipe_generator.networks", *shipped])
    assert "outside 0..9" in report["errors"]["label_out_of_range"]
    assert report["errors"]["label_missing"] is not None and "label" in report["errors"]["label_missing"]

    out = np.load(arrays)
    plain, cond = load_generator("models:/tiny-digits@champion"), load_generator("models:/tiny-digits-cgan@champion")
    assert out["plain"].dtype == np.uint8 and out["plain"].shape == (3, 16, 16, 1)
    assert out["empty"].dtype == np.uint8 and out["empty"].shape == (0, 16, 16, 1)
    # Same seed, same image, whatever else is in the batch; and exactly what ganpipe generates.
    assert (out["plain_again"][0] == out["plain"][2]).all() and (out["plain_again"][1] == out["plain"][0]).all()
    assert (out["plain"] == generate(plain.generator, plain.spec, [5, 6, 2**40 + 7]).numpy()).all()
    assert (out["truncated"] == generate(plain.generator, plain.spec, [5, 6], truncation=0.5).numpy()).all()
    assert not (out["truncated"] == out["plain"][:2]).all()
    assert (out["cond"] == generate(cond.generator, cond.spec, [5, 5, 6], [0, 3, 9]).numpy()).all()
    assert not (out["cond"][0] == out["cond"][1]).all()  # same seed, other label: another image


SHIPPED_FAMILIES = r"""
import importlib.util, types

sys.path.insert(0, sys.argv[1])  # holds ganpipe_generator/, as a registered model's code path does
source = importlib.util.spec_from_file_location("registered_model", sys.argv[2])
code = importlib.util.module_from_spec(source)
source.loader.exec_module(code)
out = {}
for folder in sys.argv[3:]:
    model = code.GeneratorModel()
    model.load_context(types.SimpleNamespace(artifacts={"spec": f"{folder}/spec.json",
                                                        "weights": f"{folder}/generator.safetensors"}))
    out[folder] = model.predict(None, pd.DataFrame({"seed": [1, 2, 3], "label": [0, 2, 1]})).tolist()
print(json.dumps(out))
"""


def test_new_families_load_through_the_shipped_networks_package(tmp_path: Path) -> None:
    """A registered model's code (mlflow_model.py and the networks package as ganpipe_generator.networks,
    copied as registration copies them) rebuilds every convolutional family from spec.json alone,
    where ganpipe is not installed, and samples exactly what ganpipe samples."""
    package = tmp_path / "code" / "ganpipe_generator"
    (package / "networks").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for source in Path(networks.__file__).parent.glob("*.py"):
        shutil.copyfile(source, package / "networks" / source.name)
    expected, folders = {}, []
    for family in ("dcgan", "resnet", "r3gan"):
        torch.manual_seed(0)
        spec = networks.NetworkSpec(family, (3, 32, 32), latent_dim=8, num_classes=3, g_width=4, d_width=4,
                                    attention_resolution=16 if family == "resnet" else 0)
        generator = networks.build_generator(spec)
        with torch.no_grad():  # away from the initialisation (zero branches, unit CBN gains)
            for p in generator.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folder = tmp_path / family
        folder.mkdir()
        (folder / "spec.json").write_text(json.dumps(spec.to_json()))
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(folder / "generator.safetensors"))
        expected[str(folder)] = generate(generator.eval(), spec, [1, 2, 3], [0, 2, 1]).numpy()
        folders.append(str(folder))
    out = run_without_ganpipe(SHIPPED_FAMILIES, str(tmp_path / "code"), str(Path(registry.__file__).with_name(
        "mlflow_model.py")), *folders, cwd=tmp_path)
    for folder in folders:
        images = np.asarray(out[folder], dtype=np.uint8)
        assert images.shape == (3, 32, 32, 3) and (images == expected[folder]).all(), folder

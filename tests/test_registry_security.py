"""Nothing ganpipe loads is unpickled, and a registered model runs no code but ganpipe's own.

Each test puts a live malicious pickle (proved live first) where a checkpoint, a generator or a
registered model's weights belong, and checks it is refused without running."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from ganpipe import checkpoint, cli, registry, storage
from ganpipe.errors import UserError
from ganpipe.generators import load_generator
from ganpipe.registry import register_run
from tests.conftest import error_lines
from tests.test_registry import copy_run, mlflow_client

GANPIPE = Path(registry.__file__).parent


class Payload:
    """Unpickling this runs a shell command, as a crafted state.pt or weights file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Write the payload at `path` in torch.save's format, after proving that loading it the
    unsafe way really runs it."""
    torch.save(Payload(marker), path)
    torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # bytes: no help from the file name
    assert marker.exists(), "the payload must be live for this test to mean anything"
    marker.unlink()


def test_checkpoint_refuses_pickles(tiny_run: Path, tmp_path: Path) -> None:
    saved = checkpoint.latest_checkpoint(tiny_run)
    assert saved is not None
    copy = tmp_path / "checkpoints" / saved.name
    shutil.copytree(saved, copy)
    networks, state = checkpoint.load_checkpoint(copy)  # intact, it loads
    assert set(networks) == {"G", "D", "G_ema"} and state

    marker = tmp_path / "ran-state"
    plant(copy / "state.pt", marker)
    with pytest.raises(UserError, match=f"^{re.escape(str(copy / 'state.pt'))}: not a weights-only checkpoint .*GLOBAL posix.system"):
        checkpoint.load_checkpoint(copy)
    assert not marker.exists()

    shutil.copyfile(saved / "state.pt", copy / "state.pt")
    marker = tmp_path / "ran-weights"
    plant(copy / "G_ema.safetensors", marker)
    with pytest.raises(UserError, match=f"^{re.escape(str(copy / 'G_ema.safetensors'))}: not a safetensors file"):
        checkpoint.load_checkpoint(copy)
    assert not marker.exists()


def test_run_directory_refuses_pickled_generator(tiny_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run = copy_run(tiny_run, tmp_path / "run", fd=1.0)
    weights = run / "generator" / "generator.safetensors"
    marker = tmp_path / "ran"
    plant(weights, marker)

    with pytest.raises(UserError, match="not a safetensors file"):
        load_generator(str(run))
    code = cli.run(["generate", "--model", str(run), "--num-images", "2", "--out", str(tmp_path / "x.npy")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and str(weights) in errors[0] and "refusing" in errors[0]
    with pytest.raises(UserError, match="not a safetensors file"):
        register_run(run)
    assert not marker.exists() and not (tmp_path / "x.npy").exists()


def test_registered_model_holds_only_ganpipe_code_and_refuses_tampering(tiny_run: Path, tmp_path: Path,
                                                                      ganpipe_home: Path) -> None:
    import mlflow

    run = copy_run(tiny_run, tmp_path / "run", fd=1.0)
    register_run(run)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/tiny-digits/1", dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    # The only code is ganpipe's: the pyfunc module and the networks package, byte for byte.
    shipped = {f"code/ganpipe_generator/networks/{p.name}": p for p in (GANPIPE / "networks").glob("*.py")}
    assert {f for f in files if f.endswith(".py")} == \
        {"mlflow_model.py", "code/ganpipe_generator/__init__.py", *shipped}
    assert (model_dir / "mlflow_model.py").read_bytes() == (GANPIPE / "mlflow_model.py").read_bytes()
    assert all((model_dir / f).read_bytes() == source.read_bytes() for f, source in shipped.items())
    # Nothing pickled: weights are safetensors, the rest is text; MLflow loads it as code.
    assert {Path(f).suffix for f in files} <= {".py", ".json", ".yaml", ".txt", ".safetensors", ""}
    assert {f for f in files if Path(f).suffix == ""} == {"MLmodel", "registered_model_meta"}
    assert all(isinstance(yaml.safe_load((model_dir / f).read_text()), dict) for f in files
               if Path(f).suffix in ("", ".yaml", ".json"))
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor

    # The stored weights are swapped behind the registry's back: other (valid) weights ...
    stored = next((ganpipe_home / "mlartifacts" / "models").rglob("generator.safetensors"))
    other = copy_run(tiny_run, tmp_path / "other", perturb=1)
    shutil.copyfile(other / "generator" / "generator.safetensors", stored)
    with pytest.raises(UserError, match="not the ones registered"):
        load_generator("models:/tiny-digits@champion")

    # ... or a pickle: refused by ganpipe and by the MLflow model (ganpipe's code reads safetensors).
    marker = tmp_path / "ran"
    plant(stored, marker)
    with pytest.raises(UserError, match="not the ones registered"):
        load_generator("models:/tiny-digits@champion")
    with pytest.raises(SafetensorError):
        mlflow.pyfunc.load_model("models:/tiny-digits/1")
    assert not marker.exists()
    assert mlflow_client().get_model_version("tiny-digits", "1").tags[registry.SHA_TAG] == \
        storage.sha256_file(run / "generator" / "generator.safetensors")

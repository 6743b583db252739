"""The training engine: sampler, EMA, checkpoints, exact resume after SIGKILL, multi-process
training on CPU (gloo), mixed precision, divergence guard, schedules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ganpipe import checkpoint
from ganpipe.config_files import load_config
from ganpipe.errors import UserError
from ganpipe.recipe import BatchSampler
from ganpipe.trainer import Trainer, update_ema
from tests.conftest import GANPIPE, TINY_DIGITS, error_lines, last_json, run_cli, write_config
from tests.fixtures import new_run_dir, train_iterations, trainer_weights
from tests.processes import crash_after_checkpoint

# --- units -------------------------------------------------------------------------------------

def test_sampler_splits_global_batches_across_ranks_and_resumes() -> None:
    world = [BatchSampler(10, 4, seed=3, rank=r, world=2) for r in range(2)]
    seen = []
    for _ in range(5):  # 20 indices: two full passes over 10 records
        parts = [s.next_indices() for s in world]
        assert len(parts[0]) == len(parts[1]) == 2
        assert not set(parts[0]) & set(parts[1])  # ranks see disjoint rows
        seen.extend(np.concatenate(parts).tolist())
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))

    original = BatchSampler(7, 3, seed=1, rank=0, world=1)
    for _ in range(4):
        original.next_indices()
    resumed = BatchSampler(7, 3, seed=1, rank=0, world=1)
    resumed.load_state_dict(original.state_dict())
    for _ in range(5):
        assert np.array_equal(original.next_indices(), resumed.next_indices())


def test_batch_larger_than_dataset_spans_epochs() -> None:
    sampler = BatchSampler(3, 8, seed=0, rank=0, world=1)
    batch = sampler.next_indices()
    assert len(batch) == 8 and set(batch) == {0, 1, 2}


def test_update_ema_is_an_exponential_moving_average() -> None:
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
        model.running_mean.fill_(5.0)
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 0.1))
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers copied, not averaged


def _networks(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"w": torch.full((2,), value)} for name in checkpoint.NETWORKS}


def test_checkpoint_killed_during_save_leaves_latest_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.save_checkpoint(tmp_path, 10, _networks(1.0), {"step": 10}, {}, keep=3)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 20, _networks(2.0), {"step": 20}, {}, keep=3)
    monkeypatch.undo()
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000010"
    networks, state = checkpoint.load_checkpoint(latest)
    assert state["step"] == 10 and torch.equal(networks["G"]["w"], torch.ones(2))
    # A partial directory from a harder kill (no cleanup ran) is never listed, and is removed on resume.
    (checkpoint.checkpoint_root(tmp_path) / ".step-00000030.abc.tmp").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000010"
    checkpoint.remove_partial(tmp_path)
    assert [p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir() if p.is_dir()] == ["step-00000010"]


def test_checkpoints_keep_last_k_and_best(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, _networks(step), {"step": step}, {}, keep=2)
    checkpoint.mark_best(tmp_path, checkpoint.checkpoint_root(tmp_path) / "step-00000002")
    for step in (4, 5):
        checkpoint.save_checkpoint(tmp_path, step, _networks(step), {"step": step}, {}, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000004", "step-00000005"]
    assert (checkpoint.checkpoint_root(tmp_path) / "latest").read_text() == "step-00000005"


def test_best_checkpoint_is_the_lowest_score_and_survives_pruning(tmp_path: Path) -> None:
    for step, score in [(1, 5.0), (2, 3.0), (3, 4.0), (4, float("nan")), (5, 3.5), (6, None)]:
        checkpoint.save_checkpoint(tmp_path, step, _networks(step), {"step": step}, {}, keep=2, score=score)
    assert checkpoint.best_checkpoint(tmp_path).name == "step-00000002"
    assert checkpoint.best_score(tmp_path) == 3.0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000005", "step-00000006"]
    checkpoint.save_checkpoint(tmp_path, 7, _networks(7), {"step": 7}, {}, keep=2, score=1.0)
    assert checkpoint.best_checkpoint(tmp_path).name == "step-00000007"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000006", "step-00000007"]


def test_checkpoint_state_refuses_pickled_objects(tmp_path: Path) -> None:
    """state.pt loads with weights_only=True: a pickle that would run code is refused."""
    checkpoint.save_checkpoint(tmp_path, 1, _networks(1.0), {"step": 1}, {}, keep=1)
    target = checkpoint.latest_checkpoint(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"step": Exploit()}, target / "state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoint.load_checkpoint(target)
    assert not (tmp_path / "pwned").exists()


def test_bad_model_data_combinations_are_user_errors(tmp_path: Path) -> None:
    from ganpipe.data import ingest, open_prepared
    from ganpipe.recipe import network_spec

    cfg = load_config(write_config(tmp_path / "c.yaml", TINY_DIGITS), ["data.label_column=null"])
    data = open_prepared(ingest(cfg.data).location)
    with pytest.raises(UserError, match="data.resolution"):
        network_spec(load_config(tmp_path / "c.yaml", ["data.resolution=24"]),
                     open_prepared(ingest(load_config(tmp_path / "c.yaml", ["data.resolution=24"]).data).location))
    gaussians = load_config(tmp_path / "c.yaml", ["data.source=builtin:gaussians25", "data.kind=vector",
                                                  "data.columns=[x, y]"])
    with pytest.raises(UserError, match="model.family"):
        network_spec(gaussians, open_prepared(ingest(gaussians.data).location))
    with pytest.raises(UserError, match="model.conditional"):
        network_spec(load_config(tmp_path / "c.yaml", ["model.family=mlp", "model.conditional=true",
                                                       "data.source=builtin:gaussians25", "data.kind=vector",
                                                       "data.columns=[x, y]"]),
                     open_prepared(ingest(gaussians.data).location))
    assert network_spec(cfg, data).sample_shape == (1, 16, 16)


# --- whole runs (subprocesses, as users run them) -------------------------------------------------

# Checkpoints are scored (fd_domain picks `best`): scoring must not disturb training's RNG streams.
RESUME_CONFIG = TINY_DIGITS.replace("steps: 20", "steps: 40").replace("best_metric: none", "best_metric: fd_domain")


def run_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    final = checkpoint.latest_checkpoint(run_dir)
    networks, state = checkpoint.load_checkpoint(final)
    out = {f"{net}.{k}": v for net, weights in networks.items() for k, v in weights.items()}
    for name in ("opt_g", "opt_d"):
        for pid, values in state[name]["state"].items():
            out.update({f"{name}.{pid}.{k}": v for k, v in values.items()})
    out.update({f"generator.{k}": v for k, v in load_file(str(run_dir / "generator/generator.safetensors")).items()})
    return out


def straight_then_crashed(config: Path, tmp_path: Path, crash_after_step: int, steps: int
                          ) -> tuple[dict, Path, Path]:
    """Train `config` straight through with GANPIPE_HOME tmp_path/a; with tmp_path/b, start it and
    SIGKILL the launcher and every training process at once after its checkpoint of
    `crash_after_step`, as a machine crash would. Returns (the straight run's result, run b's
    folder, run b's last checkpoint)."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    straight = run_cli("train", str(config), "--json", env={"GANPIPE_HOME": str(home_a)})
    assert straight.returncode == 0, straight.stderr[-2000:]
    result = last_json(straight.stdout)
    assert result["steps"] == steps and result["resumed_from_step"] is None
    run_b = home_b / "runs" / Path(result["run_dir"]).name
    crash_after_checkpoint([*GANPIPE, "train", str(config)], {**os.environ, "GANPIPE_HOME": str(home_b)},
                           run_b / "checkpoints" / f"step-{crash_after_step:08d}")
    killed_at = checkpoint.latest_checkpoint(run_b)
    assert killed_at is not None and crash_after_step <= checkpoint.read_meta(killed_at)["step"] < steps, \
        "the kill came too late to test resume"
    return result, run_b, killed_at


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    config = write_config(tmp_path / "resume.yaml", RESUME_CONFIG)
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    result_a, run_dir, _ = straight_then_crashed(config, tmp_path, crash_after_step=20, steps=40)

    resumed = run_cli("train", str(config), "--resume", "auto", "--json", env={"GANPIPE_HOME": str(home_b)})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result_b = last_json(resumed.stdout)
    assert result_b["resumed_from_step"] >= 20 and result_b["steps"] == 40
    assert result_b["run_dir"] == str(run_dir) and result_b["mlflow_run_id"] == json.loads(
        (run_dir / "run.json").read_text())["mlflow_run_id"]

    a, b = run_tensors(Path(result_a["run_dir"])), run_tensors(run_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise identical after resume: {different[:5]}"
    # `best` is the lowest-scoring checkpoint, the same one with or without the kill.
    scores = {p.name: json.loads((p / "meta.json").read_text())["score"]
              for p in checkpoint.list_checkpoints(Path(result_a["run_dir"]))}
    assert all(np.isfinite(s) for s in scores.values())
    assert Path(result_a["best_checkpoint"]).name == Path(result_b["best_checkpoint"]).name
    assert result_a["best_score"] == pytest.approx(result_b["best_score"], rel=1e-9)
    assert result_a["best_score"] <= min(scores.values())
    assert result_a["generator"] == {"step": 40, "selected": "last", "score": None}

    # train.final_generator: best makes the best checkpoint's EMA the run's generator, on the same
    # run without training again. Point `best` at an older checkpoint so "best" differs from "last".
    run_a = Path(result_a["run_dir"])
    older = checkpoint.list_checkpoints(run_a)[-2]
    checkpoint.mark_best(run_a, older)
    picked = run_cli("train", str(config), "--resume", "auto", "--set", "train.final_generator=best", "--json",
                     env={"GANPIPE_HOME": str(home_a)})
    assert picked.returncode == 0, picked.stderr[-2000:]
    result_c = last_json(picked.stdout)
    assert result_c["run_dir"] == str(run_a) and result_c["steps"] == 40
    assert result_c["generator"]["selected"] == "best"
    assert result_c["generator"]["step"] == checkpoint.read_meta(older)["step"]
    generator = load_file(str(run_a / "generator/generator.safetensors"))
    best_ema = load_file(str(older / "G_ema.safetensors"))
    assert generator.keys() == best_ema.keys() and all(torch.equal(generator[k], best_ema[k]) for k in generator)
    assert any(not torch.equal(generator[k], a[f"G_ema.{k}"]) for k in generator)  # not the last EMA
    info = json.loads((run_a / "generator/info.json").read_text())
    assert info["selected"] == "best" and info["score"] == scores[older.name]

    # Observability: losses, D outputs, grad norms and throughput reached MLflow; sample grids were saved.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home_a}/mlflow.db")
    metrics = mlflow.MlflowClient().get_run(result_a["mlflow_run_id"]).data.metrics
    for key in ("d_loss", "g_loss", "d_real", "d_fake", "d_grad_norm", "g_grad_norm", "images_per_sec"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert sorted(p.name for p in (Path(result_a["run_dir"]) / "samples").iterdir())[-1] == "step-00000040.png"


@pytest.mark.slow
def test_two_processes_on_cpu_stay_in_step_and_save_once(tmp_path: Path) -> None:
    config = write_config(tmp_path / "ddp.yaml", TINY_DIGITS)
    result = run_cli("train", str(config), "--num-processes", "2", "--set", "train.loss=wgan_gp",
                     "--set", "model.conditional=true", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert out["num_processes"] == 2 and out["steps"] == 20
    checksums = out["rank_generator_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # weights and BN buffers equal on both ranks
    run_dir = Path(out["run_dir"])
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000010", "step-00000020"]
    log = (run_dir / "train.log").read_text()
    assert log.count("step 20/20") == 1  # only the main process reports and saves
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())


# Absurd learning rates blow up any objective; the relativistic loss with R1 + R2 on r3gan (no
# normalisation layer to hold activations back) as well as the default non-saturating DCGAN.
DIVERGING = {"dcgan": [], "r3gan-relativistic": ["model.family=r3gan", "train.loss=relativistic",
                                                 "train.r1_gamma=1", "train.r2_gamma=1", "train.reg_every=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("case", DIVERGING)
def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path, case: str) -> None:
    config = write_config(tmp_path / "diverge.yaml", TINY_DIGITS.replace("steps: 20", "steps: 40"))
    result = run_cli("train", str(config), "--set", "train.g_lr=1e12", "--set", "train.d_lr=1e12",
                     "--set", "train.checkpoint_every=1", "--set", "train.log_every=1",
                     *[a for item in DIVERGING[case] for a in ("--set", item)], "--json")
    assert result.returncode == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "training diverged at step" in errors[0], result.stderr[-2000:]
    step = int(errors[0].split("at step ")[1].split(":")[0])
    assert 1 <= step <= 40
    run_dir = next((Path(os.environ["GANPIPE_HOME"]) / "runs").iterdir())
    for kept in checkpoint.list_checkpoints(run_dir):
        assert checkpoint.read_meta(kept)["step"] < step
        networks, _ = checkpoint.load_checkpoint(kept)
        assert all(torch.isfinite(t).all() for weights in networks.values() for t in weights.values())
    assert json.loads((run_dir / "result.json").read_text())["status"] == "diverged"


@pytest.mark.slow
def test_mixed_precision_on_cpu(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bf16.yaml", TINY_DIGITS.replace("steps: 20", "steps: 10"))
    fp16 = run_cli("train", str(config), "--mixed-precision", "fp16")
    assert fp16.returncode == 2 and "fp16 needs a GPU" in fp16.stderr
    bf16 = run_cli("train", str(config), "--mixed-precision", "bf16", "--json")
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    weights = load_file(str(Path(last_json(bf16.stdout)["run_dir"]) / "generator/generator.safetensors"))
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path: Path) -> None:
    """train.compile (torch.compile, inductor on CPU): the same updates as eager up to kernel
    rounding, and checkpoints and the generator keep the plain module's names, so everything that
    loads them (resume, registry, export) works unchanged."""
    config = write_config(tmp_path / "c.yaml", TINY_DIGITS.replace("steps: 20", "steps: 4")
                          .replace("checkpoint_every: 10", "checkpoint_every: 4"))
    results = {}
    for compiled in (False, True):
        out = run_cli("train", str(config), "--set", f"train.compile={str(compiled).lower()}", "--json")
        assert out.returncode == 0, out.stderr[-3000:]
        results[compiled] = Path(last_json(out.stdout)["run_dir"])
    eager, compiled_run = (run_tensors(results[k]) for k in (False, True))
    assert eager.keys() == compiled_run.keys() and not any("_orig_mod" in k for k in compiled_run)
    for key in eager:
        if eager[key].is_floating_point():
            torch.testing.assert_close(compiled_run[key], eager[key], rtol=1e-3, atol=1e-4, msg=key)
    assert run_cli("generate", "--model", str(results[True]), "--num-images", "4",
                   "--out", str(tmp_path / "g.npy")).returncode == 0
    assert np.load(tmp_path / "g.npy").shape == (4, 16, 16, 1)


def _gaussians_config(tmp_path: Path, extra: str = "", steps: int = 30) -> Path:
    return write_config(tmp_path / "g.yaml", f"""
seed: 0
data: {{source: builtin:gaussians25, kind: vector, columns: [x, y]}}
model: {{family: mlp, latent_dim: 4, g_width: 16, d_width: 16, mlp_layers: 2}}
train: {{steps: {steps}, batch_size: 32, log_every: 10, checkpoint_every: 30, sample_every: 30{extra}}}
""")


def _gaussians_trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(_gaussians_config(tmp_path), ["train.cpu=true", *overrides])
    return Trainer(cfg, new_run_dir(cfg))


def test_gradient_accumulation_and_adaptive_schedule(tmp_path: Path) -> None:
    """Accumulating 4 micro-batches gives the same weights as one batch (no batch norm in the MLP);
    the adaptive schedule trains both sides."""
    results = {}
    for accum in (1, 4):
        trainer = _gaussians_trainer(tmp_path, f"train.grad_accum={accum}", f"train.run_name=accum-{accum}")
        train_iterations(trainer, 30)
        results[accum] = trainer_weights(trainer)
        trainer.close()
    assert results[1].keys() == results[4].keys()
    assert all(torch.allclose(results[1][k], results[4][k], atol=1e-4) for k in results[1])
    assert any(not torch.equal(results[1][k], results[4][k]) for k in results[1])  # two computations, one result

    adaptive = _gaussians_trainer(tmp_path, "train.schedule=adaptive", "train.d_steps=1",
                                  "train.adaptive_d_threshold=1.5", "train.adaptive_g_threshold=0.8")
    train_iterations(adaptive, 30)
    assert adaptive.d_updates > 0 and adaptive.g_updates > 0 and adaptive.d_updates + adaptive.g_updates == 30
    adaptive.close()


def test_linear_learning_rate_decay(tmp_path: Path) -> None:
    import mlflow

    config = _gaussians_config(tmp_path, ", lr_decay: linear, lr_decay_start: 0.5, g_lr: 0.001, d_lr: 0.002")
    result = run_cli("train", str(config), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{os.environ['GANPIPE_HOME']}/mlflow.db")
    client = mlflow.MlflowClient()
    run_id = last_json(result.stdout)["mlflow_run_id"]
    g_lr = {m.step: m.value for m in client.get_metric_history(run_id, "g_lr")}
    d_lr = {m.step: m.value for m in client.get_metric_history(run_id, "d_lr")}
    # 30 steps, decay from step 15: full rate at step 10 (set before update 10), then linear to 0.
    assert g_lr[10] == pytest.approx(0.001) and d_lr[10] == pytest.approx(0.002)
    assert g_lr[20] == pytest.approx(0.001 * (1 - 4 / 15)) and g_lr[30] == pytest.approx(0.001 / 15)


def test_k_discriminator_steps_per_generator_step(tmp_path: Path) -> None:
    trainer = _gaussians_trainer(tmp_path, "train.d_steps=3")
    train_iterations(trainer, 10)
    assert (trainer.d_updates, trainer.g_updates) == (30, 10)
    trainer.close()


def test_sample_grid_helper(tmp_path: Path) -> None:
    from PIL import Image

    from ganpipe.previews import save_grid

    save_grid(torch.full((4, 8, 8, 1), 200, dtype=torch.uint8), tmp_path / "g.png")
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2) and grid.max() == 200


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))

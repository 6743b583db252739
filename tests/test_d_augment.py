"""Differentiable augmentation of the discriminator's inputs (`train.augment: diffaug | ada`):
gradients reach the generator through it (and R1 through it), it is a function of the seed, ADA
is the identity at p = 0, applies each transform with probability p, moves p with sign(D(real)),
and a run with it trains, logs p, and resumes bitwise exactly."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from ganpipe import checkpoint
from ganpipe.d_augment import ADA_TRANSFORMS, P_MAX, DiscriminatorAugment, ada_augment, ada_params
from tests.conftest import TINY_DIGITS, error_lines, last_json, run_cli, write_config
from tests.test_training import run_tensors, straight_then_crashed


def single_process_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    return tensor


def images(n: int = 8, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def augmenter(policy: str, seed: int = 0, p: float = 0.0, **kwargs: float) -> DiscriminatorAugment:
    augment = DiscriminatorAugment(policy, seed, **kwargs)
    augment.p = p
    return augment


# --- units -------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["diffaug", "ada"])
def test_gradients_reach_the_generator_and_r1_differentiates_through(policy: str) -> None:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8)))
    discriminator = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(256, 1))
    augment = augmenter(policy, p=0.8)
    fake = generator(torch.randn(16, 4))
    seen = augment(fake)
    assert not torch.equal(seen, fake)  # it did augment
    discriminator(seen).mean().backward()
    for name, param in generator.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name

    # R1 on augmented reals, differentiated w.r.t. the un-augmented reals (double backward).
    real = images(16, size=8).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(augment(real)).sum(), real, create_graph=True)
    discriminator.zero_grad()
    grad.pow(2).sum().backward()
    weight_grad = discriminator[0].weight.grad
    assert weight_grad is not None and torch.isfinite(weight_grad).all() and weight_grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["diffaug", "ada"])
def test_the_same_seed_gives_the_same_augmentation(policy: str) -> None:
    x = images()
    first, again = augmenter(policy, seed=3, p=0.5), augmenter(policy, seed=3, p=0.5)
    for _ in range(2):  # the streams stay in step over successive batches
        assert torch.equal(first(x), again(x))
    assert not torch.equal(augmenter(policy, seed=4, p=0.5)(x), augmenter(policy, seed=3, p=0.5)(x))
    # Each rank has its own stream.
    assert not torch.equal(augmenter(policy, seed=3, p=0.5, rank=1)(x), augmenter(policy, seed=3, p=0.5)(x))


def test_ada_at_p_zero_is_the_identity_and_draws_nothing() -> None:
    x = images()
    augment = augmenter("ada", p=0.0)
    before = augment.generator.get_state()
    assert augment(x) is x and torch.equal(augment.generator.get_state(), before)
    assert torch.equal(ada_augment(x, ada_params(8, 0.0, torch.Generator().manual_seed(1))), x)
    assert augmenter("none")(x) is x


def test_each_transform_applies_with_probability_p_per_sample() -> None:
    n, p = 4000, 0.3
    params = ada_params(n, p, torch.Generator().manual_seed(0))
    tolerance = 4 * (p * (1 - p) / n) ** 0.5
    masks = {name: params[f"applied_{name}"] for name in ADA_TRANSFORMS}
    for name, applied in masks.items():
        assert abs(applied.float().mean().item() - p) < tolerance, name
    both = (masks["xflip"] & masks["cutout"]).float().mean().item()  # drawn independently
    assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / n) ** 0.5

    # On the pixels: no transform -> bitwise unchanged; a zeroed pixel (inputs are in [0.5, 1],
    # nothing else makes an exact 0) exactly where cutout applied.
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    out = ada_augment(x, params)
    untouched = ~torch.stack(list(masks.values())).any(0)
    assert untouched.sum() > 50 and torch.equal(out[untouched], x[untouched])
    assert torch.equal((out == 0).flatten(1).any(1), masks["cutout"])


def test_chosen_transforms_alone_apply_on_the_same_stream() -> None:
    """train.ada_transforms: the left-out transforms never apply; the kept ones apply to exactly
    the samples (and with the parameters) the full set would, since the draws are the same."""
    n, p, kept = 256, 0.5, ("translate", "scale", "brightness", "cutout")
    full = ada_params(n, p, torch.Generator().manual_seed(0))
    chosen = ada_params(n, p, torch.Generator().manual_seed(0), kept)
    for name in ADA_TRANSFORMS:
        if name in kept:
            assert torch.equal(chosen[f"applied_{name}"], full[f"applied_{name}"]) and full[f"applied_{name}"].any()
        else:
            assert not chosen[f"applied_{name}"].any(), name
    assert torch.equal(chosen["xflip"], torch.zeros(n)) and torch.equal(chosen["rotate90"], torch.zeros(n))
    assert torch.equal(chosen["scale"], full["scale"]) and torch.equal(chosen["translate_x"], full["translate_x"])
    x = images(n, channels=1)
    without_geometry = augmenter("ada", p=0.9, transforms=("brightness", "contrast"))
    out = without_geometry(x)  # only a per-sample affine map of the values: no pixel moves
    flat_in, flat_out = x.flatten(1), out.flatten(1)
    slope = (flat_out[:, 1] - flat_out[:, 0]) / (flat_in[:, 1] - flat_in[:, 0])
    assert torch.allclose(flat_out, flat_in * slope[:, None] + (flat_out[:, :1] - flat_in[:, :1] * slope[:, None]),
                          atol=1e-5)
    with pytest.raises(ValueError, match="unknown ADA transform"):
        DiscriminatorAugment("ada", 0, transforms=("shear",))


def test_p_rises_when_d_is_confident_on_reals_and_falls_when_not() -> None:
    # batch 32, every 4 updates, kimg 0.64: steps of 32 * 4 / 640 = 0.2.
    augment = augmenter("ada", batch_size=32, interval=4, kimg=0.64)
    history = []
    for update in range(1, 13):  # a D that overfits: large positive logits on every real image
        augment.observe(torch.full((32, 1), 8.0))
        augment.after_d_update(update, 0.6, single_process_reduce)
        history.append(augment.p)
    assert history == pytest.approx([0, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 0.4, 0.6])
    assert augment.stats(torch.device("cpu"))["ada_p"].item() == pytest.approx(0.6)
    for update in range(13, 25):  # near-zero logits of either sign: r_t ~ 0 < target
        augment.observe(torch.randn(32, generator=torch.Generator().manual_seed(update)) * 1e-3)
        augment.after_d_update(update, 0.6, single_process_reduce)
    assert augment.p == pytest.approx(0.0)
    augment.observe(-torch.ones(32))
    augment.after_d_update(28, 0.6, single_process_reduce)
    assert augment.p == 0.0  # clamped at 0
    for update in range(1, 41):
        augment.observe(torch.ones(32))
        augment.after_d_update(update * 4, 0.6, single_process_reduce)
    assert augment.p == P_MAX < 1  # never 1: augmentations would leak


def test_r_t_counts_every_rank() -> None:
    """This rank's D is confident, the other's is not: summed, r_t = 0 < target and p falls,
    where this rank alone would have raised it."""
    this, other, alone = (augmenter("ada", rank=rank, p=0.5, interval=1, batch_size=10, kimg=0.1) for rank in (0, 1, 0))
    for augment, sign in ((this, 1.0), (other, -1.0), (alone, 1.0)):
        augment.observe(torch.full((16,), sign))
    this.after_d_update(1, 0.6, lambda tensor, op: tensor + other.signs)
    alone.after_d_update(1, 0.6, single_process_reduce)
    assert this.p == pytest.approx(0.4) and alone.p == pytest.approx(0.6)
    assert this.signs.tolist() == [0.0, 0.0]  # a new interval starts


def test_augmentation_state_round_trips() -> None:
    x = images()
    original = augmenter("ada", seed=5, p=0.5, interval=4, kimg=0.01)
    original(x)
    original.observe(torch.ones(8))
    state = original.state_dict(lambda tensor: tensor, single_process_reduce)
    restored = augmenter("ada", seed=5)
    restored.load_state_dict(state, rank=0, world=1, step=3)
    assert restored.p == 0.5 and torch.equal(restored.signs, original.signs)
    assert torch.equal(restored(x), original(x))


# --- training runs -------------------------------------------------------------------------------

AUG_DIGITS = (TINY_DIGITS.replace("steps: 20", "steps: 12").replace("checkpoint_every: 10", "checkpoint_every: 6")
              .replace("sample_every: 10", "sample_every: 6").replace("log_every: 10", "log_every: 2"))
# Small kimg and target so p moves within a few updates of a 12-step run.
ADA = ["--set", "train.augment=ada", "--set", "train.ada_kimg=0.5", "--set", "train.ada_target=0.2"]


def metric_history(home: Path, run_id: str, key: str) -> list[float]:
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_diffaug_run_with_r1_trains(tmp_path: Path, ganpipe_home: Path) -> None:
    config = write_config(tmp_path / "aug.yaml", AUG_DIGITS)
    result = run_cli("train", str(config), "--set", "train.augment=diffaug", "--set", "train.r1_gamma=1",
                     "--set", "model.conditional=true", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    out = last_json(result.stdout)
    assert out["steps"] == 12
    assert metric_history(ganpipe_home, out["mlflow_run_id"], "ada_p") == []
    assert metric_history(ganpipe_home, out["mlflow_run_id"], "r1_penalty")


# The R3GAN recipe with ADA: every piece of state a resume must restore at once (ADA's p, its
# interval statistics and RNG; lazy R1/R2 mid-period; the gamma and beta2 schedules; the EMA).
R3GAN_ADA = """
seed: 0
data: {source: builtin:digits, resolution: 16}
model: {family: r3gan, conditional: true, latent_dim: 16, g_width: 8, d_width: 8, r3gan_blocks: 1}
train:
  steps: 40
  batch_size: 16
  loss: relativistic
  r1_gamma: 1.0
  r2_gamma: 0.5
  reg_every: 3
  gamma_decay: linear
  betas: [0.0, 0.9]
  beta2_final: 0.99
  augment: ada
  ada_kimg: 0.5
  ada_target: 0.2
  ada_interval: 3             # the step-10 and step-20 checkpoints fall inside an interval
  checkpoint_every: 10
  sample_every: 1000
  log_every: 2
  best_metric: none
register: {name: r3gan-ada}
"""


@pytest.mark.slow
def test_r3gan_with_ada_resumes_bitwise_after_sigkill(tmp_path: Path) -> None:
    """40 steps straight, against a run SIGKILLed (launcher and workers at once) after its step-10
    checkpoint and continued with `--resume auto`: the final weights, optimiser state, EMA and
    augmentation state are bitwise identical (one CPU process). The resume point falls inside an
    ADA interval with p > 0, so p, the interval's sign statistics and the augmentation's RNG all
    have to come back from the checkpoint. p is logged to MLflow as it moves."""
    config = write_config(tmp_path / "r3gan-ada.yaml", R3GAN_ADA)
    home_b = tmp_path / "b"
    result_a, run_b, killed_at = straight_then_crashed(config, tmp_path, crash_after_step=10, steps=40)
    resume_step = checkpoint.read_meta(killed_at)["step"]
    assert not (run_b / "generator").exists()  # it did not finish
    _, state = checkpoint.load_checkpoint(killed_at)
    assert state["augment"]["p"] > 0  # ADA's state is live at the resume point
    assert state["d_updates"] % 3 != 0 and state["augment"]["signs"][1] > 0  # mid-interval

    resumed = run_cli("train", str(config), "--resume", "auto", "--json", env={"GANPIPE_HOME": str(home_b)})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result_b = last_json(resumed.stdout)
    assert result_b["resumed_from_step"] == resume_step and result_b["steps"] == 40
    assert result_b["run_dir"] == str(run_b)

    a, b = run_tensors(Path(result_a["run_dir"])), run_tensors(run_b)
    assert a.keys() == b.keys() and any(k.startswith("generator.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise identical after resume: {different[:5]}"
    states = [checkpoint.load_checkpoint(checkpoint.latest_checkpoint(Path(r["run_dir"])))[1]["augment"]
              for r in (result_a, result_b)]
    assert states[0]["p"] == states[1]["p"] > 0
    history = metric_history(tmp_path / "a", result_a["mlflow_run_id"], "ada_p")
    assert len(history) == 20 and history[0] == 0.0 and history[-1] == pytest.approx(states[0]["p"])  # it rose
    assert torch.equal(states[0]["rng"], states[1]["rng"]) and torch.equal(states[0]["signs"], states[1]["signs"])


def test_augmentation_on_vector_data_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "g.yaml", """
seed: 0
data: {source: builtin:gaussians25, kind: vector, columns: [x, y]}
model: {family: mlp, latent_dim: 4, g_width: 16, d_width: 16, mlp_layers: 2}
train: {steps: 2, batch_size: 32, augment: ada}
""")
    result = run_cli("train", str(config))
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "train.augment" in lines[0] and "vector" in lines[0], result.stderr[-2000:]

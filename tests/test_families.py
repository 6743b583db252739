"""The residual families: resnet (SNGAN/BigGAN-style) and r3gan (R3GAN's normalisation-free
residual networks). Shapes at 32, 64 and 128 px, conditioning, what each recipe promises
(spectral norm everywhere in resnet's D, no normalisation in r3gan, blocks that start as the
identity), gradients, the spec and its checks, and a few real training steps through the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ganpipe.config import Config
from ganpipe.config_files import load_config
from ganpipe.errors import UserError
from ganpipe.generators import load_generator
from ganpipe.networks import FAMILIES, NetworkSpec, build_discriminator, build_generator, check_spec, generate
from ganpipe.networks.r3gan import ResidualBlock, low_pass_downsample
from ganpipe.networks.resnet import SelfAttention
from ganpipe.trainer import Trainer
from tests.conftest import ROOT, error_lines, last_json, run_cli, write_config
from tests.fixtures import new_run_dir

NEW_FAMILIES = ["resnet", "r3gan"]


def tiny(family: str, resolution: int = 32, num_classes: int = 0, channels: int = 1, **extra: int) -> NetworkSpec:
    """A spec the size the tests can afford: widths 8, latent 16."""
    return NetworkSpec(family, (channels, resolution, resolution), latent_dim=16, num_classes=num_classes,
                       **{"g_width": 8, "d_width": 8, **extra})


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- networks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_families_build_at_every_size(family: str, resolution: int, conditional: bool) -> None:
    torch.manual_seed(0)
    spec = tiny(family, resolution, num_classes=10 if conditional else 0, channels=3)
    G, D = build_generator(spec), build_discriminator(spec)
    labels = torch.tensor([0, 9]) if conditional else None
    images = G(torch.randn(2, 16), labels)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.abs().max() <= 1.0 and images.std() > 0.01  # tanh: the data's [-1, 1], and not constant
    scores = D(images, labels)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in (*G.modules(), *D.modules()))


def test_parameter_counts_are_sane() -> None:
    """Default widths (64): SNGAN-sized at 32 px (SNGAN's CIFAR-10 G has 4.3M parameters), larger
    with each doubling of the size; tiny widths stay tiny."""
    counts = {}
    for family in NEW_FAMILIES:
        for resolution in (32, 64):
            spec = NetworkSpec(family, (3, resolution, resolution), latent_dim=100, num_classes=10)
            counts[family, resolution] = (parameters(build_generator(spec)), parameters(build_discriminator(spec)))
    for family in NEW_FAMILIES:
        (g32, d32), (g64, d64) = counts[family, 32], counts[family, 64]
        assert 2e6 < g32 < 6e6 and 1.5e6 < d32 < 6e6, (family, counts[family, 32])
        assert 2.5 < g64 / g32 < 5 and 2.5 < d64 / d32 < 5, (family, counts[family, 64])
        assert parameters(build_generator(tiny(family))) < 2e5


def test_resnet_discriminator_is_spectrally_normalised_everywhere() -> None:
    spec = tiny("resnet", num_classes=10, attention_resolution=16)
    D, G = build_discriminator(spec), build_generator(spec)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) >= 14  # 4 blocks (2 or 3 convs each), attention (4), logit, projection
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert "to_logit.parametrizations.weight.original" in D.state_dict()
    # G: batch norm, class-conditional in every block; no spectral norm (SNGAN's generator).
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 7  # 2 per block x 3, plus the output's
    assert all(m.gain.num_embeddings == 10 for m in G.modules() if type(m).__name__ == "ConditionalBatchNorm2d")
    assert not any(parametrize.is_parametrized(m) for m in G.modules())
    for _ in range(10):  # power iterations converge during training-mode forwards
        D(torch.randn(4, 1, 32, 32), torch.arange(4))
    for module in D.modules():
        if isinstance(module, nn.Linear):
            assert torch.linalg.matrix_norm(module.weight, ord=2) <= 1.05


def test_resnet_self_attention_sits_where_asked_and_starts_as_the_identity() -> None:
    torch.manual_seed(0)
    G, D = (build(tiny("resnet", attention_resolution=16)) for build in (build_generator, build_discriminator))
    assert isinstance(G.attention, SelfAttention) and isinstance(D.attention, SelfAttention)
    assert G.attention_after == 1 and D.attention_after == 0  # G's 2nd block outputs 16x16; D's 1st
    x = torch.randn(2, G.attention.query.in_channels, 16, 16)
    assert torch.equal(G.attention(x), x)  # gamma = 0
    with torch.no_grad():
        G.attention.gamma.fill_(1.0)
    assert not torch.allclose(G.attention(x), x)
    # At the image's own size only G has a feature map: D has no attention there.
    assert build_discriminator(tiny("resnet", attention_resolution=32)).attention is None
    assert build_generator(tiny("resnet", attention_resolution=32)).attention is not None
    assert build_generator(tiny("resnet")).attention is None


def test_r3gan_has_no_normalisation_and_grouped_bottlenecks() -> None:
    spec = tiny("r3gan", num_classes=10, channels=3, g_width=32, d_width=32)  # wide enough for several groups
    for network in (build_generator(spec), build_discriminator(spec)):
        norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)
        assert not [m for m in network.modules() if isinstance(m, norms)]
        assert not any(parametrize.is_parametrized(m) for m in network.modules())  # no spectral norm either
        blocks = [m for m in network.modules() if isinstance(m, ResidualBlock)]
        assert len(blocks) == 4 * spec.r3gan_blocks  # 4x4, 8x8, 16x16, 32x32
        for block in blocks:
            expanded = block.expand.out_channels
            assert expanded == 2 * block.expand.in_channels  # r3gan_expansion
            assert block.grouped.groups == expanded // 16  # r3gan_group_size channels per group
            assert block.grouped.kernel_size == (3, 3) and block.project.kernel_size == (1, 1)


def test_r3gan_blocks_start_as_the_identity_with_fixup_scaled_branches() -> None:
    torch.manual_seed(0)
    spec = tiny("r3gan")
    for network in (build_generator(spec), build_discriminator(spec)):
        blocks = [m for m in network.modules() if isinstance(m, ResidualBlock)]
        for block in blocks:
            x = torch.randn(2, block.expand.in_channels, 8, 8)
            assert torch.equal(block(x), x)
            assert not block.project.weight.any()
    # The branch's inner layers: He init scaled by L^(-1/(2m-2)), L = blocks in the network, m = 3.
    block = ResidualBlock(256, 2, 16, total_blocks=16)
    he_leaky = math.sqrt(2 / (1 + 0.2**2))
    expected = he_leaky * 16 ** -0.25 / math.sqrt(256)
    assert block.expand.weight.std().item() == pytest.approx(expected, rel=0.02)
    assert block.grouped.weight.std().item() == pytest.approx(he_leaky * 16 ** -0.25 / math.sqrt(16 * 9), rel=0.02)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_gradients_flow_and_the_r1_penalty_differentiates(family: str) -> None:
    """Every parameter of G and D learns (zero-initialised branches and attention gammas let the
    layers behind them learn from the second step), and the input gradient that R1/R2 penalise
    is itself differentiable."""
    torch.manual_seed(0)
    spec = tiny(family, num_classes=3, **({"attention_resolution": 16} if family == "resnet" else {}))
    G, D = build_generator(spec), build_discriminator(spec)
    optimiser = torch.optim.SGD([*G.parameters(), *D.parameters()], lr=0.05)
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        optimiser.zero_grad()
        real = torch.rand(4, 1, 32, 32) * 2 - 1
        fake_scores, real_scores = D(G(torch.randn(4, 16), labels), labels), D(real, labels)
        (nn.functional.softplus(fake_scores) + nn.functional.softplus(-real_scores)).mean().backward()
        optimiser.step()
    silent = [name for name, p in [*G.named_parameters(), *D.named_parameters()] if p.grad is None or not p.grad.any()]
    assert not silent
    real = (torch.rand(4, 1, 32, 32) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(real, labels).sum(), real, create_graph=True)
    D.zero_grad()
    grad.square().sum().backward()
    assert all(p.grad is not None for p in D.parameters() if p.requires_grad and p.dim() > 1)
    assert any(p.grad.abs().sum() > 0 for p in D.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_bf16_autocast_on_cpu(family: str) -> None:
    """train.mixed_precision: bf16 runs the forward passes under autocast, on CPUs too."""
    spec = tiny(family, num_classes=3, **({"attention_resolution": 16} if family == "resnet" else {}))
    G, D = build_generator(spec), build_discriminator(spec)
    labels = torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = D(G(torch.randn(2, 16), labels), labels)
    scores.float().sum().backward()
    assert torch.isfinite(scores.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters())


def test_r3gan_downsampling_is_the_low_pass_filter() -> None:
    """[1, 3, 3, 1] x [1, 3, 3, 1] / 64, then every other pixel: a constant map stays constant
    away from the border, a checkerboard (the highest frequency) is removed."""
    constant = low_pass_downsample(torch.ones(1, 2, 8, 8))
    assert constant.shape == (1, 2, 4, 4) and torch.allclose(constant[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1
    assert low_pass_downsample(checker[None, None])[..., 1:-1, 1:-1].abs().max() < 1e-6


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_conditional_outputs_depend_on_the_label(family: str) -> None:
    torch.manual_seed(0)
    spec = tiny(family, num_classes=4)
    G, D = build_generator(spec).eval(), build_discriminator(spec).eval()
    with torch.no_grad():  # conditional BN starts class-independent (gain 1, bias 0): move off it, as training does
        for p in G.parameters():
            p.add_(0.05 * torch.randn_like(p))
        z = torch.randn(1, 16).repeat(2, 1)
        out = G(z, torch.tensor([0, 3]))
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # same latent, other class: another sample
        scores = D(out[:1].repeat(2, 1, 1, 1), torch.tensor([0, 3]))
        assert scores[0] != scores[1]  # same image, other class: another score


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_packing_judges_groups_of_samples(family: str) -> None:
    D = build_discriminator(tiny(family, pack=2))
    assert D(torch.randn(6, 1, 32, 32)).shape == (3,)


@pytest.mark.parametrize(("spec", "message"), [
    (tiny("resnet", 16), "data.resolution: resnet needs a power of two in [32, 256], got 16"),
    (tiny("resnet", 512), "data.resolution: resnet needs a power of two in [32, 256], got 512"),
    (tiny("r3gan", 48), "data.resolution: r3gan needs a power of two in [16, 256], got 48"),
    (tiny("r3gan", 8), "data.resolution: r3gan needs a power of two in [16, 256], got 8"),
    (tiny("resnet", attention_resolution=4), "model.attention_resolution: 4 is not one of the generator's "
                                             "resolutions (8, 16, 32"),
    (tiny("resnet", attention_resolution=64), "model.attention_resolution: 64"),
    (tiny("r3gan", attention_resolution=16), "model.attention_resolution: r3gan has no attention"),
    (tiny("r3gan", r3gan_group_size=12), "model.r3gan_group_size: 12 does not divide the expanded width 128"),
])
def test_specs_a_family_cannot_build_name_the_key(spec: NetworkSpec, message: str) -> None:
    for check in (check_spec, build_generator, build_discriminator):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            check(spec)


def test_spec_round_trips_and_old_spec_files_still_load() -> None:
    spec = tiny("r3gan", num_classes=3, r3gan_expansion=4, r3gan_group_size=8, r3gan_blocks=1)
    assert NetworkSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    old = {"family": "dcgan", "sample_shape": [1, 16, 16], "latent_dim": 8, "num_classes": 0, "g_width": 4,
           "d_width": 4, "mlp_layers": 3, "g_conditioning": "embedding", "d_conditioning": "projection",
           "spectral_norm": False, "d_norm": "batch", "pack": 1, "mean": [], "std": [], "columns": [], "classes": []}
    loaded = NetworkSpec.from_json(old)
    assert (loaded.attention_resolution, loaded.r3gan_expansion, loaded.r3gan_group_size, loaded.r3gan_blocks) \
        == (0, 2, 16, 2)


# --- the recipe: config -> spec ---------------------------------------------------------------------

FAMILY_CONFIG = """
seed: 0
data: {source: builtin:digits, resolution: 32}
model: {family: resnet, latent_dim: 16, g_width: 8, d_width: 8}
train: {steps: 4, batch_size: 8, checkpoint_every: 4, sample_every: 4, log_every: 2, best_metric: none}
register: {name: tiny-families}
"""


def test_recipe_records_what_each_family_builds_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    from ganpipe.data import ingest, open_prepared
    from ganpipe.recipe import network_spec

    config = write_config(tmp_path / "c.yaml", FAMILY_CONFIG)
    data = open_prepared(ingest(load_config(config).data).location)

    def spec(*overrides: str) -> NetworkSpec:
        return network_spec(load_config(config, list(overrides)), data)

    resnet = spec("model.conditional=true", "model.attention_resolution=16")
    assert (resnet.g_conditioning, resnet.d_conditioning, resnet.spectral_norm, resnet.d_norm) == \
        ("cbn", "projection", True, "none")
    assert resnet.attention_resolution == 16 and resnet.num_classes == 10
    r3gan = spec("model.family=r3gan", "model.conditional=true", "model.r3gan_blocks=1", "model.r3gan_group_size=8")
    assert (r3gan.g_conditioning, r3gan.spectral_norm, r3gan.d_norm, r3gan.r3gan_blocks, r3gan.r3gan_group_size) == \
        ("embedding", False, "none", 1, 8)
    assert spec("model.family=dcgan").g_conditioning == "embedding"  # auto keeps the old families' default
    refused = {
        ("model.g_conditioning=embedding",): "model.g_conditioning: resnet conditions its generator by cbn",
        ("model.family=r3gan", "model.g_conditioning=cbn"): "model.g_conditioning: r3gan conditions its generator by embedding",
        ("model.d_conditioning=concat",): "model.d_conditioning: resnet conditions its discriminator by projection",
        ("model.family=r3gan", "model.d_norm=batch"): "model.d_norm: r3gan's discriminator has no batch norm",
        ("model.family=r3gan", "model.spectral_norm=true"): "model.spectral_norm: r3gan has no normalisation",
        ("model.family=dcgan", "model.attention_resolution=16"): "model.attention_resolution: only the resnet family",
        ("model.attention_resolution=64",): "model.attention_resolution: 64 is not one of the generator's",
        ("model.family=r3gan", "model.r3gan_group_size=3"): "model.r3gan_group_size: 3 does not divide",
    }
    for overrides, message in refused.items():
        with pytest.raises(UserError, match=f"^{message}"):
            spec(*overrides)


# --- training through the CLI -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GANPIPE_HOME for this module's CLI runs: the digits are prepared and the MLflow store
    created once (each run's config differs, so each is a run of its own)."""
    return tmp_path_factory.mktemp("families-home")


def train(config: Path, home: Path, *overrides: str, processes: int = 1) -> dict:
    sets = [arg for item in overrides for arg in ("--set", item)]
    result = run_cli("train", str(config), "--num-processes", str(processes), *sets, "--json",
                     env={"GANPIPE_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert out["steps"] == 4 and out["num_processes"] == processes and out["status"] == "completed"
    checksums = out["rank_generator_checksums"]
    assert len(checksums) == processes and len(set(checksums)) == 1 and math.isfinite(checksums[0])
    return out


LOSS_OF = {"resnet": ["train.loss=hinge"],
           "r3gan": ["train.loss=relativistic", "train.r1_gamma=1", "train.r2_gamma=1"]}


def two_trainer_steps(cfg: Config) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """A Trainer on `cfg` after two iterations; every network (G, D, the EMA) has changed and every
    logged figure is finite."""
    trainer = Trainer(cfg, new_run_dir(cfg))
    nets = {"G": trainer.nets.g_raw, "D": trainer.nets.d_raw, "ema": trainer.nets.ema}
    before = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
    for _ in range(2):
        stats = trainer.iteration()
        trainer.step += 1
    assert {"d_loss", "g_loss"} <= stats.keys() and all(torch.isfinite(v).all() for v in stats.values())
    for name, net in nets.items():
        after = net.state_dict()
        assert any(not torch.equal(after[k], before[name][k]) for k in after), f"{name} did not change"
    return trainer, stats


# Every family x conditioning, in this process: the Trainer's real updates (D with its penalties,
# G, EMA) on prepared digits. The CLI runs below add two processes and the run's files; the sizes
# (32, 64, 128) are test_families_build_at_every_size's (training at 128 px costs minutes on CPU).
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_trainer_steps_each_family_and_conditioning(tmp_path: Path, family: str, conditional: bool) -> None:
    resolution = 32
    cfg = load_config(write_config(tmp_path / "c.yaml", FAMILY_CONFIG), [
        f"model.family={family}", f"model.conditional={str(conditional).lower()}", f"data.resolution={resolution}",
        "data.max_records=64", "train.cpu=true", *LOSS_OF[family]])
    trainer, stats = two_trainer_steps(cfg)
    if family == "r3gan":
        assert {"r1_penalty", "r2_penalty"} <= stats.keys()
    assert trainer.spec.num_classes == (10 if conditional else 0)
    labels = [3, 7] if conditional else None
    images = generate(trainer.nets.ema, trainer.spec, [0, 1], labels).numpy()
    assert images.shape == (2, resolution, resolution, 1) and images.dtype == np.uint8 and images.std() > 0


def test_digits_limited_config_is_the_limited_data_recipe_and_trains(tmp_path: Path) -> None:
    """configs/digits-limited.yaml as shipped (GANPIPE_HOME is the test's): a conditional model at
    32 px on a class-balanced 300-digit subset, with ADA on what D sees and no transform that turns
    a digit into another (flips, quarter turns); two real updates on that subset, then one digit
    of each class."""
    cfg = load_config(ROOT / "configs/digits-limited.yaml", ["train.cpu=true"])
    assert cfg.model.conditional
    assert (cfg.data.source, cfg.data.resolution, cfg.data.max_per_class) == ("builtin:digits", 32, 30)
    assert cfg.train.augment == "ada" and not {"xflip", "rotate90"} & set(cfg.train.ada_transforms)
    trainer, _ = two_trainer_steps(cfg)
    assert trainer.spec.num_classes == 10 and trainer.data.num_records == 300
    images = generate(trainer.nets.ema, trainer.spec, list(range(10)), list(range(10))).numpy()
    assert images.shape == (10, 32, 32, 1) and images.std() > 0


# Each family through `ganpipe train` in two processes (gloo on CPU), one conditional and one not:
# one process, every family x conditioning, is test_trainer_steps_each_family_and_conditioning's
# (in this process, the same Trainer the CLI's one worker runs).
@pytest.mark.slow
@pytest.mark.parametrize(("family", "conditional", "processes"), [("resnet", True, 2), ("r3gan", False, 2)])
def test_a_few_training_steps_then_generate(tmp_path: Path, shared_home: Path, family: str, conditional: bool,
                                            processes: int) -> None:
    config = write_config(tmp_path / "c.yaml", FAMILY_CONFIG)
    extra = ["model.attention_resolution=16"] if family == "resnet" and conditional else []
    out = train(config, shared_home, f"model.family={family}", f"model.conditional={str(conditional).lower()}",
                *extra, processes=processes)
    run_dir = Path(out["run_dir"])
    spec = json.loads((run_dir / "generator" / "spec.json").read_text())
    assert spec["family"] == family and spec["num_classes"] == (10 if conditional else 0)
    # spec.json leaves out fields added later while they hold their default (NetworkSpec.to_json)
    assert NetworkSpec.from_json(spec).attention_resolution == (16 if extra else 0)
    assert ("attention_resolution" in spec) == bool(extra)
    if not conditional:  # the run's generator rebuilds from its spec.json
        loaded = load_generator(str(run_dir))
        assert type(loaded.generator) is FAMILIES[family][0]
        images = generate(loaded.generator, loaded.spec, [0, 1, 2]).numpy()
    else:  # and `ganpipe generate` samples it, with labels
        target = tmp_path / "samples.npy"
        generated = run_cli("generate", "--model", str(run_dir), "--num-images", "3", "--labels", "3,7",
                            "--out", str(target), env={"GANPIPE_HOME": str(shared_home)})
        assert generated.returncode == 0, generated.stderr[-2000:]
        images = np.load(target)
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 1) and images.std() > 0


@pytest.mark.slow
def test_bad_family_input_exits_2_naming_the_key(tmp_path: Path, shared_home: Path) -> None:
    config = write_config(tmp_path / "c.yaml", FAMILY_CONFIG)
    vectors = ["data.source=builtin:gaussians25", "data.kind=vector", "data.columns=[x, y]", "model.family=r3gan"]
    cases = {
        ("model.family=stylegan",): "model.family",
        ("data.resolution=16",): "data.resolution: resnet needs a power of two in [32, 256], got 16",
        tuple(vectors): "model.family: r3gan needs image data",
    }
    for overrides, message in cases.items():
        result = run_cli("train", str(config), *[a for item in overrides for a in ("--set", item)],
                         env={"GANPIPE_HOME": str(shared_home)})
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        errors = error_lines(result.stderr)
        assert len(errors) == 1 and message in errors[0], (overrides, result.stderr[-2000:])
        assert "Traceback" not in result.stderr

"""train.mode_seeking: MSGAN's term against collapse within a class. Its pairs and ratio against
their definitions, its gradient spreading a collapsed generator, and the trainer pairing the
labels, logging the ratio and training with it (and without it, as before)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ganpipe import losses
from ganpipe.config_files import load_config
from ganpipe.trainer import Trainer
from tests.conftest import TINY_DIGITS, write_config
from tests.fixtures import new_run_dir, one_torch_thread


def test_pairs_give_each_odd_row_its_even_neighbours_label() -> None:
    labels = torch.tensor([3, 1, 4, 1, 5])
    assert losses.mode_seeking_pairs(labels).tolist() == [3, 3, 4, 4, 5]  # an odd last row keeps its own
    assert labels.tolist() == [3, 1, 4, 1, 5]  # the input is not changed


def test_diversity_ratio_is_image_distance_over_latent_distance_of_the_pairs() -> None:
    torch.manual_seed(0)
    fake, z = torch.randn(5, 1, 4, 4), torch.randn(5, 3)
    pairs = [(0, 1), (2, 3)]  # row 4 has no partner
    image = torch.stack([(fake[a] - fake[b]).abs().mean() for a, b in pairs]).mean()
    latent = torch.stack([(z[a] - z[b]).abs().mean() for a, b in pairs]).mean()
    ratio = losses.diversity_ratio(fake, z)
    assert ratio.item() == pytest.approx((image / latent).item(), rel=1e-6)
    assert losses.mode_seeking(ratio).item() == pytest.approx(1 / (ratio.item() + 1e-5), rel=1e-6)
    same = fake.clone()
    same[1], same[3] = same[0], same[2]  # collapsed pairs: ratio 0, the term at its largest
    assert losses.diversity_ratio(same, z).item() == 0
    assert losses.mode_seeking(losses.diversity_ratio(same, z)).item() == pytest.approx(1e5)


def test_the_term_spreads_a_collapsed_generator() -> None:
    """Gradient descent on the term alone moves a generator that maps every latent near one
    image toward one whose images differ as its latents do."""
    torch.manual_seed(0)
    weight = (0.01 * torch.randn(16, 4)).requires_grad_(True)  # G(z) = weight @ z: nearly constant
    optimiser = torch.optim.SGD([weight], lr=1e-4)
    z = torch.randn(64, 4)
    before = losses.diversity_ratio(z @ weight.T, z).item()
    for _ in range(50):
        optimiser.zero_grad()
        losses.mode_seeking(losses.diversity_ratio(z @ weight.T, z)).backward()
        optimiser.step()
    assert losses.diversity_ratio(z @ weight.T, z).item() > 5 * before


def generator_step(tmp_path: Path, weight: float) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], Trainer]:
    """One generator update of a conditional tiny-digits trainer with train.mode_seeking `weight`:
    the labels G was given, the stats, and the trainer (closed)."""
    cfg = load_config(write_config(tmp_path / f"c{weight}.yaml", TINY_DIGITS),
                      ["model.conditional=true", "train.cpu=true", f"train.mode_seeking={weight}",
                       f"train.run_name=ms-{weight}"])
    trainer = Trainer(cfg, new_run_dir(cfg))
    seen: list[torch.Tensor] = []
    hook = trainer.nets.g_raw.register_forward_hook(lambda module, inputs, output: seen.append(inputs[1].clone()))
    stats = trainer.generator_update()
    hook.remove()
    trainer.close()
    return seen, stats, trainer


def test_trainer_pairs_labels_logs_the_ratio_and_descends_the_term(tmp_path: Path) -> None:
    with one_torch_thread():
        off_labels, off_stats, _ = generator_step(tmp_path, 0.0)
        faint_labels, _, faint = generator_step(tmp_path, 1e-9)
        on_labels, on_stats, on = generator_step(tmp_path, 1.0)
    (off_labels,), (faint_labels,), (on_labels,) = off_labels, faint_labels, on_labels
    assert len(on_labels) == 32 and torch.equal(on_labels[1::2], on_labels[0::2])
    assert torch.equal(on_labels[0::2], off_labels[0::2])  # the same draws, the odd rows paired
    assert not torch.equal(off_labels[1::2], off_labels[0::2])  # off: labels as drawn
    assert "g_diversity" not in off_stats and on_stats["g_diversity"].item() > 0
    assert on_stats["g_loss"].item() > 0  # the adversarial loss alone (the term is ~1/ratio, larger)
    assert on_stats["g_loss"].item() < losses.mode_seeking(on_stats["g_diversity"]).item()
    # The same inputs at a vanishing and at a full weight: only the term's gradient differs.
    assert torch.equal(faint_labels, on_labels)
    g_faint, g_on = faint.nets.g_raw.state_dict(), on.nets.g_raw.state_dict()
    assert any(not torch.equal(g_faint[k], g_on[k]) for k in g_on)

"""LPIPS: ganpipe.metrics.lpips against the reference `lpips` package (v0.1, the numbers papers
report) on the same weights file, saved as users save it; bad weights files; its direction.

The package is built with `pnet_rand=True` (a random backbone, so nothing is downloaded; the
test asserts no connection is even attempted) and `pretrained=True` (its learned linear layers,
shipped inside the package). Distances then depend on every part of the computation: the scaling
layer, the backbone's slices, the unit normalisation, the linear weights and the averaging."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ganpipe.errors import UserError
from ganpipe.metrics import METRICS
from ganpipe.metrics.lpips import LPIPSMeasure, load_lpips
from ganpipe.registry import CHALLENGER, CHAMPION, decide_alias
from tests.conftest import error_lines, run_cli
from tests.fixtures import write_random_lpips

TOLERANCE = 1e-5


def reference_lpips(net: str, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """The package's LPIPS, built with every outgoing connection refused."""
    import lpips

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lpips package tried to reach the network")

    with monkeypatch.context() as patch, warnings.catch_warnings():
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        warnings.simplefilter("ignore", UserWarning)  # torchvision's note on the package's `pretrained=False`
        torch.manual_seed(0)  # the random backbone
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()


def image_pairs(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of image pairs in [-1, 1]: noise against perturbed copies of growing strength, at
    two sizes, and a pair of equal images."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for size, strength in (((40, 56), 0.05), ((40, 56), 0.5), ((64, 48), 1.0)):
        a = torch.rand(3, 3, *size, generator=generator) * 2 - 1
        b = (a + strength * torch.randn(a.shape, generator=generator)).clamp(-1, 1)
        pairs.append((a, b))
    pairs.append((pairs[0][0], pairs[0][0].clone()))
    return pairs


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package_on_the_same_weights_file(net: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reference = reference_lpips(net, monkeypatch)
    path = tmp_path / f"lpips-{net}.pth"
    torch.save(reference.state_dict(), path)  # as README tells users to save it, unconverted
    ours = load_lpips(path)
    assert ours.backbone == net  # read from the file's layout: no setting names it
    distances = []
    for a, b in image_pairs():
        with torch.no_grad():
            expected = reference(a, b).flatten()
        got = ours(a, b)
        assert got.shape == expected.shape == (len(a),)
        assert torch.allclose(got, expected, rtol=0, atol=TOLERANCE), (got, expected)
        distances += got.tolist()
    assert distances[-3:] == [0.0, 0.0, 0.0]  # equal images
    assert 0 < distances[0] < distances[3] < distances[6]  # and real distances, growing with the perturbation


def test_uint8_images_are_measured_as_the_package_measures_them_in_minus_one_to_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_sample_images

    reference = reference_lpips("alex", monkeypatch)
    path = tmp_path / "lpips-alex.pth"
    torch.save(reference.state_dict(), path)
    measure = LPIPSMeasure(load_lpips(path))
    photo = np.array(load_sample_images().images[0][100:164, 200:272])
    noisy = np.clip(photo + np.random.default_rng(0).integers(-30, 31, photo.shape), 0, 255).astype(np.uint8)
    border = 4
    as_package = [torch.from_numpy(x[border:-border, border:-border]).permute(2, 0, 1)[None].float() / 127.5 - 1
                  for x in (noisy, photo)]
    with torch.no_grad():
        expected = float(reference(*as_package))
    assert measure(noisy, photo, border) == pytest.approx(expected, abs=TOLERANCE)
    grey = measure(noisy[..., :1], photo[..., :1], border)  # one channel: repeated to three
    with torch.no_grad():
        expected_grey = float(reference(*(x[:, :1].expand(-1, 3, -1, -1) for x in as_package)))
    assert grey == pytest.approx(expected_grey, abs=TOLERANCE) and grey != pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="at least 31x31 px after the 4 px border crop, got 36x30"):
        measure(noisy[:30, :36], photo[:30, :36], border)


def test_a_safetensors_file_gives_the_same_distances_as_the_torch_file(tmp_path: Path) -> None:
    a, b = image_pairs()[1]
    torch_file = write_random_lpips(tmp_path / "w.pth")
    safetensors_file = write_random_lpips(tmp_path / "w.safetensors")
    assert torch.equal(load_lpips(torch_file)(a, b), load_lpips(safetensors_file)(a, b))


def test_a_missing_or_unreadable_file_or_one_of_another_layout_is_refused_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(UserError, match=r"^eval.lpips_weights \S+nowhere.pth: file not found$"):
        load_lpips(tmp_path / "nowhere.pth")
    state = torch.load(write_random_lpips(tmp_path / "alex.pth"), weights_only=True)
    del state["lin2.model.1.weight"]
    save_file(state, str(tmp_path / "no-lin2.safetensors"))
    with pytest.raises(UserError, match=r"^eval.lpips_weights \S+no-lin2.safetensors: not LPIPS weights in the "
                                        r"lpips package's layout .*\(missing lin2.model.1.weight\)$"):
        load_lpips(tmp_path / "no-lin2.safetensors")
    torch.save({"net.slice1.0.weight": object()}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match=r"pickled.pth: not a weights file \(UnpicklingError"):
        load_lpips(tmp_path / "pickled.pth")


def test_ganpipe_evaluate_exits_2_with_one_error_line_naming_the_key_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "lpips.pth"
    state = torch.load(write_random_lpips(path), weights_only=True)
    state["lin0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    torch.save(state, path)
    result = run_cli("evaluate", "--real", "builtin:digits", "--fake", "builtin:digits", "--metrics", "psnr,lpips",
                     "--set", f"eval.lpips_weights={path}")
    assert result.returncode == 2, result.stderr
    # before any data is prepared: the check comes first
    assert error_lines(result.stderr) == [
        f"error: eval.lpips_weights {path}: not LPIPS weights in the lpips package's layout (lpips.LPIPS(net='alex' "
        "or 'vgg').state_dict()) (lin0.model.1.weight has shape (1, 32, 1, 1), expected (1, 64, 1, 1))"], result.stderr


def test_lower_lpips_is_better_so_a_lower_value_is_promoted() -> None:
    lower_is_better = not METRICS["lpips"].higher_is_better
    assert lower_is_better
    better = decide_alias("lpips", {"value": 0.20, "uncertainty": 0.01}, {"value": 0.30, "uncertainty": 0.01}, 0.0,
                          METRICS["lpips"].higher_is_better)
    worse = decide_alias("lpips", {"value": 0.30, "uncertainty": 0.01}, {"value": 0.20, "uncertainty": 0.01}, 0.0,
                         METRICS["lpips"].higher_is_better)
    assert (better.alias, worse.alias) == (CHAMPION, CHALLENGER)
    assert "(lower is better)" in better.reason

"""A number called `fid` is FID as everyone computes it.

- Resolution: two folders of images are evaluated at their own size (no resize before Inception's
  own to 299x299), so `ganpipe evaluate --real A --fake B` equals torch-fidelity's
  `calculate_metrics(fid=True)` on the same folders and weights file, at sizes other than the old
  fixed 64 px; every metric's result says which resolution was used; images without one size
  are refused naming the key that sets it.
- Weights: only the standard FID weights, recognised by their sha256, give `fid` (and `kid`, `pr`,
  on the same features); another file, or none, is bad input (exit 2, one line saying how to
  provide the file) when only those metrics were asked for, and leaves the other metrics running.

No real FID weights here (nothing downloads): a file of random values in the exact layout stands
in, and tests.fixtures.accept_as_standard makes it pass the hash check in this process only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ganpipe.config import DataConfig
from ganpipe.data import ingest, open_prepared
from ganpipe.data.ingest import MixedSizes
from ganpipe.metrics import inception
from ganpipe.metrics.inception import STANDARD_WEIGHTS_SHA256, WeightsNotStandard, standard_weights
from tests.conftest import error_lines, last_json
from tests.fixtures import accept_as_standard, write_random_weights

pytestmark = pytest.mark.slow


def write_rgb_set(folder: Path, size: int, count: int, seed: int, kind: str) -> Path:
    """RGB PNGs of one size: smooth colour waves, or blocky colour noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        if kind == "waves":
            image = np.stack([127 + 120 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + yy * rng.uniform(0, 2))
                                                 + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
        else:
            image = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
        Image.fromarray(image.astype(np.uint8), mode="RGB").save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("weights") / "random-inception.pth")


@pytest.fixture
def no_weights_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("GANPIPE_INCEPTION_WEIGHTS", raising=False)


def evaluate(real: Path, fake: Path, *extra: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`ganpipe evaluate ... --json` in this process (so that accept_as_standard holds)."""
    from ganpipe.cli import run

    capsys.readouterr()
    code = run(["evaluate", "--real", str(real), "--fake", str(fake), "--json", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def torch_fidelity_fid(real: Path, fake: Path, weights: Path) -> float:
    import torch_fidelity

    with inception.weights_only_loads():
        return torch_fidelity.calculate_metrics(input1=str(fake), input2=str(real), fid=True, cuda=False,
                                                feature_extractor_weights_path=str(weights), cache=False,
                                                save_cpu_ram=True, verbose=False)["frechet_inception_distance"]


# --- resolution -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48])
def test_fid_of_two_folders_equals_torch_fidelity_at_their_own_size(
        size: int, random_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    real = write_rgb_set(tmp_path / "real", size, 10, seed=0, kind="waves")
    fake = write_rgb_set(tmp_path / "fake", size, 10, seed=1, kind="blocks")
    accept_as_standard(monkeypatch, random_weights)
    flags = ("--metrics", "fid,kid", "--num-samples", "10", "--bootstrap", "0", "--inception-weights",
             str(random_weights))
    code, out, err = evaluate(real, fake, *flags, capsys=capsys)
    assert code == 0, err
    ours = last_json(out)
    theirs = torch_fidelity_fid(real, fake, random_weights)
    assert theirs > 100.0, "random weights must give features that differ between the image sets"
    assert ours["fid"]["value"] == pytest.approx(theirs, rel=1e-3)
    assert ours["fid"]["resolution"] == ours["kid"]["resolution"] == size  # said in every metric's result
    assert ours["fid"]["weights_sha256"] == inception.STANDARD_WEIGHTS_SHA256

    if size == 32:
        # What evaluate did before (both folders upscaled to 64 px, then to 299): another number.
        code, out, err = evaluate(real, fake, *flags, "--resolution", "64", capsys=capsys)
        assert code == 0, err
        upscaled = last_json(out)["fid"]
        assert upscaled["resolution"] == 64 and abs(upscaled["value"] / theirs - 1) > 1e-2


def test_datasets_keep_their_own_size_and_mixed_sizes_are_refused_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = write_rgb_set(tmp_path / "twelve", 12, 3, seed=2, kind="waves")
    result = ingest(DataConfig(source=str(images), resolution=None))
    prepared = open_prepared(result.location)
    assert prepared.sample_shape == (3, 12, 12)
    stored, _ = prepared.load_all()
    assert np.array_equal(stored, np.stack([np.asarray(Image.open(images / f"{i:03d}.png")) for i in range(3)]))

    # One image of another size: no native resolution. ingest names data.resolution...
    Image.new("RGB", (16, 16)).save(images / "003.png")
    with pytest.raises(MixedSizes) as mixed:
        ingest(DataConfig(source=str(images), resolution=None))
    assert str(mixed.value) == ("data.resolution: null (each image's own size) needs square images of one size: "
                                f"image folder {images}: row 3 is 16x16 (the first images are 12x12); "
                                "set data.resolution")
    # ...and evaluate names its own key; with it given, both sides are brought to that size.
    other = write_rgb_set(tmp_path / "other", 12, 3, seed=3, kind="blocks")
    code, out, err = evaluate(images, other, "--metrics", "fd_domain", "--num-samples", "3", capsys=capsys)
    assert code == 2 and out == ""
    assert error_lines(err) == [f"error: --resolution (eval.resolution): evaluating at the images' own size "
                                f"needs square images of one size: image folder {images}: row 3 is 16x16 (the "
                                "first images are 12x12); pass --resolution N to evaluate at N x N"]

    (tmp_path / "wide").mkdir()
    Image.new("RGB", (12, 8)).save(tmp_path / "wide" / "0.png")
    with pytest.raises(MixedSizes, match=r"wide: row 0 is 12x8 \(not square\); set data\.resolution$"):
        ingest(DataConfig(source=str(tmp_path / "wide"), resolution=None))


# --- the standard weights -------------------------------------------------------------------------

def test_the_standard_weights_are_recognised_by_their_hash_and_another_file_is_refused(
        random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The digest of pt_inception-2015-12-05-6726825d.pth: torch.hub's name carries its first 8 digits.
    assert STANDARD_WEIGHTS_SHA256.startswith("6726825d") and len(STANDARD_WEIGHTS_SHA256) == 64
    with pytest.raises(WeightsNotStandard) as refused:
        standard_weights(str(random_weights))
    message = str(refused.value)
    assert message.startswith(f"inception weights {random_weights}: not the standard FID weights")
    assert STANDARD_WEIGHTS_SHA256[:16] in message and "--inception-weights FILE" in message

    accept_as_standard(monkeypatch, random_weights)  # a stand-in whose expected hash the test controls
    path, sha256 = standard_weights(str(random_weights))
    assert (path, sha256) == (random_weights, inception.STANDARD_WEIGHTS_SHA256)
    monkeypatch.setenv("GANPIPE_INCEPTION_WEIGHTS", str(random_weights))
    assert standard_weights(None) == (random_weights, sha256)


def test_missing_or_refused_weights_are_bad_input_and_other_metrics_still_run(
        random_weights: Path, tmp_path: Path, no_weights_anywhere: None, capsys: pytest.CaptureFixture) -> None:
    real = write_rgb_set(tmp_path / "real", 16, 8, seed=0, kind="waves")
    fake = write_rgb_set(tmp_path / "fake", 16, 8, seed=1, kind="blocks")
    how = "pass --inception-weights FILE, set eval.inception_weights or GANPIPE_INCEPTION_WEIGHTS"

    code, out, err = evaluate(real, fake, "--metrics", "fid", capsys=capsys)
    assert code == 2 and out == ""
    assert len(error_lines(err)) == 1 and error_lines(err)[0].startswith(
        "error: fid: needs the InceptionV3 FID weights (pt_inception-2015-12-05-6726825d.pth)")
    assert how in error_lines(err)[0]

    code, out, err = evaluate(real, fake, "--metrics", "fid,pr", "--inception-weights", str(random_weights),
                              capsys=capsys)
    assert code == 2 and out == ""
    assert len(error_lines(err)) == 1 and error_lines(err)[0].startswith(
        f"error: fid, pr: inception weights {random_weights}: not the standard FID weights")
    assert how in error_lines(err)[0]

    # With another metric beside it, that one is computed and fid says why it is not.
    code, out, err = evaluate(real, fake, "--metrics", "fid,fd_domain", "--num-samples", "8", "--bootstrap", "2",
                              "--inception-weights", str(random_weights), capsys=capsys)
    assert code == 0, err
    result = last_json(out)
    assert result["fd_domain"]["value"] > 0 and result["fd_domain"]["resolution"] == 16
    assert result["fid"]["value"] is None and result["fid"]["resolution"] == 16
    assert "not the standard FID weights" in result["fid"]["error"] and how in result["fid"]["error"]
    assert "warning: fid skipped: inception weights" in err and not error_lines(err)

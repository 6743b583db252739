"""`ganpipe evaluate` and the pipeline's evaluation, end to end: FID equal to torch-fidelity's on
the same images and weights, reference statistics reused, fid failing clearly without weights
while the other metrics run, features gathered across two processes row for row, and CAS.

No real FID weights here (nothing downloads): a file of random values in the exact layout stands
in, calibrated so features do not vanish, and is accepted as the standard file in-process only
(tests.fixtures.accept_as_standard). InceptionV3 at 299x299 is slow on CPU, so the image sets
are tiny.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import error_lines, last_json, run_cli, write_config
from tests.fixtures import accept_as_standard, write_random_weights

pytestmark = pytest.mark.slow


def write_image_set(folder: Path, kind: str, count: int, seed: int) -> Path:
    """Greyscale 16x16 PNGs: smooth stripes or blocky noise, two clearly different distributions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(count):
        if kind == "stripes":
            image = 127 + 120 * np.sin(xx / rng.uniform(1.5, 4) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(2, 5))
        else:
            image = np.kron(rng.integers(0, 256, (4, 4)), np.ones((4, 4)))
        Image.fromarray(image.astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("weights") / "random-inception.pth")


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    return write_image_set(root / "real", "stripes", 11, 0), write_image_set(root / "fake", "blocks", 11, 1)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GANPIPE_HOME for the tests that only need the prepared image sets and the fd_domain
    network trained once (each still works alone: it then prepares and trains itself)."""
    return tmp_path_factory.mktemp("shared-home")


@pytest.fixture
def no_weights_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("GANPIPE_INCEPTION_WEIGHTS", raising=False)


def _evaluate(real: Path, fake: Path, *extra: str):
    return run_cli("evaluate", "--real", str(real), "--fake", str(fake), "--resolution", "16", "--json", *extra)


def test_fid_equals_torch_fidelity_on_the_same_images_and_weights(random_weights: Path,
                                                                   image_sets: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    import torch_fidelity

    from ganpipe.metrics.inception import weights_only_loads

    real, fake = image_sets
    accept_as_standard(monkeypatch, random_weights)  # in this process: the CLI runs in-process
    code, out, err = _evaluate_in_process(real, fake, "--metrics", "fid,kid,pr", "--num-samples", "11",
                                          "--bootstrap", "5", "--inception-weights", str(random_weights),
                                          capsys=capsys)
    assert code == 0, err
    ours = last_json(out)
    assert set(ours) == {"fid", "kid", "pr"}
    assert {r["resolution"] for r in ours.values()} == {16}
    with weights_only_loads():
        theirs = torch_fidelity.calculate_metrics(input1=str(fake), input2=str(real), fid=True, cuda=False,
                                                  feature_extractor_weights_path=str(random_weights), cache=False,
                                                  save_cpu_ram=True, verbose=False)
    expected = theirs["frechet_inception_distance"]
    assert expected > 100.0, "random weights must give features that differ between the image sets"
    assert ours["fid"]["value"] == pytest.approx(expected, rel=1e-3)
    assert ours["fid"]["uncertainty"] > 0 and ours["fid"]["bootstrap"] == 5
    assert "11 samples is unreliable" in ours["fid"]["warning"]
    assert ours["fid"]["weights"] == str(random_weights)
    assert ours["kid"]["value"] > 0 and ours["kid"]["subset_size"] == 11
    assert {"precision", "recall", "precision_uncertainty", "recall_uncertainty"} <= set(ours["pr"])


def test_a_second_evaluation_reuses_the_reference_statistics(random_weights: Path, image_sets: tuple[Path, Path],
                                                             ganpipe_home: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ganpipe import storage
    from ganpipe.evaluate import evaluate_sources
    from ganpipe.metrics.inception import InceptionFeatures

    accept_as_standard(monkeypatch, random_weights)
    extracted: list[int] = []
    original_call = InceptionFeatures.__call__

    def counting_call(self, batch):
        extracted.append(len(batch))
        return original_call(self, batch)

    monkeypatch.setattr(InceptionFeatures, "__call__", counting_call)
    real, fake = image_sets
    first = evaluate_sources(str(real), str(fake), ["fid"], 6, bootstrap=0, resolution=16,
                             inception_weights=str(random_weights))
    assert sum(extracted) == 12  # 6 real + 6 "fake" (a dataset too, so it is cached as well)
    entries = sorted((ganpipe_home / "cache" / "stats").iterdir())
    assert len(entries) == 2
    metas = [json.loads((entry / "meta.json").read_text()) for entry in entries]
    sha = storage.sha256_file(random_weights)
    assert all(sha[:16] in meta["extractor"] and meta["num_samples"] == 6 for meta in metas)
    assert all(np.load(entry / "features.npy").shape == (6, 2048) for entry in entries)

    extracted.clear()
    second = evaluate_sources(str(real), str(fake), ["fid"], 6, bootstrap=0, resolution=16,
                              inception_weights=str(random_weights))
    assert extracted == [], "the second evaluation must read the cached features, not extract again"
    assert second["fid"]["value"] == first["fid"]["value"]

    # Another sample count is another reference: extracted again, not mixed up with the first.
    third = evaluate_sources(str(real), str(fake), ["fid"], 5, bootstrap=0, resolution=16,
                             inception_weights=str(random_weights))
    assert sum(extracted) == 10 and third["fid"]["value"] != first["fid"]["value"]
    assert len(list((ganpipe_home / "cache" / "stats").iterdir())) == 4


def _evaluate_in_process(real: Path, fake: Path, *extra: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The same command without a new interpreter (cheaper when one test needs several runs)."""
    from ganpipe.cli import run

    capsys.readouterr()
    code = run(["evaluate", "--real", str(real), "--fake", str(fake), "--resolution", "16", "--json", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_fid_without_weights_fails_clearly_while_other_metrics_run(
        image_sets: tuple[Path, Path], shared_home: Path, no_weights_anywhere: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real, fake = image_sets
    monkeypatch.setenv("GANPIPE_HOME", str(shared_home))
    proc = _evaluate(real, fake, "--metrics", "fid,fd_domain", "--num-samples", "11", "--bootstrap", "3")
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    assert result["fid"]["value"] is None
    for hint in ("--inception-weights", "eval.inception_weights", "GANPIPE_INCEPTION_WEIGHTS", "never downloads"):
        assert hint in result["fid"]["error"]
    assert "warning: fid skipped" in proc.stderr
    assert result["fd_domain"]["value"] > 0 and result["fd_domain"]["extractor"] == "autoencoder"

    # Only metrics that need the weights: bad input, found before any data is prepared.
    code, out, err = _evaluate_in_process(real, fake, "--metrics", "fid,kid", "--num-samples", "11", capsys=capsys)
    assert code == 2 and out == ""
    assert len(error_lines(err)) == 1 and error_lines(err)[0].startswith(
        "error: fid, kid: needs the InceptionV3 FID weights (pt_inception-2015-12-05-6726825d.pth)")
    assert "--inception-weights FILE" in error_lines(err)[0]

    code, _, err = _evaluate_in_process(real, fake, "--metrics", "fid", "--inception-weights", "/nonexistent/w.pth",
                                        capsys=capsys)
    assert code == 2
    assert error_lines(err) == ["error: --inception-weights /nonexistent/w.pth: file not found"]


def test_two_processes_gather_the_same_features_row_for_row(
        image_sets: tuple[Path, Path], shared_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    real, fake = image_sets
    monkeypatch.setenv("GANPIPE_HOME", str(shared_home))
    code, single_out, err = _evaluate_in_process(real, fake, "--metrics", "fd_domain", "--num-samples", "11",
                                                 "--bootstrap", "0", capsys=capsys)
    assert code == 0, err
    stats = shared_home / "cache" / "stats"
    shutil.move(stats, tmp_path / "single")

    # 11 samples over 2 processes: ranges of 6 and 5, gathered back in order.
    double = _evaluate(real, fake, "--metrics", "fd_domain", "--num-samples", "11", "--bootstrap", "0",
                       "--num-processes", "2")
    assert double.returncode == 0, double.stderr
    entries = sorted(p.name for p in stats.iterdir())
    assert entries == sorted(p.name for p in (tmp_path / "single").iterdir()) and len(entries) == 2
    for name in entries:
        one = np.load(tmp_path / "single" / name / "features.npy")
        two = np.load(stats / name / "features.npy")
        assert one.shape == two.shape == (11, 128)
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
        assert len(np.unique(two.round(4), axis=0)) == 11  # no row duplicated
    assert last_json(double.stdout)["fd_domain"]["value"] == pytest.approx(
        last_json(single_out)["fd_domain"]["value"], rel=1e-6)


def test_a_config_file_sets_the_evaluation_and_flags_override_it(
        image_sets: tuple[Path, Path], shared_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """`ganpipe evaluate` reads the eval section and seed of a config (a pipeline config serves)."""
    real, fake = image_sets
    monkeypatch.setenv("GANPIPE_HOME", str(shared_home))
    config = write_config(tmp_path / "pipeline.yaml", "seed: 3\ndata: {source: builtin:digits}\n"
                          "eval: {metrics: [fd_domain], num_samples: 9, bootstrap: 2, resolution: 16}\n")

    def evaluate(*args: str) -> tuple[int, str, str]:
        from ganpipe.cli import run

        capsys.readouterr()
        code = run(["evaluate", *args, "--real", str(real), "--fake", str(fake), "--json"])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = evaluate(str(config))
    assert code == 0, err
    result = last_json(out)
    assert set(result) == {"fd_domain"}
    assert (result["fd_domain"]["num_samples"], result["fd_domain"]["bootstrap"]) == (9, 2)

    code, out, err = evaluate(str(config), "--set", "eval.bootstrap=4", "--num-samples", "8", "--bootstrap", "3")
    assert code == 0, err
    assert (last_json(out)["fd_domain"]["num_samples"], last_json(out)["fd_domain"]["bootstrap"]) == (8, 3)

    bad = write_config(tmp_path / "bad.yaml", "eval: {metrics: [fd_domain], num_sample: 9}\n")
    code, _, err = evaluate(str(bad))
    assert code == 2 and error_lines(err) == [f"error: {bad}: unknown key 'eval.num_sample'"]
    code, _, err = evaluate("--set", "eval.workers=2")
    assert code == 2 and error_lines(err) == ["error: --set: unknown key 'eval.workers'"]


def test_pipeline_evaluation_reports_cas_beside_real_accuracy(tiny_conditional_run: Path, tmp_path: Path,
                                                              no_weights_anywhere: None) -> None:
    from ganpipe import runs
    from ganpipe.evaluate import evaluate_run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_conditional_run, run_dir)
    cfg = runs.load_run_config(run_dir).model_copy(deep=True)
    cfg.eval.metrics = ["cas", "fid"]
    cfg.eval.num_samples = 300
    evaluation = evaluate_run(run_dir, cfg)
    assert json.loads((run_dir / "evaluation.json").read_text())["metrics"] == evaluation["metrics"]
    assert evaluation["reference_fingerprint"] == runs.read_info(run_dir)["data"]["fingerprint"]
    assert evaluation["status"] == "ok" and evaluation["failed"] == ["fid"]
    assert "--inception-weights" in evaluation["metrics"]["fid"]["error"]
    cas = evaluation["metrics"]["cas"]
    assert cas["num_train"] == 300 and cas["num_test"] == 359  # 20% of the 1,797 digits held out
    assert cas["real_accuracy"] > 0.7, "the same classifier trained on real digits must work"
    assert 0.0 <= cas["value"] < cas["real_accuracy"]  # a 20-step generator is far from real
    assert cas["ratio"] == pytest.approx(cas["value"] / cas["real_accuracy"])
    assert 0 < cas["uncertainty"] < 0.05

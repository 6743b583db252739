"""Augmentation value (`uplift`) and the k-NN coverage/density metrics: the held-out split, the
reference implementation of coverage and density, mode collapse on the 25-Gaussians grid, uplift
of a trained against an untrained generator (its classifier: the moving average of its weights),
gating on uplift and `augment --ratio auto`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ganpipe import storage
from ganpipe.config import DataConfig
from ganpipe.data import ingest, open_prepared
from ganpipe.data.gaussians import grid_means, sample_grid
from ganpipe.errors import UserError
from ganpipe.generators import BEST_RATIO_TAG, LoadedGenerator, load_generator
from ganpipe.metric_settings import MetricSettings
from ganpipe.metrics import METRICS, EvalContext, downstream, evaluate
from ganpipe.metrics import uplift as uplift_module
from ganpipe.metrics.coverage import coverage_density, standardise
from ganpipe.metrics.samples import RealSamples
from ganpipe.metrics.uplift import holdout_split, uplift
from ganpipe.networks import build_generator
from ganpipe.registry import register_run
from tests.conftest import ROOT, error_lines, last_json, run_cli
from tests.test_registry import aliases_of, copy_run, mlflow_client

# --- the downstream classifier ---------------------------------------------------------------------

def test_the_cnn_scored_is_the_moving_average_of_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """After k steps the classifier returned is d x (its average after k - 1 steps) + (1 - d) x the
    k-th step's weights, where the last step's weights are what decay 0 returns (the training
    itself does not depend on the average)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 16, 16, 1), dtype=np.uint8), np.arange(40) % 4

    def weights(steps: int) -> dict[str, torch.Tensor]:
        return downstream.train_cnn(images, labels, 4, steps, seed=3, flip=False, device="cpu").state_dict()

    before, averaged = weights(5), weights(6)
    monkeypatch.setattr(downstream, "EMA_DECAY", 0.0)
    last = weights(6)
    d = 0.98
    for key in last:
        assert torch.allclose(averaged[key], d * before[key] + (1 - d) * last[key], atol=1e-6), key
    assert any(not torch.allclose(averaged[k], last[k]) for k in last)  # not the last step's weights


# --- the held-out split ------------------------------------------------------------------------------


def test_holdout_is_stratified_seeded_and_disjoint_from_the_training_part() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 11, 2])
    held, rest = holdout_split(labels, 0.3, seed=7)
    assert np.intersect1d(held, rest).size == 0 and np.union1d(held, rest).tolist() == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=4).tolist() == [30, 15, 3, 1]  # round(0.3 n), at least 1, never all
    again, _ = holdout_split(labels, 0.3, seed=7)
    other, _ = holdout_split(labels, 0.3, seed=8)
    assert (again == held).all() and not (other == held).all()


# --- coverage and density ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_coverage_and_density_equal_the_prdc_package(k: int) -> None:
    from prdc import compute_prdc

    rng = np.random.default_rng(k)
    scale = rng.uniform(0.5, 3.0, 8)  # columns in different units: standardising matters
    real = rng.normal(size=(300, 8)) * scale + 2.0
    fake = rng.normal(0.2, 1.1, size=(250, 8)) * scale + 2.0
    ours = coverage_density(real, fake, k)
    real_std, fake_std = (t.numpy() for t in standardise(real, fake))
    theirs = compute_prdc(real_std, fake_std, nearest_k=k)
    assert ours["coverage"] == pytest.approx(theirs["coverage"], abs=1e-12)
    assert ours["density"] == pytest.approx(theirs["density"], rel=1e-12)
    assert 0.3 < ours["coverage"] < 0.95 and 0.5 < ours["density"] < 0.9  # neither trivial 0 nor saturated
    assert ours["coverage_uncertainty"] > 0 and ours["density_uncertainty"] > 0
    # Standardised by the real side: a change of units is no change at all.
    scaled = coverage_density(real * 1000.0, fake * 1000.0, k)
    assert (scaled["coverage"], scaled["density"]) == pytest.approx((ours["coverage"], ours["density"]))


class ArraySamples:
    """A generated side made of fixed rows (data units), for metrics that read `batches`."""

    def __init__(self, rows: np.ndarray):
        self.rows = torch.from_numpy(rows.astype(np.float32))
        self.num_samples = len(rows)

    def batches(self, batch_size: int = 500, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[torch.Tensor, None]]:
        stop = self.num_samples if stop is None else stop
        for first in range(start, stop, batch_size):
            yield self.rows[first:min(first + batch_size, stop)], None


def test_coverage_sees_a_generator_that_drops_20_of_25_gaussian_modes() -> None:
    data = open_prepared(ingest(DataConfig(source="builtin:gaussians25", kind="vector", columns=["x", "y"])).location)
    all_modes, _ = sample_grid(2000, seed=1)
    modes = grid_means()[[0, 6, 12, 18, 24]]  # the diagonal: 5 modes, each sampled as tightly as the real ones
    five_modes = modes[np.arange(2000) % 5] + np.random.default_rng(2).normal(0.0, 0.05, (2000, 2))
    scores = {}
    for name, rows in (("25 modes", all_modes), ("5 modes", five_modes)):
        ctx = EvalContext(RealSamples(data, 2000, seed=0), ArraySamples(rows), bootstrap=0)  # type: ignore[arg-type]
        scores[name] = evaluate(ctx, ["coverage", "density"])
    full, collapsed = scores["25 modes"], scores["5 modes"]
    assert full["coverage"]["value"] > 0.9 and collapsed["coverage"]["value"] < 0.3
    assert full["coverage"]["value"] - collapsed["coverage"]["value"] > \
        10 * np.hypot(full["coverage"]["uncertainty"], collapsed["coverage"]["uncertainty"])
    assert full["coverage"]["features"] == "standardised vectors" and full["coverage"]["k"] == 5
    # Each collapsed sample still sits on real data: density, a fidelity measure, does not drop.
    assert collapsed["density"]["value"] > 0.7 and full["density"]["value"] > 0.7
    assert METRICS["coverage"].higher_is_better and METRICS["density"].higher_is_better


# --- uplift ---------------------------------------------------------------------------------------------


def test_uplift_reports_its_held_out_rows_and_no_classifier_trains_on_them(
        tiny_conditional_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_generator(str(tiny_conditional_run))
    data = open_prepared(json.loads((tiny_conditional_run / "run.json").read_text())["data"]["location"])
    trainings: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    real_fit = uplift_module.fit_and_score

    def recording(classifier: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  *args: Any, **kwargs: Any) -> float:
        trainings.append((train[0], train[1], test[0]))
        return real_fit(classifier, train, test, *args, **kwargs)

    monkeypatch.setattr(uplift_module, "fit_and_score", recording)
    settings = MetricSettings(uplift_real_per_class=5, uplift_ratios=[0.5, 2], uplift_repeats=2, uplift_cnn_steps=5)
    result = uplift(data, loaded, settings, seed=3)

    holdout = result["holdout"]
    held = np.array(holdout["rows"])
    assert holdout["num_rows"] == len(held) and holdout["fraction"] == 0.3 and holdout["seed"] == 3
    assert "stratified by class" in holdout["rule"] and "held-out rows" in holdout["caveat"]
    labels = data.all_labels()
    assert abs(len(held) - 0.3 * data.num_records) <= data.num_classes  # 0.3 of each class, rounded
    assert np.bincount(labels[held]).min() > 0
    # Per repeat: 5 real rows per class, none held out; every training (real only, then each ratio) starts with them.
    assert len(result["real_rows"]) == 2 and len(trainings) == 2 * 3
    for repeat, rows in enumerate(result["real_rows"]):
        rows = np.array(rows)
        assert len(rows) == 50 and np.intersect1d(rows, held).size == 0
        assert np.bincount(labels[rows]).tolist() == [5] * 10
        real_images = data.gather(rows)[0]
        for x, y, test_images in trainings[3 * repeat:3 * repeat + 3]:
            assert (x[:50] == real_images).all() and (y[:50] == labels[rows]).all()
            assert (test_images == data.gather(held)[0]).all()
        sizes = [len(x) - 50 for x, _, _ in trainings[3 * repeat:3 * repeat + 3]]
        assert sizes == [0, 25, 100]  # real only, then round(ratio x 50) synthetic rows
        balanced = trainings[3 * repeat + 2][1][50:]
        assert np.bincount(balanced, minlength=10).tolist() == [10] * 10  # class-balanced synthetic rows
    assert result["real_rows"][0] != result["real_rows"][1]  # each repeat draws its own real rows

    # The result's arithmetic: per-ratio means of paired differences, the best ratio's as `value`.
    real_only = result["real_only"]["accuracies"]
    for row in result["ratios"]:
        differences = np.array(row["accuracies"]) - np.array(real_only)
        assert row["uplift"] == pytest.approx(differences.mean())
        assert row["uplift_std_error"] == pytest.approx(differences.std(ddof=1) / np.sqrt(2))
    best = max(result["ratios"], key=lambda row: row["uplift"])
    assert (result["value"], result["uncertainty"], result["best_ratio"]) == \
        (best["uplift"], best["uplift_std_error"], best["ratio"])
    assert result["classifier"] == "cnn" and result["steps"] == 5 and result["seconds"] > 0
    json.dumps(result)  # evaluation.json and MLflow take it as it is



# Small enough for a test: 5 labelled digits per class, where real-only accuracy is about 83% and
# there is room to gain (measured with 3 repeats and ratios 1, 4: +0.056 ± 0.011 at ratio 4 after
# 500 steps); one ratio, two repeats (the fewest with a standard error), 150 CNN steps per training.
SMALL_UPLIFT: dict[str, Any] = {"uplift_real_per_class": 5, "uplift_ratios": [4], "uplift_cnn_steps": 150,
                                "uplift_repeats": 2}


def train_cgan(steps: int, name: str) -> Path:
    sets = [f"train.steps={steps}", f"train.run_name={name}", f"train.checkpoint_every={steps}",
            f"train.sample_every={steps}", "train.best_metric=none"]
    result = run_cli("train", str(ROOT / "configs" / "digits-cgan.yaml"), *[a for s in sets for a in ("--set", s)],
                     "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(last_json(result.stdout)["run_dir"])


@pytest.mark.slow
def test_a_trained_generator_adds_more_than_an_untrained_one_and_shuffled_labels_add_nothing() -> None:
    """The shipped conditional DCGAN after 500 steps (its digits are recognisable) against the same
    network untrained (noise): the trained one's uplift is higher beyond both uncertainties. The
    trained one is measured through `ganpipe evaluate` (which records it in the run), the others
    in this process (the same function, without another process start)."""
    run = train_cgan(500, "cgan-500")
    sets = [a for key, value in SMALL_UPLIFT.items() for a in ("--set", f"eval.{key}={json.dumps(value)}")]
    result = run_cli("evaluate", "--real", "builtin:digits", "--fake", str(run), "--metrics", "uplift", *sets, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    trained = last_json(result.stdout)["uplift"]
    assert "uplift: " in result.stdout and "(best ratio " in result.stdout
    # `ganpipe evaluate` of a run records it for registration, the whole table included.
    recorded = json.loads((run / "evaluation.json").read_text())["metrics"]["uplift"]
    assert recorded["ratios"] == trained["ratios"] and recorded["num_real"] == 50

    data = open_prepared(json.loads((run / "run.json").read_text())["data"]["location"])
    loaded = load_generator(str(run))
    torch.manual_seed(0)
    untrained = uplift(data, LoadedGenerator(build_generator(loaded.spec).eval(), loaded.spec, {}),
                       MetricSettings(**SMALL_UPLIFT))
    assert trained["value"] - untrained["value"] > math.hypot(trained["uncertainty"], untrained["uncertainty"]), \
        (trained, untrained)
    assert trained["value"] > 0 and trained["real_only"] == untrained["real_only"]  # same real rows, same seeds

    # The trained generator's images with their labels shuffled: data that cannot help.
    shuffled = uplift(data, loaded, MetricSettings(**SMALL_UPLIFT), shuffle_synthetic_labels=True)
    assert shuffled["value"] <= 0, shuffled["ratios"]
    assert shuffled["real_only"]["mean"] == pytest.approx(trained["real_only"]["mean"])


class ModeGenerator(torch.nn.Module):
    """A conditional 25-Gaussians generator without training: label -> that mode's mean plus the
    data's noise, in network space. `shift` sends each label to another mode: wrong labels."""

    def __init__(self, data: Any, shift: int):
        super().__init__()
        mean, std = data.vector_stats
        modes = [int(name) for name in data.classes]  # label id -> the `mode` value it names
        means = grid_means()[[modes[(i + shift) % 25] for i in range(25)]]
        self.register_buffer("centres", torch.from_numpy((means - mean) / std).float())
        self.register_buffer("noise", torch.from_numpy(0.05 / std).float())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.centres[y] + z[:, :2] * self.noise


@pytest.mark.parametrize("classifier", ["gboost", "logistic"])
def test_uplift_on_labelled_vectors(classifier: str) -> None:
    from ganpipe.networks import NetworkSpec

    data = open_prepared(ingest(DataConfig(source="builtin:gaussians25", kind="vector", columns=["x", "y"],
                                           label_column="mode")).location)
    mean, std = data.vector_stats
    spec = NetworkSpec("mlp", (2,), 2, num_classes=25, mean=tuple(mean.tolist()), std=tuple(std.tolist()),
                       columns=("x", "y"), classes=tuple(data.classes))
    settings = MetricSettings(uplift_real_per_class=10, uplift_ratios=[2.0], uplift_repeats=2, uplift_holdout_fraction=0.05,
                              uplift_classifier=classifier)
    right, wrong = (uplift(data, LoadedGenerator(ModeGenerator(data, shift), spec, {}), settings)
                    for shift in (0, 1))
    assert right["classifier"] == wrong["classifier"] == classifier and right["num_real"] == 250
    assert right["ratios"][0]["accuracy_mean"] > 0.95  # every mode, correctly labelled: near perfect
    assert right["value"] - wrong["value"] > 0.5  # every synthetic label wrong: most predictions wrong
    with pytest.raises(UserError, match="eval.uplift_classifier cnn: needs image data"):
        uplift(data, LoadedGenerator(ModeGenerator(data, 0), spec, {}), MetricSettings(uplift_classifier="cnn"))


# --- registry: gating on uplift, the per-ratio table and plot, `augment --ratio auto` -------------------


def uplift_result(value: float, uncertainty: float, best_ratio: float = 2.0) -> dict[str, Any]:
    """An uplift result as the metric writes it (the registry reads only what is here)."""
    ratios = [0.5, 1.0, 2.0, 4.0]
    table = [{"ratio": r, "num_synthetic": int(100 * r), "accuracy_mean": 0.80 + (value if r == best_ratio else 0.0),
              "accuracy_std_error": 0.01, "uplift": value if r == best_ratio else 0.0,
              "uplift_std_error": uncertainty, "accuracies": []} for r in ratios]
    return {"value": value, "uncertainty": uncertainty, "best_ratio": best_ratio, "ratios": table,
            "real_only": {"mean": 0.80, "std_error": 0.01, "accuracies": []}, "classifier": "cnn", "num_real": 100,
            "repeats": 3, "holdout": {"fraction": 0.3, "seed": 0, "num_rows": 540, "rule": "stratified by class",
                                      "caveat": "the generator may have seen them"}}


def evaluated_copy(run_dir: Path, dest: Path, perturb: int, uplift: dict[str, Any] | None) -> Path:
    """A copy of `run_dir` (another generator), promoted on uplift, with this evaluation (None: fd_domain only)."""
    run = copy_run(run_dir, dest, perturb=perturb,
                   config={"register": {"primary_metric": "uplift", "name": "uplift-gated"}})
    metrics = {"fd_domain": {"value": 5.0, "uncertainty": 0.1}} | ({"uplift": uplift} if uplift else {})
    (run / "evaluation.json").write_text(json.dumps({
        "status": "ok", "metrics": metrics, "failed": [], "num_samples": 200,
        "generator_sha256": storage.sha256_file(run / "generator" / "generator.safetensors")}))
    return run


def test_uplift_gates_promotion_and_each_version_records_its_table_and_plot(
        tiny_conditional_run: Path, tmp_path: Path) -> None:
    first = register_run(evaluated_copy(tiny_conditional_run, tmp_path / "v1", 1, uplift_result(0.010, 0.004)))
    assert first["aliases"] == ["champion"]
    # Higher is better: +0.030 beats +0.010 by 0.020, beyond the combined uncertainty hypot(0.004, 0.005) = 0.0064.
    higher = register_run(evaluated_copy(tiny_conditional_run, tmp_path / "v2", 2, uplift_result(0.030, 0.005, 4.0)))
    assert higher["aliases"] == ["champion"] and "higher is better" in higher["decision"]
    # Lower, and higher but within the combined uncertainty: challengers.
    lower = register_run(evaluated_copy(tiny_conditional_run, tmp_path / "v3", 3, uplift_result(0.000, 0.004)))
    within = register_run(evaluated_copy(tiny_conditional_run, tmp_path / "v4", 4, uplift_result(0.035, 0.010)))
    assert lower["aliases"] == within["aliases"] == ["challenger"]
    assert "required > 0.01118" in within["decision"]
    assert aliases_of("uplift-gated") == {"champion": 2, "challenger": 4}

    client = mlflow_client()
    version = client.get_model_version("uplift-gated", "2")
    assert float(version.tags["ganpipe.metric.uplift"]) == 0.030
    assert float(version.tags["ganpipe.metric.uplift.uncertainty"]) == 0.005
    assert float(version.tags[BEST_RATIO_TAG]) == 4.0
    assert "### Augmentation value" in version.description and "| 4 | 0.8300 ± 0.0100 | +0.0300 ± 0.0050 |" \
        in version.description
    folder = Path(client.download_artifacts(version.run_id, "registry/v2", str(tmp_path / "artifacts")))
    assert json.loads((folder / "uplift.json").read_text()) == uplift_result(0.030, 0.005, 4.0)
    from PIL import Image

    plot = np.asarray(Image.open(folder / "uplift.png").convert("L"))
    assert plot.shape == (300, 480) and plot.min() < 100 and (plot < 250).mean() > 0.02  # drawn, not blank


def test_augment_ratio_auto_takes_the_best_ratio_of_the_registered_version(
        tiny_conditional_run: Path, tmp_path: Path) -> None:
    register_run(evaluated_copy(tiny_conditional_run, tmp_path / "v1", 1, uplift_result(0.02, 0.005, 0.5)))
    result = run_cli("augment", "--real", "builtin:digits", "--synthetic", "models:/uplift-gated@champion",
                     "--ratio", "auto", "--out", str(tmp_path / "mixed"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = last_json(result.stdout)
    assert summary["ratio"] == 0.5 and (summary["num_real"], summary["num_synthetic"]) == (1797, round(0.5 * 1797))
    assert "--ratio auto: 0.5 synthetic rows per real row, the best ratio of models:/uplift-gated/1" in result.stderr
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert manifest["synthetic"]["model_uri"] == "models:/uplift-gated/1"  # pinned, whatever the alias does next

    # A version without an uplift measurement, and a run directory: exit 2, one line saying why.
    register_run(evaluated_copy(tiny_conditional_run, tmp_path / "v2", 2, None))
    for synthetic, message in (("models:/uplift-gated/2", "models:/uplift-gated/2 has no uplift measurement"),
                               (str(tiny_conditional_run), "needs --synthetic to be a registered model")):
        refused = run_cli("augment", "--real", "builtin:digits", "--synthetic", synthetic, "--ratio", "auto",
                          "--out", str(tmp_path / "refused"), "--json")
        assert refused.returncode == 2 and len(error_lines(refused.stderr)) == 1, refused.stderr[-2000:]
        assert message in error_lines(refused.stderr)[0]
    bad = run_cli("augment", "--real", "builtin:digits", "--synthetic", "models:/uplift-gated/1", "--ratio", "best",
                  "--out", str(tmp_path / "refused"))
    assert bad.returncode == 2 and "expected a number of synthetic rows per real row, or auto" in bad.stderr
    assert not (tmp_path / "refused").exists()

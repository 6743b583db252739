"""What a person scanning runs in the Prefect UI sees of a pipeline run: the `ganpipe-summary`
artifact with the uplift line and its pictures (the version's sample grid and, with `uplift`,
held-out accuracy against the synthetic ratio). The markdown is checked here directly; its
rendering in Prefect's UI (the default v2 and the v1 one) by a real `prefect server` on
127.0.0.1 and headless Chromium from Debian's packages (.ci/run installs it): each picture must
appear in the screenshot pixel for pixel, and a summary without pictures must show none."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from flows.pipeline import publish_summary, summary_markdown
from ganpipe.previews import BAND, BASELINE, BEST, SERIES, save_grid, save_uplift_plot
from tests.conftest import ROOT, free_port, wait_for_http
from tests.processes import start_logged, stop_process

RATIOS = [{"ratio": 0.5, "accuracy_mean": 0.958, "accuracy_std_error": 0.003, "uplift": 0.002},
          {"ratio": 1.0, "accuracy_mean": 0.965, "accuracy_std_error": 0.002, "uplift": 0.009},
          {"ratio": 2.0, "accuracy_mean": 0.968, "accuracy_std_error": 0.003, "uplift": 0.012},
          {"ratio": 4.0, "accuracy_mean": 0.951, "accuracy_std_error": 0.004, "uplift": -0.005}]
UPLIFT = {"value": 0.012, "uncertainty": 0.004, "real_only": {"mean": 0.956, "std_error": 0.0025},
          "ratios": RATIOS, "best_ratio": 2.0}
DATA_URI = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def digit_grid(path: Path, side: int = 32) -> Path:
    """64 real digits (scikit-learn's, enlarged to `side` px) as registration's grid would hold them."""
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:64] * 255 / 16).astype(np.uint8)
    factor = side // 8
    save_grid(torch.from_numpy(np.kron(digits, np.ones((factor, factor), np.uint8))[..., None]), path)
    return path


def make_summary(grid: Path | None, uplift: dict[str, Any] | None) -> dict[str, Any]:
    metrics = {"fd_domain": {"value": 12.3, "uncertainty": 0.4}} | ({"uplift": uplift} if uplift else {})
    return {"model_uri": "models:/tiny-digits/3", "version": 3, "name": "tiny-digits", "aliases": ["champion"],
            "decision": "first version with a fd_domain: champion", "metrics": metrics, "export": None,
            "run_dir": "/runs/x", "mlflow_run_id": "0123abcd", "data_fingerprint": "f00d",
            "sample_grid": str(grid) if grid else None}


def pictures(markdown: str) -> dict[str, np.ndarray]:
    """The images a markdown embeds, by alt text, as RGB arrays."""
    return {alt: np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            for alt, data in DATA_URI.findall(markdown)}


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --- the markdown ----------------------------------------------------------------------------------

def test_summary_shows_uplift_best_ratio_and_both_pictures(tmp_path: Path) -> None:
    grid = digit_grid(tmp_path / "samples.png")
    markdown = summary_markdown(make_summary(grid, UPLIFT), [])
    assert ("- uplift: +0.012 ± 0.004 accuracy; best ratio: 2x synthetic rows per real row "
            "(held-out accuracy 95.6% real only, 96.8% at best)") in markdown
    assert "## Pictures" in markdown and "**Samples of v3**" in markdown
    found = pictures(markdown)
    assert list(found) == ["samples of tiny-digits v3", "accuracy against synthetic ratio"]
    # The grid (274 px: under 512, over 256) as registered; the plot as save_uplift_plot draws it.
    assert np.array_equal(found["samples of tiny-digits v3"], rgb(grid))
    save_uplift_plot(RATIOS, UPLIFT["real_only"], tmp_path / "plot.png")
    assert np.array_equal(found["accuracy against synthetic ratio"], rgb(tmp_path / "plot.png"))
    assert len(markdown) < 60_000, "small enough to store in Prefect's database and send to every viewer"


def test_pictures_are_kept_small_and_big_enough_to_see(tmp_path: Path) -> None:
    small, large = digit_grid(tmp_path / "small.png", side=8), digit_grid(tmp_path / "large.png", side=128)
    assert Image.open(small).size == (82, 82) and Image.open(large).size == (1042, 1042)
    shown_small = pictures(summary_markdown(make_summary(small, None), []))["samples of tiny-digits v3"]
    shown_large = pictures(summary_markdown(make_summary(large, None), []))["samples of tiny-digits v3"]
    assert shown_small.shape == (328, 328, 3)  # 4x, pixel for pixel
    assert np.array_equal(shown_small[::4, ::4], rgb(small))
    assert shown_large.shape == (512, 512, 3)
    # Colour noise compresses worst: it is shrunk until its PNG fits in 200 KB.
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8))
    save_grid(noise, tmp_path / "noise.png")
    markdown = summary_markdown(make_summary(tmp_path / "noise.png", None), [])
    encoded = DATA_URI.search(markdown).group(2)
    assert len(base64.b64decode(encoded)) <= 200_000
    assert 128 < pictures(markdown)["samples of tiny-digits v3"].shape[0] < 512


def test_summary_without_uplift_or_grid_has_no_pictures(tmp_path: Path) -> None:
    markdown = summary_markdown(make_summary(None, None), [])
    assert "- uplift" not in markdown and "## Pictures" not in markdown and "data:image" not in markdown
    markdown = summary_markdown(make_summary(digit_grid(tmp_path / "g.png"), None), [])
    assert list(pictures(markdown)) == ["samples of tiny-digits v3"] and "- uplift" not in markdown


def test_failed_uplift_and_missing_grid_are_named_not_fatal(tmp_path: Path) -> None:
    failed = {"value": None, "error": "EvaluationFailed: data has no labels"}
    markdown = summary_markdown(make_summary(tmp_path / "gone.png", failed), [])
    assert "- uplift: n/a (EvaluationFailed: data has no labels)" in markdown
    assert "_sample grid unavailable: " in markdown and "gone.png" in markdown
    assert "data:image" not in markdown


def colour_mask(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 2) -> np.ndarray:
    return np.abs(image.astype(int) - colour).max(axis=2) <= tolerance


def test_uplift_plot_marks_the_best_ratio_against_the_real_only_band(tmp_path: Path) -> None:
    real_only = {"mean": 0.956, "std_error": 0.0025}
    save_uplift_plot(RATIOS, real_only, tmp_path / "helps.png")
    worse = [{**r, "accuracy_mean": r["accuracy_mean"] - 0.03} for r in RATIOS]
    save_uplift_plot(worse, real_only, tmp_path / "hurts.png")
    for name, above in (("helps.png", True), ("hurts.png", False)):
        plot = rgb(tmp_path / name)
        best_y = np.nonzero(colour_mask(plot, BEST))[0].mean()
        baseline_y = np.nonzero(colour_mask(plot, BASELINE))[0]
        band_ys, band_xs = np.nonzero(colour_mask(plot, BAND))
        assert band_xs.max() - band_xs.min() > 350, "the real-only band spans the plot"
        assert (best_y < baseline_y.min()) if above else (best_y > baseline_y.max()), name
        assert colour_mask(plot, SERIES).sum() > 200
    # A ratio without an accuracy (it failed) is left out: only the real-only point remains.
    save_uplift_plot([{"ratio": 1.0, "accuracy_mean": None}], real_only, tmp_path / "none.png")
    plot = rgb(tmp_path / "none.png")
    assert colour_mask(plot, BEST).sum() == 0 and colour_mask(plot, SERIES).sum() == 0
    assert colour_mask(plot, BASELINE).sum() > 100


# --- in Prefect's UI, in a real browser -------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `prefect server` with its UI on 127.0.0.1; the UI asks the API at PREFECT_API_URL."""
    root = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env = {**inherited, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = start_logged([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                           str(port), "--no-services"], env, root / "server.log", ROOT)
    try:
        wait_for_http(f"{url}/api/health", timeout=180)
        yield url
    finally:
        stop_process(server)


def published_summary(url: str, summary: dict[str, Any]) -> str:
    """Publish `summary` from a flow run against the server, as the pipeline does; its artifact id."""
    from prefect import flow, get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.test_flows import artifacts

    @flow(name="ganpipe-summary-in-the-ui")
    def publish() -> None:
        publish_summary(summary)

    with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
        state = publish(return_state=True)
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            return str(artifacts(client, state.state_details.flow_run_id)["ganpipe-summary"].id)


def screenshot(url: str, out: Path) -> tuple[np.ndarray, str]:
    """The page as headless Chromium renders it (1400x2000, once its scripts have settled), and
    its DOM then."""
    command = [CHROMIUM, "--headless=new", "--hide-scrollbars", f"--user-data-dir={out.with_suffix('')}-profile",
               "--dump-dom", f"--screenshot={out}", "--window-size=1400,2000", "--virtual-time-budget=15000", url]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root (CI containers)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
    return rgb(out), done.stdout


def locate(shot: np.ndarray, picture: np.ndarray, tolerance: int = 2, corner: int = 8) -> tuple[int, int] | None:
    """Where `picture` appears unscaled in `shot` (top-left y, x), or None: every pixel at least
    `corner` px from its edges within `tolerance` (a UI may round an image's corners). Candidate
    offsets from the centre pixel, narrowed by 400 sampled pixels, confirmed on the whole interior."""
    (sh, sw), (ph, pw) = shot.shape[:2], picture.shape[:2]
    if ph > sh or pw > sw:
        return None
    shot, picture = shot.astype(np.int16), picture.astype(np.int16)
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(corner, ph - corner, 400), rng.integers(corner, pw - corner, 400)
    ys[0], xs[0] = ph // 2, pw // 2
    cy, cx = np.nonzero(np.abs(shot - picture[ys[0], xs[0]]).max(axis=2) <= tolerance)
    oy, ox = cy - ys[0], cx - xs[0]
    keep = (oy >= 0) & (ox >= 0) & (oy + ph <= sh) & (ox + pw <= sw)
    oy, ox = oy[keep], ox[keep]
    for y, x in zip(ys[1:], xs[1:], strict=True):
        keep = np.abs(shot[oy + y, ox + x] - picture[y, x]).max(axis=1) <= tolerance
        oy, ox = oy[keep], ox[keep]
    inner = (slice(corner, ph - corner), slice(corner, pw - corner))
    for y, x in zip(oy, ox, strict=True):
        if np.abs(shot[y:y + ph, x:x + pw][inner] - picture[inner]).max() <= tolerance:
            return int(y), int(x)
    return None


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_prefect_ui_shows_the_summary_pictures(prefect_ui: str, tmp_path: Path) -> None:
    grid = digit_grid(tmp_path / "samples.png")
    save_uplift_plot(RATIOS, UPLIFT["real_only"], tmp_path / "plot.png")
    expected = {"grid": rgb(grid), "plot": rgb(tmp_path / "plot.png")}
    with_pictures = published_summary(prefect_ui, make_summary(grid, UPLIFT))
    without = published_summary(prefect_ui, make_summary(None, None))

    # The default UI (v2) and the v1 one, which /artifacts/... serves.
    for ui, prefix in (("v2", "/v2"), ("v1", "")):
        shot, dom = screenshot(f"{prefect_ui}{prefix}/artifacts/artifact/{with_pictures}", tmp_path / f"{ui}.png")
        assert "ganpipe pipeline: tiny-digits v3" in dom and "best ratio: 2x synthetic rows per real row" in dom
        assert dom.count("src=\"data:image/png;base64,") == 2
        places = {name: locate(shot, picture) for name, picture in expected.items()}
        assert None not in places.values(), f"{ui}: pictures not shown whole: {places} (see {tmp_path / ui}.png)"
        assert places["grid"][0] < places["plot"][0], "the grid above the plot"
        assert all(colour_mask(shot, colour).sum() > 100 for colour in (SERIES, BASELINE, BAND, BEST))
    # The control: the same page without pictures shows neither, nor the plot's colours.
    bare, dom = screenshot(f"{prefect_ui}/v2/artifacts/artifact/{without}", tmp_path / "bare.png")
    assert "ganpipe pipeline: tiny-digits v3" in dom and "data:image/png" not in dom
    assert [locate(bare, picture) for picture in expected.values()] == [None, None]
    assert all(colour_mask(bare, colour).sum() == 0 for colour in (SERIES, BASELINE, BAND, BEST))

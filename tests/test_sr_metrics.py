"""PSNR/SSIM parity: ganpipe.metrics.sr against BasicSR's `calculate_psnr` and `calculate_ssim`
(basicsr/metrics/psnr_ssim.py), the numbers super-resolution papers report.

Neither BasicSR nor scikit-image is installed, so the oracle below restates BasicSR's code path by
path, independently of ganpipe's: images in OpenCV's BGR order, `to_y_channel` through float32 as
`bgr2ycbcr(img / 255., y_only=True) * 255.`, the border cropped after the conversion, SSIM with
the 2-D 11x11 Gaussian window (sigma 1.5) applied as one correlation (cv2.filter2D; here
scipy.ndimage.correlate) and its 'valid' part kept ([5:-5, 5:-5]), per channel, then averaged.
ganpipe filters separably in float64 on RGB: the two must agree within 1e-4."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import correlate

from ganpipe.metrics.sr import psnr, ssim

TOLERANCE = 1e-4


def basicsr_to_y_channel(img_bgr: np.ndarray) -> np.ndarray:
    """BasicSR's to_y_channel: float32 in [0, 1], bgr2ycbcr's Y (BT.601, MATLAB's), back to 0..255."""
    img = img_bgr.astype(np.float32) / 255.0
    y = np.dot(img, [24.966, 128.553, 65.481]) + 16.0  # bgr2ycbcr(y_only=True) before its range conversion
    y = (y / 255.0).astype(np.float32)  # _convert_output_type_range to float32 in [0, 1]
    return y[..., None] * 255.0


def basicsr_prepare(img_bgr: np.ndarray, crop_border: int, test_y_channel: bool) -> np.ndarray:
    img = img_bgr
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        img = basicsr_to_y_channel(img)
    return img.astype(np.float64)


def basicsr_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool) -> float:
    img, img2 = basicsr_prepare(img, crop_border, test_y_channel), basicsr_prepare(img2, crop_border, test_y_channel)
    mse = np.mean((img - img2) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))


def basicsr_single_ssim(img: np.ndarray, img2: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = np.arange(11) - 5.0
    kernel = np.exp(-(x**2) / (2 * 1.5**2))
    kernel /= kernel.sum()  # cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel)

    def filter2d(a: np.ndarray) -> np.ndarray:
        return correlate(a, window, mode="reflect")[5:-5, 5:-5]

    mu1, mu2 = filter2d(img), filter2d(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = filter2d(img**2) - mu1_sq
    sigma2_sq = filter2d(img2**2) - mu2_sq
    sigma12 = filter2d(img * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


def basicsr_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool) -> float:
    img, img2 = basicsr_prepare(img, crop_border, test_y_channel), basicsr_prepare(img2, crop_border, test_y_channel)
    return float(np.mean([basicsr_single_ssim(img[..., i], img2[..., i]) for i in range(img.shape[2])]))


def photograph_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HR, restored) pairs as a super-resolution evaluation sees them: scikit-learn's two
    sample photographs (cropped to a multiple of 4) against their bicubic x4 down-and-up copies,
    and random noise against a perturbed copy."""
    from sklearn.datasets import load_sample_images

    pairs = []
    for name, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
        hr = np.ascontiguousarray(photo[:200, :300])
        small = Image.fromarray(hr).resize((75, 50), Image.Resampling.BICUBIC)
        pairs.append((name, hr, np.asarray(small.resize((300, 200), Image.Resampling.BICUBIC))))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    pairs.append(("noise", noise, np.clip(noise.astype(int) + rng.integers(-20, 21, noise.shape), 0, 255)
                  .astype(np.uint8)))
    return pairs


@pytest.mark.parametrize(("border", "y_channel"), [(0, False), (4, False), (2, True), (4, True)])
def test_psnr_and_ssim_equal_basicsr_within_1e_4_on_photographs_and_noise(border: int, y_channel: bool) -> None:
    for name, hr, restored in photograph_pairs():
        # BasicSR reads images with OpenCV (BGR); ganpipe holds them as RGB.
        hr_bgr, restored_bgr = hr[..., ::-1], restored[..., ::-1]
        ours_psnr, ref_psnr = psnr(restored, hr, border, y_channel), basicsr_psnr(restored_bgr, hr_bgr, border, y_channel)
        ours_ssim, ref_ssim = ssim(restored, hr, border, y_channel), basicsr_ssim(restored_bgr, hr_bgr, border, y_channel)
        assert abs(ours_psnr - ref_psnr) < TOLERANCE, (name, ours_psnr, ref_psnr)
        assert abs(ours_ssim - ref_ssim) < TOLERANCE, (name, ours_ssim, ref_ssim)
        # and the numbers are the ones a real evaluation gives (not a degenerate agreement)
        assert (15 < ours_psnr < 40 and 0.1 < ours_ssim < 0.99) if name != "noise" else ours_ssim < 0.99


def test_greyscale_images_are_measured_on_their_one_channel_y_or_not() -> None:
    _, hr, restored = photograph_pairs()[0]
    grey_hr, grey_restored = hr[..., 1:2], restored[..., 1:2]  # one channel: no Y conversion applies
    assert psnr(grey_restored, grey_hr, 4, True) == psnr(grey_restored, grey_hr, 4, False)
    assert abs(psnr(grey_restored, grey_hr, 4, True) - basicsr_psnr(grey_restored, grey_hr, 4, False)) < TOLERANCE
    assert abs(ssim(grey_restored, grey_hr, 4, True) - basicsr_ssim(grey_restored, grey_hr, 4, False)) < TOLERANCE


def test_identical_images_give_infinite_psnr_and_ssim_one_as_basicsr() -> None:
    _, hr, _ = photograph_pairs()[1]
    assert psnr(hr, hr, 4, True) == math.inf == basicsr_psnr(hr, hr, 4, True)
    assert ssim(hr, hr, 4, True) == pytest.approx(1.0, abs=1e-12)

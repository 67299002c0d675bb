"""pipeline.metrics: the measures of the benchmarks, on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.metrics import (
    appearance_distance,
    contact_sheet,
    correlation,
    loudness_envelope,
    mouth_opening,
    psnr,
    ssim,
    temporal_change,
)


def test_loudness_follows_the_amplitude():
    sr, fps = 16_000, 25
    t = np.arange(sr) / sr
    amplitude = np.repeat([0.01, 0.5], sr // 2)
    levels = loudness_envelope(amplitude * np.sin(2 * np.pi * 200 * t), sr, 25, fps)
    assert levels.shape == (25,)
    assert levels[:12].max() < -35 and levels[13:].min() > -10  # 0.01 -> -43 dB, 0.5 -> -9 dB RMS


def test_correlation_ignores_missing_frames():
    a = np.array([0, 1, 2, np.nan, 4, 5.0])
    assert correlation(a, 2 * np.nan_to_num(a)) == pytest.approx(1.0)
    assert correlation(a, -a) == pytest.approx(-1.0)
    assert np.isnan(correlation([1, 1, 1, 1], [1, 2, 3, 4]))


def test_psnr_ssim_and_change():
    rng = np.random.default_rng(0)
    a = rng.random((2, 32, 32, 3))
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert 20 < psnr(a, noisy) < 30
    assert ssim(a, noisy) < ssim(a, np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1)) < 1
    still = np.repeat(a[:1], 3, axis=0)
    assert temporal_change(still) == 0 and temporal_change(a) > 0.2


def test_appearance_distance_tells_images_apart():
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 200
    blue = red[..., ::-1].copy()
    assert appearance_distance(red, red) == 0
    assert appearance_distance(red, blue) == pytest.approx(2 * 200 / 3 / 255, abs=1e-3)


def _face(mouth_open: float) -> np.ndarray:
    """A drawn cartoon face with the mouth open by `mouth_open` (0..1) of its maximum."""
    image = Image.new("RGB", (192, 192), (90, 120, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((46, 26, 146, 166), fill=(225, 185, 160))
    for x in (72, 120):
        draw.ellipse((x - 9, 72, x + 9, 84), fill="white")
        draw.ellipse((x - 4, 74, x + 4, 82), fill=(40, 30, 20))
    draw.polygon([(96, 86), (88, 112), (104, 112)], fill=(205, 160, 140))
    gap = 2 + 20 * mouth_open
    draw.ellipse((78, 128 - gap / 2, 114, 128 + gap / 2), fill=(120, 30, 40))
    return np.asarray(image)


def test_mouth_opening_is_nan_without_a_face_and_grows_with_the_gap():
    values = mouth_opening([np.zeros((64, 64, 3), np.uint8)])
    assert values.shape == (1,) and np.isnan(values[0])
    opening = mouth_opening([_face(0.0), _face(1.0)])
    if np.isnan(opening).any():
        pytest.skip("FaceMesh finds no face in the drawn cartoon on this build")
    assert opening[1] > opening[0]


def test_contact_sheet_lays_out_rows():
    frames = [np.full((16, 16, 3), v, np.uint8) for v in (0, 255)]
    sheet = contact_sheet([frames, frames[:1]], size=8)
    assert sheet.size == (16, 16)
    assert np.asarray(sheet)[12, 12].tolist() == [255, 255, 255]  # the empty cell stays white
    assert np.asarray(sheet)[4, 12].tolist() == [255, 255, 255] and np.asarray(sheet)[4, 4].tolist() == [
        0,
        0,
        0,
    ]

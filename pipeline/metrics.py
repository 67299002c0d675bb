"""Measures of a generated talking video: lip-sync, identity, temporal stability, closeness to a reference output.

- `mouth_opening`: inner-lip gap over face height per frame (MediaPipe FaceMesh landmarks 13/14 and 10/152),
  NaN where no face is found; frames smaller than 128 px are upscaled first (FaceMesh misses small faces).
- `loudness_envelope`: RMS level (dB) of the audio in each video frame's interval.
- `lipsync_correlation`: Pearson r of the two over the frames where a face was found — the mouth of a
  well-synchronised talking video opens when the voice is loud (real GRID clips reach 0.4-0.65).
- `appearance_distance`: mean absolute difference of two images at 32 x 32 (colour layout, identity proxy).
- `temporal_change`: mean absolute frame-to-frame difference (flicker and motion).
- `psnr`, `ssim`: frames against reference frames (presets against the 40-step output).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

UPPER_LIP, LOWER_LIP, FOREHEAD, CHIN = 13, 14, 10, 152
MIN_MESH_SIZE = 128


def _as_uint8(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    return frame


def mouth_opening(frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(n, H, W, 3) frames (uint8, or floats in [0, 1]) -> (n,) lip gap / face height, NaN without a face."""
    import mediapipe as mp

    values = []
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1) as mesh:
        for frame in frames:
            rgb = _as_uint8(frame)
            side = min(rgb.shape[:2])
            if side < MIN_MESH_SIZE:
                scale = MIN_MESH_SIZE / side
                size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
                rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
            result = mesh.process(np.ascontiguousarray(rgb))
            if not result.multi_face_landmarks:
                values.append(np.nan)
                continue
            lm = result.multi_face_landmarks[0].landmark
            gap = np.hypot(lm[UPPER_LIP].x - lm[LOWER_LIP].x, lm[UPPER_LIP].y - lm[LOWER_LIP].y)
            face = np.hypot(lm[FOREHEAD].x - lm[CHIN].x, lm[FOREHEAD].y - lm[CHIN].y)
            values.append(gap / max(face, 1e-6))
    return np.asarray(values, dtype=np.float64)


def loudness_envelope(waveform: np.ndarray, sampling_rate: int, num_frames: int, fps: float) -> np.ndarray:
    """(samples,) -> (num_frames,) RMS level in dB of each frame's interval [i/fps, (i+1)/fps)."""
    waveform = np.asarray(waveform, dtype=np.float64)
    edges = np.round(np.arange(num_frames + 1) / fps * sampling_rate).astype(int)
    levels = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        chunk = waveform[start:end]
        rms = np.sqrt(np.mean(chunk**2)) if len(chunk) else 0.0
        levels.append(20 * np.log10(max(rms, 1e-5)))
    return np.asarray(levels)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the entries where both are finite (NaN with fewer than 3 or a constant series)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.std(a[keep]) == 0 or np.std(b[keep]) == 0:
        return float("nan")
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def lipsync_correlation(
    frames: Sequence[np.ndarray] | np.ndarray, waveform: np.ndarray, sampling_rate: int, fps: float
) -> float:
    """Correlation of the mouth opening of `frames` with the loudness of `waveform` (see the module doc)."""
    opening = mouth_opening(frames)
    return correlation(opening, loudness_envelope(waveform, sampling_rate, len(opening), fps))


def _small(image: np.ndarray, size: int = 32) -> np.ndarray:
    return (
        np.asarray(Image.fromarray(_as_uint8(image)).resize((size, size), Image.BILINEAR), np.float64) / 255
    )


def appearance_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute RGB difference of two images at 32 x 32, in [0, 1]."""
    return float(np.mean(np.abs(_small(a) - _small(b))))


def temporal_change(frames: Sequence[np.ndarray] | np.ndarray) -> float:
    """Mean absolute difference of consecutive frames (pixels in [0, 1])."""
    stack = np.stack([_as_uint8(f).astype(np.float64) / 255 for f in frames])
    if len(stack) < 2:
        return 0.0
    return float(np.mean(np.abs(np.diff(stack, axis=0))))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of frames in [0, 1] (or uint8)."""
    a = _as_uint8(a).astype(np.float64) / 255
    b = _as_uint8(b).astype(np.float64) / 255
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian blur over H and W of (..., H, W, C), reflected edges."""
    import torch
    import torch.nn.functional as F

    radius = int(3 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    kernel /= kernel.sum()
    shape = x.shape
    t = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *shape[-3:]).permute(0, 3, 1, 2)
    n, c = t.shape[:2]
    t = t.reshape(n * c, 1, *shape[-3:-1])
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return t.reshape(n, c, *shape[-3:-1]).permute(0, 2, 3, 1).reshape(shape).numpy()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of frames (..., H, W, 3) in [0, 1] or uint8 (Gaussian window, sigma 1.5)."""
    a = _as_uint8(a).astype(np.float64) / 255
    b = _as_uint8(b).astype(np.float64) / 255
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(np.mean(value))


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], size: int | None = None) -> Image.Image:
    """Rows of frames -> one image, frames side by side (resized to `size` when given)."""
    tiles = [[Image.fromarray(_as_uint8(f)) for f in row] for row in rows]
    side = size or max(t.size[0] for row in tiles for t in row)
    width = max(len(row) for row in tiles) * side
    sheet = Image.new("RGB", (width, len(tiles) * side), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile.resize((side, side), Image.BICUBIC), (c * side, r * side))
    return sheet

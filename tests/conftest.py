"""Shared test helpers: tiny pipelines and synthetic audio (no network, seconds on a CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import EmoPipeline, build_pipeline


@pytest.fixture(scope="module")
def one_thread():
    """Two CPU threads that other processes also want are slower than one (OpenMP spin-waits): a module's
    tests run on one (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def activate_zero_layers(pipe: EmoPipeline, seed: int = 0) -> EmoPipeline:
    """Give the zero-initialised EMO layers (audio/speed attention outputs, temporal proj_out, face locator
    output) small random weights, so that every conditioning path of a random tiny model has an effect."""
    generator = torch.Generator().manual_seed(seed)
    for name in ("denoising_unet", "face_locator"):
        for param in getattr(pipe, name).parameters():
            if param.ndim > 0 and not param.any():
                param.data = torch.randn(param.shape, generator=generator) * 0.2
    return pipe


def tiny_pipeline(seed: int = 0) -> EmoPipeline:
    torch.manual_seed(seed)
    pipe = activate_zero_layers(build_pipeline("tiny"), seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def speech_like(seconds: float, sampling_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-rate amplitude-modulated harmonic signal with a little noise (float32 mono)."""
    t = np.arange(round(seconds * sampling_rate)) / sampling_rate
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sampling_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2
    noise = np.random.default_rng(seed).normal(0, 0.02, t.shape)
    return (0.3 * voice * envelope + noise).astype(np.float32)


@pytest.fixture
def tiny_pipe() -> EmoPipeline:
    return tiny_pipeline()


@pytest.fixture
def portrait() -> np.ndarray:
    """A 32x32 RGB test image with some structure (no face: tests pass an explicit face mask)."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)

"""Auto levels (`pipeline.levels`, `behaviour.auto_levels`): the portrait stretched before the networks, the frames
mapped back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import speech_like, tiny_pipeline

from pipeline.behaviour import Behaviour
from pipeline.levels import MIN_SPAN, Levels

MASK = np.ones((32, 32), np.float32)


def dim_portrait() -> np.ndarray:
    """A 32x32 low-contrast, dark, reddish image: channels in 20..140, 10..110 and 5..85 of 255."""
    y, x = np.mgrid[0:32, 0:32]
    ramp = (x + y) / 62
    return (
        np.stack([20 + 120 * ramp, 10 + 100 * ramp, 5 + 80 * np.sin(3 * x / 31) ** 2], -1)
        .round()
        .astype(np.uint8)
    )


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_one_stretch_for_all_channels_spans_the_range_keeps_the_hue_and_restore_undoes_it():
    image = as_tensor(dim_portrait())
    levels = Levels.of(image, 1.0)
    # from the darkest channel's 1st percentile (blue, 5 of 255) to the brightest's 99th (red, near 140)
    assert abs(levels.low - 5 / 255) < 0.01 and abs(levels.low + levels.span - 140 / 255) < 0.04
    stretched = levels.stretch(image)
    assert stretched.min() == -1 and stretched.max() == 1
    assert stretched[0, 1].max() < 0.8  # green is not stretched to white on its own: the hue stays
    inside = ((stretched > -1) & (stretched < 1)).all(dim=1)[0]
    difference = (stretched[0, 0] - stretched[0, 1])[inside] / 2  # red minus green, in [0, 1] units
    assert torch.allclose(difference, (image[0, 0] - image[0, 1])[inside] / 2 / levels.span, atol=1e-5)
    frames = ((stretched[0].permute(1, 2, 0).numpy() + 1) / 2)[None].astype(np.float32)
    restored = levels.restore(frames)
    assert restored.dtype == np.float32
    original = (image[0].permute(1, 2, 0).numpy() + 1) / 2
    error = np.abs(restored[0] - original)
    assert np.quantile(error, 0.95) < 1e-5  # exact but for the pixels clipped at either end,
    assert error.max() < 0.04  # which move to the percentile


@pytest.mark.parametrize("grey", [120, 250])
def test_a_flat_portrait_is_not_blown_up_and_stays_in_range(grey):
    noise = np.random.default_rng(0).integers(-3, 4, (16, 16, 3))
    image = as_tensor((grey + noise).clip(0, 255).astype(np.uint8))
    levels = Levels.of(image, 1.0)
    assert levels.span == MIN_SPAN and 0 <= levels.low <= 1 - MIN_SPAN
    stretched = levels.stretch(image)
    assert stretched.min() >= -1 and stretched.max() < 1  # within range,
    # and the noise amplified 1 / MIN_SPAN = 4 times, not up to the full range
    assert float(stretched.max() - stretched.min()) <= 4 * float(image.max() - image.min()) + 1e-5 < 0.5


@pytest.mark.parametrize("percentile", [-1, 50, 70])
def test_the_switch_is_a_percentile_below_50(percentile):
    with pytest.raises(ValueError, match="auto_levels"):
        Behaviour(auto_levels=percentile)
    with pytest.raises(ValueError, match="percentile"):
        Levels.of(as_tensor(dim_portrait()), percentile if percentile > 0 else 0)


def test_the_pipeline_encodes_the_stretched_portrait_and_returns_frames_in_its_own_levels():
    pipe = tiny_pipeline()
    portrait = dim_portrait()
    args = dict(sampling_rate=16_000, face_mask=MASK, num_inference_steps=2, output_type="np")
    plain = pipe(portrait, speech_like(0.3), generator=torch.Generator().manual_seed(0), **args).frames
    pipe.register_to_config(behaviour=replace(pipe.behaviour, auto_levels=1.0).to_config())
    encoded = []
    encode = pipe.encode_image
    pipe.encode_image = lambda image: encoded.append(image.clone()) or encode(image)
    frames = pipe(portrait, speech_like(0.3), generator=torch.Generator().manual_seed(0), **args).frames
    assert frames.shape == plain.shape
    reference = encoded[0][0]  # the first image encoded is the portrait: stretched to the full range
    assert reference.max() == 1 and reference.min() == -1
    # the random tiny model's frames span most of [0, 1]; mapped back they lie within the portrait's levels
    levels = Levels.of(as_tensor(portrait), 1.0)
    assert plain.max() - plain.min() > 0.5
    assert levels.low - 1e-6 <= frames.min() < levels.low + 0.1
    assert levels.low + levels.span - 0.1 < frames.max() <= levels.low + levels.span + 1e-6

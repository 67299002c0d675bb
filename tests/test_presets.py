"""Speed presets: sampler, steps and guided steps, resolution against the model's defaults, pipeline runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import speech_like
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from emo_app.generate import GenerationSettings, InputError
from pipeline.pipeline_emo import resolve_settings
from pipeline.presets import PRESETS, get_preset, make_scheduler


def test_presets_follow_the_field():
    assert (PRESETS["quality"].sampler, PRESETS["quality"].num_inference_steps) == ("ddim", 40)
    assert (PRESETS["balanced"].sampler, PRESETS["balanced"].num_inference_steps) == ("dpmsolver++", 20)
    assert PRESETS["fast"].num_inference_steps == 10 and PRESETS["fast"].guidance_fraction == 0.5
    with pytest.raises(ValueError, match="unknown preset 'turbo'"):
        get_preset("turbo")


def test_scheduler_keeps_the_model_noise_schedule(tiny_pipe):
    base = tiny_pipe.scheduler.config
    dpm = make_scheduler("dpmsolver++", base)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.prediction_type == "v_prediction" and dpm.config.rescale_betas_zero_snr
    assert dpm.config.timestep_spacing == "trailing"
    assert isinstance(make_scheduler("ddim", base), DDIMScheduler)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler-x", base)
    # zero terminal SNR: the multistep solvers must still end finite
    for sampler in ("dpmsolver++", "unipc"):
        scheduler = make_scheduler(sampler, base)
        scheduler.set_timesteps(10)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(0.5 * x, t, x).prev_sample
        assert torch.isfinite(x).all(), sampler


def test_resolution_order():
    assert resolve_settings(None)["num_inference_steps"] == 40
    assert resolve_settings({"preset": "fast"})["num_inference_steps"] == 10
    assert resolve_settings({"preset": "fast"}, preset="balanced")["num_inference_steps"] == 20
    assert resolve_settings({"preset": "fast"}, num_inference_steps=7)["num_inference_steps"] == 7
    assert resolve_settings({"num_inference_steps": 30})["num_inference_steps"] == 30
    assert resolve_settings({"num_inference_steps": 30}, preset="quality")["num_inference_steps"] == 40
    # a model tuned to its own number of steps of a preset keeps them, until the caller picks a preset
    tuned = {"preset": "fast", "num_inference_steps": 8}
    assert resolve_settings(tuned)["num_inference_steps"] == 8
    assert resolve_settings(tuned, preset="fast")["num_inference_steps"] == 10
    assert resolve_settings(tuned, preset="balanced")["num_inference_steps"] == 20
    assert resolve_settings(tuned, num_inference_steps=5)["num_inference_steps"] == 5


def test_app_settings_take_the_preset():
    defaults = resolve_settings({"preset": "fast", "clip_length": 8})
    settings = GenerationSettings().with_model_defaults(defaults)
    assert (settings.preset, settings.steps, settings.clip_length) == ("fast", 10, 8)
    settings = GenerationSettings(preset="quality").with_model_defaults(defaults)
    assert (settings.preset, settings.steps) == ("quality", 40)
    with pytest.raises(InputError, match="preset must be one of quality, balanced, fast"):
        GenerationSettings(preset="turbo")


def test_fast_preset_runs_fewer_backbone_passes(tiny_pipe, portrait):
    calls = []
    forward = tiny_pipe.denoising_unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    tiny_pipe.denoising_unet.forward = counting
    common = dict(sampling_rate=16_000, clip_length=4, num_motion_frames=2, face_mask=np.ones((32, 32)),
                  output_type="np")  # fmt: skip
    audio = speech_like(0.16)  # 4 frames: one clip
    fast = tiny_pipe(portrait, audio, preset="fast", generator=torch.manual_seed(0), **common).frames
    assert calls == [2] * 5 + [1] * 5  # guided (2 branches batched) on the first half only
    calls.clear()
    balanced = tiny_pipe(portrait, audio, preset="balanced", generator=torch.manual_seed(0), **common).frames
    assert calls == [2] * 20
    assert fast.shape == balanced.shape == (4, 32, 32, 3)
    assert np.isfinite(fast).all() and not np.allclose(fast, balanced)


def test_preset_is_a_model_default(tiny_pipe, tmp_path):
    tiny_pipe.register_generation_defaults(preset="fast")
    tiny_pipe.save_pretrained(tmp_path)
    from emo_app.models import model_defaults
    from pipeline import EmoPipeline

    assert EmoPipeline.from_pretrained(tmp_path).resolved_defaults()["num_inference_steps"] == 10
    assert model_defaults(tmp_path)["preset"] == "fast"
    assert model_defaults(tmp_path, preset="balanced")["num_inference_steps"] == 20
    with pytest.raises(ValueError, match="unknown preset"):
        tiny_pipe.register_generation_defaults(preset="turbo")


def test_reference_keys_values_are_computed_once_per_clip(tiny_pipe, portrait):
    from pipeline.models.attention import Attention, context_cache

    block = next(m for n, m in tiny_pipe.denoising_unet.named_modules() if n.endswith("transformer_blocks.0"))
    calls = []
    block.attn2.to_k.register_forward_hook(lambda *_: calls.append(1))
    common = dict(sampling_rate=16_000, clip_length=4, num_motion_frames=2, face_mask=np.ones((32, 32)),
                  output_type="np", num_inference_steps=3)  # fmt: skip
    frames = tiny_pipe(
        portrait, speech_like(0.32), generator=torch.manual_seed(0), **common
    ).frames  # 2 clips
    assert len(calls) == 2  # once per clip, not once per step (3) or per frame
    assert not any(
        m._cached is not None for m in tiny_pipe.denoising_unet.modules() if isinstance(m, Attention)
    )
    # the cache changes nothing: the same call with the keys/values recomputed at every step
    from contextlib import nullcontext

    import pipeline.pipeline_emo as module

    module.context_cache = lambda model: nullcontext()
    try:
        again = tiny_pipe(portrait, speech_like(0.32), generator=torch.manual_seed(0), **common).frames
    finally:
        module.context_cache = context_cache
    np.testing.assert_allclose(frames, again, atol=1e-6)


def test_a_uint8_array_portrait_is_read_as_a_photo(tiny_pipe, portrait):
    """diffusers reads numpy images as floats in [0, 1]: a 0..255 photo array must give the PIL result."""
    from PIL import Image

    common = dict(sampling_rate=16_000, clip_length=4, num_motion_frames=2, face_mask=np.ones((32, 32)),
                  output_type="np", num_inference_steps=2)  # fmt: skip
    audio = speech_like(0.16)
    as_array = tiny_pipe(portrait, audio, generator=torch.manual_seed(0), **common).frames
    as_pil = tiny_pipe(Image.fromarray(portrait), audio, generator=torch.manual_seed(0), **common).frames
    as_float = tiny_pipe(portrait / 255.0, audio, generator=torch.manual_seed(0), **common).frames
    np.testing.assert_allclose(as_array, as_pil, atol=1e-6)
    np.testing.assert_allclose(as_float, as_pil, atol=1e-4)

"""EmoPipeline on a tiny random model: frame counts, determinism, save/load, efficiency switches, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import speech_like, tiny_pipeline

from pipeline import EmoPipeline
from pipeline.pipeline_emo import combine_guidance

MASK = np.ones((32, 32), np.float32)


def run(pipe: EmoPipeline, image: np.ndarray, seconds: float = 0.3, seed: int = 0, **kwargs):
    args = dict(
        sampling_rate=16_000,
        face_mask=MASK,
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    return pipe(image, speech_like(seconds), **(args | kwargs))


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.3, 8), (12 / 25, 12), (30 / 25, 30), (1.21, 31)],
    ids=["0.3s-partial-clip", "exactly-1-clip", "2.5-clips", "one-sample-past-30-frames"],
)
def test_video_has_one_frame_per_40ms_of_audio(tiny_pipe, portrait, seconds, expected):
    out = run(tiny_pipe, portrait, seconds)
    assert expected == math.ceil(round(seconds * 16000) / 16000 * 25 - 1e-6)
    assert out.frames.shape == (expected, 32, 32, 3)
    assert out.fps == 25 and out.sampling_rate == 16_000
    assert len(out.audio) == round(seconds * 16000)
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0


def test_fps_changes_the_frame_count(tiny_pipe, portrait):
    assert run(tiny_pipe, portrait, 0.5, fps=30).frames.shape[0] == 15


def test_same_generator_seed_gives_identical_frames(tiny_pipe, portrait):
    a = run(tiny_pipe, portrait, 0.6, seed=3).frames
    b = run(tiny_pipe, portrait, 0.6, seed=3).frames
    c = run(tiny_pipe, portrait, 0.6, seed=4).frames
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_output_types_hold_the_same_frames(tiny_pipe, portrait):
    np_frames = run(tiny_pipe, portrait, output_type="np").frames
    pil_frames = run(tiny_pipe, portrait, output_type="pil").frames
    pt_frames = run(tiny_pipe, portrait, output_type="pt").frames
    assert len(pil_frames) == 8 and pil_frames[0].size == (32, 32)
    np.testing.assert_allclose(np.asarray(pil_frames[3]) / 255.0, np_frames[3], atol=1 / 255 + 1e-6)
    assert pt_frames.shape == (8, 3, 32, 32)
    np.testing.assert_allclose(pt_frames.permute(0, 2, 3, 1).numpy(), np_frames)


def test_streaming_output_delivers_uint8_clips_and_keeps_nothing(tiny_pipe, portrait):
    clips = []
    out = run(
        tiny_pipe, portrait, 30 / 25, output_type="none",
        callback_on_clip_end=lambda pipe, i, n, frames: clips.append((i, n, frames)),
    )  # fmt: skip
    assert out.frames is None
    assert [(i, n, f.shape[0]) for i, n, f in clips] == [(0, 3, 12), (1, 3, 12), (2, 3, 6)]
    assert all(f.dtype == np.uint8 and f.shape[1:] == (32, 32, 3) for _, _, f in clips)
    full = run(tiny_pipe, portrait, 30 / 25).frames
    np.testing.assert_allclose(np.concatenate([f for *_, f in clips]) / 255.0, full, atol=1 / 255 + 1e-6)


def test_reference_net_runs_once_per_clip_not_per_step(tiny_pipe, portrait):
    calls = []
    tiny_pipe.reference_net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    steps = []
    tiny_pipe.denoising_unet.register_forward_hook(lambda module, args, out: steps.append(1))
    run(tiny_pipe, portrait, 30 / 25, num_inference_steps=3)
    # clip 1: the reference image (motion frames are zero maps); clips 2, 3: the 4 motion frames
    assert calls == [1, 4, 4]
    assert len(steps) == 3 * 3


def test_batched_guidance_equals_one_pass_per_branch(tiny_pipe, portrait):
    kwargs = dict(guidance_scale=3.5, reference_guidance_scale=2.0)
    batched = run(tiny_pipe, portrait, 0.6, **kwargs).frames
    tiny_pipe.batch_guidance = False
    separate = run(tiny_pipe, portrait, 0.6, **kwargs).frames
    np.testing.assert_allclose(batched, separate, atol=1e-5)


def test_guidance_scales_change_the_video(tiny_pipe, portrait):
    base = run(tiny_pipe, portrait, guidance_scale=1.0).frames
    audio = run(tiny_pipe, portrait, guidance_scale=4.0).frames
    reference = run(tiny_pipe, portrait, guidance_scale=1.0, reference_guidance_scale=3.0).frames
    assert np.abs(base - audio).mean() > 1e-4
    assert np.abs(base - reference).mean() > 1e-4


def test_combine_guidance_formula():
    full, no_audio, none = torch.tensor(5.0), torch.tensor(3.0), torch.tensor(1.0)
    assert combine_guidance([full], 1.0, 1.0) == full
    assert combine_guidance([full, no_audio], 2.0, 1.0) == 3.0 + 2.0 * 2.0
    assert combine_guidance([full, none], 1.0, 2.0) == 1.0 + 2.0 * 4.0
    assert combine_guidance([full, no_audio, none], 2.0, 3.0) == 1.0 + 3.0 * 2.0 + 2.0 * 2.0


def test_attention_slicing_matches_sdpa(tiny_pipe, portrait):
    plain = run(tiny_pipe, portrait, 0.6).frames
    tiny_pipe.enable_attention_slicing("max")
    assert {m.slice_size for m in tiny_pipe.denoising_unet.modules() if hasattr(m, "slice_size")} == {1}
    sliced = run(tiny_pipe, portrait, 0.6).frames
    tiny_pipe.vae.enable_slicing()
    vae_sliced = run(tiny_pipe, portrait, 0.6).frames
    np.testing.assert_allclose(plain, sliced, atol=1e-5)
    np.testing.assert_allclose(plain, vae_sliced, atol=1e-5)


def test_motion_frames_carry_the_previous_clip_into_the_next(tiny_pipe, portrait):
    def nudge_first_clip(pipe, step, t, kwargs):
        if step == 1:  # last step of clip 1
            return {"latents": kwargs["latents"] + 1.0}
        return kwargs

    seconds = 24 / 25
    base = run(tiny_pipe, portrait, seconds).frames
    nudged = run(tiny_pipe, portrait, seconds, callback_on_step_end=nudge_first_clip).frames
    assert np.abs(base[:12] - nudged[:12]).mean() > 1e-3  # the nudge changed clip 1 ...
    assert np.abs(base[12:] - nudged[12:]).mean() > 1e-4  # ... and, through its motion frames, clip 2

    no_motion = dict(num_motion_frames=0)
    base = run(tiny_pipe, portrait, seconds, **no_motion).frames
    nudged = run(tiny_pipe, portrait, seconds, callback_on_step_end=nudge_first_clip, **no_motion).frames
    np.testing.assert_allclose(
        base[12:], nudged[12:], atol=1e-6
    )  # without motion frames clips are independent


def test_audio_and_head_speed_condition_the_frames(tiny_pipe, portrait):
    base = run(tiny_pipe, portrait, 0.48).frames
    silent = tiny_pipe(portrait, np.zeros(7680, np.float32), sampling_rate=16_000, face_mask=MASK,
                       num_inference_steps=2, output_type="np",
                       generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    fast = run(tiny_pipe, portrait, 0.48, head_speed=2.0).frames
    per_frame = run(tiny_pipe, portrait, 0.48, head_speed=[1.0] * 12).frames
    assert np.abs(base - silent).mean() > 1e-4
    assert np.abs(base - fast).mean() > 1e-4
    np.testing.assert_allclose(base, per_frame, atol=1e-6)  # a constant list equals the scalar


def test_interrupt_keeps_finished_clips(tiny_pipe, portrait):
    def stop_in_second_clip(pipe, step, t, kwargs):
        if step == 2:
            pipe.interrupt()
        return kwargs

    out = run(tiny_pipe, portrait, 30 / 25, callback_on_step_end=stop_in_second_clip)
    assert out.frames.shape[0] == 12


def test_audio_file_path_is_accepted(tiny_pipe, portrait, tmp_path):
    from pipeline.audio import write_wav

    path = write_wav(tmp_path / "a.wav", speech_like(0.5, 22_050), 22_050)
    out = tiny_pipe(portrait, str(path), face_mask=MASK, num_inference_steps=1, output_type="np")
    assert out.frames.shape[0] == math.ceil(0.5 * 25)
    assert abs(len(out.audio) - 8000) <= 2


def test_save_and_load_round_trip_gives_identical_frames(tiny_pipe, portrait, tmp_path):
    before = run(tiny_pipe, portrait, 0.6).frames
    tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = EmoPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.reference_net).__name__ == "ReferenceNet"
    np.testing.assert_array_equal(before, run(loaded, portrait, 0.6).frames)


def test_model_folder_generation_defaults_drive_a_call_and_survive_save(portrait, tmp_path):
    pipe = tiny_pipeline()
    pipe.register_generation_defaults(fps=10, clip_length=4, num_motion_frames=2, num_inference_steps=3)
    pipe.save_pretrained(tmp_path / "model")
    loaded = EmoPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.resolved_defaults()["clip_length"] == 4
    assert loaded.resolved_defaults(clip_length=6)["clip_length"] == 6  # an argument wins
    steps = []
    out = loaded(
        portrait, speech_like(1.0), sampling_rate=16_000, face_mask=MASK, output_type="np",
        callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw,
    )  # fmt: skip
    assert out.fps == 10 and out.frames.shape[0] == 10  # 1 s at the model's 10 fps
    assert steps == list(range(3 * 3))  # ceil(10 / 4) = 3 clips x the model's 3 steps
    with pytest.raises(ValueError, match="unknown generation defaults"):
        loaded.register_generation_defaults(steps=3)


def test_fp16_variant_and_dtype_round_trip(tiny_pipe, portrait, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model", variant="fp16")
    assert (tmp_path / "model" / "denoising_unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = EmoPipeline.from_pretrained(tmp_path / "model", variant="fp16", dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.denoising_unet.dtype == torch.bfloat16
    for name in ("denoising_unet", "reference_net", "audio_projection"):
        original = getattr(tiny_pipe, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            torch.testing.assert_close(value, original[key].to(torch.float16).to(torch.bfloat16))
    frames = run(loaded, portrait, 0.3).frames
    reference = run(tiny_pipe, portrait, 0.3).frames
    assert frames.shape == reference.shape and np.isfinite(frames).all()
    assert np.abs(frames - reference).mean() < 0.05  # bf16 compute stays close to fp32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, "`num_inference_steps` must be a positive integer, got 0"),
        ({"height": 30}, "`height` must be a positive multiple of 4, got 30"),
        ({"fps": -1}, "`fps` must be a positive number"),
        ({"guidance_scale": -2}, "`guidance_scale` must be a number >= 0, got -2"),
        ({"clip_length": 30}, "`clip_length` + `num_motion_frames` must be <= 32"),
        ({"num_motion_frames": 20}, "`num_motion_frames` must be an integer in [0, clip_length=12], got 20"),
        ({"head_speed": -1.0}, "`head_speed` must be a number >= 0"),
        ({"head_speed": [1.0, 2.0]}, "`head_speed` has 2 values but the video has 8 frames"),
        ({"output_type": "gif"}, "`output_type` must be one of"),
        ({"sampling_rate": None}, "`sampling_rate` must be a positive rate in Hz"),
        ({"face_mask": np.ones((2, 3, 4))}, "`face_mask` must be a 2-D (H, W) mask"),
    ],
)
def test_bad_arguments_raise_a_clear_error(tiny_pipe, portrait, kwargs, message):
    with pytest.raises(ValueError) as info:
        run(tiny_pipe, portrait, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("image", "audio", "message"),
    [
        ("photo.png", np.zeros(100, np.float32), "`reference_image` must be a PIL image"),
        (None, np.zeros((2, 100), np.float32), "`audio` array must be 1-D"),
        (None, np.zeros(0, np.float32), "`audio` is empty"),
        (None, "/nonexistent/voice.wav", "`audio` file not found: '/nonexistent/voice.wav'"),
        (None, 42, "`audio` must be a file path or a 1-D array, got int"),
    ],
)
def test_bad_inputs_raise_a_clear_error(tiny_pipe, portrait, image, audio, message):
    with pytest.raises(ValueError) as info:
        tiny_pipe(portrait if image is None else image, audio, sampling_rate=16_000, face_mask=MASK)
    assert message in str(info.value)


def test_default_face_mask_comes_from_the_reference_face(portrait):
    pipe = tiny_pipeline()
    face = pytest.importorskip("skimage.data").astronaut()
    mask = pipe.prepare_face_mask(None, __import__("PIL.Image").Image.fromarray(face), 512, 512, "cpu")[0, 0]
    assert 0.05 < mask.mean() < 0.6  # a box around the face, not the whole image
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert 150 < xs.float().mean() < 300 and 40 < ys.float().mean() < 200  # astronaut's face region
    flat = pipe.prepare_face_mask(
        None, __import__("PIL.Image").Image.new("RGB", (64, 64), "gray"), 32, 32, "cpu"
    )
    assert flat.shape == (1, 1, 32, 32) and flat.min() == 1.0  # no face: all ones (move anywhere)

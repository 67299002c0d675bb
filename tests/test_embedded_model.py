"""The shipped model (assets/models/emo-small), run here on the CPU: what it reaches, and what it does not yet.

Each figure is measured by running the model; thresholds sit just below what it reached when it was trained
(its model card quotes the figures). Goals it does not reach on this portrait are expected failures (strict),
so this file fails the day a retrained model reaches them and the test must be promoted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_app.models import EMBEDDED_MODEL_DIR
from pipeline import EmoPipeline
from pipeline.audio import load_audio
from pipeline.face import crop_face
from pipeline.metrics import appearance_distance, correlation, loudness_envelope, mouth_opening

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
SR = 16_000


@pytest.fixture(scope="module")
def pipe() -> EmoPipeline:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = EmoPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def portraits(pipe) -> dict[str, np.ndarray]:
    """The example portrait, and a second person made from it: mirrored, with red and blue swapped."""
    crop = np.asarray(crop_face(EXAMPLES / "portrait.png", size=pipe.default_size).image)
    return {"astronaut": crop, "other": np.ascontiguousarray(crop[:, ::-1, ::-1])}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1 s of silence, then the example sentence (3 s)."""
    voice = load_audio(EXAMPLES / "speech.wav", sampling_rate=SR, mono=True).mono
    return np.concatenate([np.zeros(SR, np.float32), voice])


@pytest.fixture(scope="module")
def videos(pipe, portraits, speech) -> dict[str, np.ndarray]:
    return {
        name: pipe(image, speech, sampling_rate=SR, output_type="np", generator=torch.manual_seed(0)).frames
        for name, image in portraits.items()
    }


def test_it_is_the_small_real_data_model(pipe):
    assert pipe.default_size >= 128
    assert type(pipe.audio_encoder).__name__ == "MelAudioEncoder"
    assert pipe.resolved_defaults()["preset"] == "fast"
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.rglob("*.safetensors"))
    assert size <= 60e6


def distances(videos, portraits, name: str) -> tuple[float, float]:
    """Mean 32x32 colour distance of the video of `name` to its own portrait and to the other one."""
    other = next(n for n in portraits if n != name)
    own = np.mean([appearance_distance(f, portraits[name]) for f in videos[name][::10]])
    foreign = np.mean([appearance_distance(f, portraits[other]) for f in videos[name][::10]])
    print(f"{name}: distance to its portrait {own:.3f}, to the other {foreign:.3f}")
    return own, foreign


def test_the_video_follows_the_portrait(videos, portraits):
    own, foreign = distances(videos, portraits, "astronaut")
    assert own < 0.5 * foreign  # measured: 0.023 vs 0.180 (the previous model: 0.052 vs 0.181)


def test_the_video_follows_a_portrait_unlike_its_training_data(videos, portraits):
    own, foreign = distances(videos, portraits, "other")
    assert own < 0.75 * foreign  # measured: 0.022 vs 0.184 (the previous model: 0.087 vs 0.161)


def mouth_figures(video: np.ndarray, speech: np.ndarray) -> tuple[np.ndarray, float]:
    opening = mouth_opening(video)
    r = correlation(opening, loudness_envelope(speech, SR, len(video), 25.0))
    print(f"lip-sync r {r:.3f}; mouth opening in silence {np.nanmean(opening[5:22]):.4f}, "
          f"in speech {np.nanmean(opening[30:]):.4f}; face found in {np.isfinite(opening).mean():.0%} of frames")  # fmt: skip
    return opening, r


def test_mediapipe_finds_a_face_in_the_generated_frames(videos, speech):
    opening, _ = mouth_figures(videos["astronaut"], speech)
    assert np.isfinite(opening).mean() > 0.6  # measured here: 100 % (the previous model: 0 %)


def test_the_mouth_follows_the_voice_and_rests_in_silence(videos, speech):
    opening, r = mouth_figures(videos["astronaut"], speech)
    assert r > 0.25  # measured here: 0.47 (speech 0.0138 of the face height, silence 0.0068)
    assert np.nanmean(opening[30:]) > 1.2 * np.nanmean(opening[5:22])


def test_frames_are_stable_and_sized(videos, pipe, speech):
    video = videos["astronaut"]
    frames = math.ceil(len(speech) / SR * 25)
    assert video.shape == (frames, pipe.default_size, pipe.default_size, 3)
    change = np.abs(np.diff(video, axis=0)).mean()
    print(f"frame-to-frame change {change:.4f}")
    assert change < 0.03  # measured here 0.0062; benchmarks/eval_embedded.py: 0.0054 (real video 0.0056)


def test_a_dim_photo_comes_out_as_clean_and_keeps_its_exposure(pipe, portraits, speech):
    """The astronaut at 45 % of its brightness (a photo taken in a dim room), 2 s of the sentence: the model's auto
    levels stretch it before the networks and map the frames back. Measured here: face found in 100 % of the
    frames, colour distance to the dim photo 0.010, lip-sync r 0.84; the same model without auto levels: 36 %,
    0.032 and 0.24 (patchy frames, brighter than the photo)."""
    assert pipe.behaviour.auto_levels > 0
    dim = (portraits["astronaut"] * 0.45).round().astype(np.uint8)
    voice = speech[SR : 3 * SR]
    frames = pipe(dim, voice, sampling_rate=SR, output_type="np", generator=torch.manual_seed(0)).frames
    opening = mouth_opening(frames)
    distance = np.mean([appearance_distance(f, dim) for f in frames[::5]])
    r = correlation(opening, loudness_envelope(voice, SR, len(frames), 25.0))
    print(f"dim photo: face found in {np.isfinite(opening).mean():.0%}, distance {distance:.4f}, r {r:.2f}, "
          f"mean level {frames.mean():.3f} (the photo {dim.mean() / 255:.3f})")  # fmt: skip
    assert np.isfinite(opening).mean() > 0.9
    assert distance < 0.02
    assert abs(frames.mean() - dim.mean() / 255) < 0.01  # measured 0.253 against 0.254; without: 0.282
    assert r > 0.4

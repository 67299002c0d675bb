"""emo_app.generate: portrait + audio files -> streamed mp4, with progress, cancel and paste-back."""

import threading

import pytest
import torch
from conftest import speech_like
from PIL import Image
from skimage import data

from emo_app.generate import GenerationSettings, InputError, estimate, generate
from emo_app.video import probe_video
from pipeline import build_pipeline
from pipeline.audio import write_wav

AUDIO_SECONDS = 0.6
AUDIO_RATE = 44_100  # Hz: not the model's 16 kHz, so the muxed track shows which audio was used
FPS = 25
NUM_FRAMES = 15  # ceil(0.6 s x 25 fps)
NUM_CLIPS = 2  # 12 + 3 frames
STEPS = 2
ONE_FRAME = 1 / FPS  # seconds


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(portrait png, 0.6 s wav at 44.1 kHz, 501x381 photo png): scikit-image's astronaut has a detectable face."""
    folder = tmp_path_factory.mktemp("inputs")
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder / "portrait.png")
    Image.fromarray(astronaut[:381, :501]).save(folder / "odd.png")
    write_wav(folder / "speech.wav", speech_like(AUDIO_SECONDS, AUDIO_RATE), AUDIO_RATE)
    return folder / "portrait.png", folder / "speech.wav", folder / "odd.png"


def test_generate_makes_one_frame_per_40ms_with_the_original_soundtrack(pipe, files, tmp_path):
    portrait, speech, _ = files
    calls = []
    result = generate(
        pipe,
        portrait,
        speech,
        tmp_path / "out.mp4",
        GenerationSettings(steps=STEPS, seed=7, fps=FPS),
        progress=lambda *args: calls.append(args),
    )
    assert (result.num_frames, result.seed, result.cancelled) == (NUM_FRAMES, 7, False)
    assert result.duration_s == pytest.approx(NUM_FRAMES / FPS)
    assert result.seconds > 0
    info = probe_video(result.path)
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (info.width, info.height, info.num_frames) == (pipe.default_size, pipe.default_size, NUM_FRAMES)
    assert info.audio_sample_rate == AUDIO_RATE  # the original file, not the 16 kHz copy
    assert abs(info.audio_duration - AUDIO_SECONDS) < ONE_FRAME
    # progress(clip_index, num_clips, step_in_clip, steps) once per denoising step: steps x clips calls
    assert calls == [(c, NUM_CLIPS, s, STEPS) for c in range(NUM_CLIPS) for s in range(1, STEPS + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary files left


def test_estimate_counts_frames_and_clips_before_generating(pipe, files):
    _, speech, _ = files
    got = estimate(pipe, speech, GenerationSettings(fps=FPS))
    assert got == {
        "duration_s": pytest.approx(AUDIO_SECONDS),
        "num_frames": NUM_FRAMES,
        "num_clips": NUM_CLIPS,
        "resolution": 32,
    }
    assert estimate(pipe, speech, GenerationSettings(fps=30))["num_frames"] == 18
    with pytest.raises(
        InputError, match=r"longer than the 0.5 s limit: trim the audio or raise max_duration"
    ):
        estimate(pipe, speech, GenerationSettings(max_duration=0.5))


def test_cancel_after_first_clip_keeps_the_existing_file_and_leaves_no_other(pipe, files, tmp_path):
    portrait, speech, _ = files
    output = tmp_path / "out.mp4"
    output.write_bytes(b"previous video")
    cancel = threading.Event()
    calls = []

    def progress(clip: int, num_clips: int, step: int, steps: int) -> None:
        calls.append((clip, step))
        if clip == 0 and step == steps:
            cancel.set()

    result = generate(
        pipe, portrait, speech, output, GenerationSettings(steps=STEPS), progress=progress, cancel=cancel
    )
    assert result.cancelled
    assert calls == [(0, 1), (0, 2)]  # the second clip never started
    assert 0 <= result.seed < 2**31  # drawn, since settings.seed was None
    assert output.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_paste_back_video_has_the_photo_size_rounded_up_to_even(pipe, files, tmp_path):
    _, speech, odd_photo = files
    settings = GenerationSettings(steps=1, seed=0, guidance_scale=1.0, paste_back=True)
    result = generate(pipe, Image.open(odd_photo), speech, tmp_path / "pasted.mp4", settings)
    info = probe_video(result.path)
    assert (info.width, info.height, info.num_frames) == (
        502,
        382,
        NUM_FRAMES,
    )  # 501x381 padded by the writer


def test_photo_without_face_raises_input_error_and_writes_nothing(pipe, files, tmp_path):
    _, speech, _ = files
    with pytest.raises(InputError, match="No face found in the portrait: use a well-lit, front-facing photo"):
        generate(
            pipe, Image.fromarray(data.coffee()), speech, tmp_path / "out.mp4", GenerationSettings(steps=1)
        )
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_not_an_mp4_file_name_raises_input_error(pipe, files, tmp_path):
    portrait, speech, _ = files
    for output in (tmp_path, tmp_path / "video.avi"):
        with pytest.raises(InputError, match=r"is not an \.mp4 file name: give one like 'talking.mp4'"):
            generate(pipe, portrait, speech, output, GenerationSettings(steps=1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("fps", 0), ("head_speed", -1.0), ("max_duration", 0), ("mask_expand", 0.5)],
)
def test_settings_out_of_range_raise_input_error_naming_the_field(field, value):
    with pytest.raises(InputError, match=f"^{field} must be .*, got {value}"):
        GenerationSettings(**{field: value})


def test_settings_left_unset_take_the_models_defaults(files, tmp_path):
    portrait, speech, _ = files
    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.register_generation_defaults(num_inference_steps=1, clip_length=8, fps=20)
    calls = []
    result = generate(
        pipe,
        portrait,
        speech,
        tmp_path / "out.mp4",
        GenerationSettings(seed=0),
        progress=lambda *a: calls.append(a),
    )
    assert result.num_frames == 12  # 0.6 s at the model's 20 fps
    assert calls == [(0, 2, 1, 1), (1, 2, 1, 1)]  # 2 clips of 8 frames, 1 step each
    explicit = GenerationSettings(steps=2, fps=25).with_model_defaults(pipe.resolved_defaults())
    assert (explicit.steps, explicit.fps, explicit.clip_length) == (2, 25, 8)


def test_settings_take_crop_and_mask_defaults_from_pipeline_face():
    settings = GenerationSettings()
    assert (settings.crop_margin, settings.mask_expand) == (0.6, 1.2)

"""The Gradio app, served on 127.0.0.1 with a tiny random model and driven over HTTP with gradio_client."""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from emo_app.models import describe_model, load_pipeline
from emo_app.ui import EXAMPLES, build_demo, estimate_markdown, model_markdown
from emo_app.video import probe_video
from pipeline import build_pipeline
from pipeline.audio import load_audio, write_wav
from pipeline.face import detect_faces

PORTRAIT, SPEECH = (Path(path) for path in EXAMPLES[0])
FAST = dict(steps=2, guidance=3.5, head_speed=1.0, seed=7, random_seed=False, paste_back=False, max_length=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEVICE_CALLS = []  # one entry per generation request that went through the `run_on_device` decorator


def count_calls(fn):
    """A wrapping decorator like `spaces.GPU`: the app must keep working through it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        DEVICE_CALLS.append(fn.__name__)
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app with a tiny model (32x32 frames), served in this process on a free loopback port."""
    model_dir = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    build_pipeline("tiny").save_pretrained(model_dir)
    pipe = load_pipeline(model_dir, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(pipe, describe_model(pipe, model_dir), run_on_device=count_calls)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory) -> Path:
    """The first 0.5 s of the example sentence: 13 frames at 25 fps, two clips."""
    speech = load_audio(SPEECH)
    half_second = speech.samples[:, : speech.sampling_rate // 2]
    return write_wav(tmp_path_factory.mktemp("audio") / "half_second.wav", half_second, speech.sampling_rate)


def generate(client: Client, image: Path, audio: Path, **settings):
    return client.predict(
        handle_file(str(image)), handle_file(str(audio)), **(FAST | settings), api_name="/generate"
    )


def test_generation_returns_mp4_with_h264_video_and_aac_audio(app_url, short_speech):
    calls = len(DEVICE_CALLS)
    video, summary = generate(Client(app_url, verbose=False), PORTRAIT, short_speech)
    assert len(DEVICE_CALLS) == calls + 1  # through the run_on_device decorator
    info = probe_video(video)
    assert (info.width, info.height, info.num_frames, info.fps) == (32, 32, 13, 25)
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert info.audio_duration == pytest.approx(13 / 25, abs=0.03)
    assert "Seed **7**" in summary and "13 frames" in summary


def test_photo_without_face_shows_the_message_and_the_next_request_works(app_url, short_speech, tmp_path):
    no_face = tmp_path / "gradient.png"
    ramp = np.linspace(0, 255, 128, dtype=np.uint8)
    Image.fromarray(np.stack(np.broadcast_arrays(ramp[None], ramp[:, None], 128), -1).astype(np.uint8)).save(
        no_face
    )
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="No face found in the portrait"):
        generate(client, no_face, short_speech)
    video, _ = generate(client, PORTRAIT, short_speech)
    assert probe_video(video).num_frames == 13


def test_cancel_stops_the_running_generation_and_frees_the_model(app_url, short_speech):
    client = Client(app_url, verbose=False)
    job = client.submit(handle_file(str(PORTRAIT)), handle_file(str(SPEECH)), **(FAST | dict(steps=100)),
                        api_name="/generate")  # fmt: skip
    seen = []  # progress descriptions, in order
    deadline = time.monotonic() + 30
    while not (seen and seen[-1].desc.startswith("clip")) and time.monotonic() < deadline:
        seen += [unit for unit in job.status().progress_data or [] if not seen or unit.desc != seen[-1].desc]
        time.sleep(0.05)
    assert seen[0].desc == "Starting: Video: 3.0 s, 76 frames in 7 clips × 100 denoising steps."
    assert seen[-1].desc.startswith("clip 1/7 · step ") and seen[-1].length == 700
    assert client.predict(api_name="/cancel") == "Stopped."
    start = time.monotonic()
    video, _ = generate(Client(app_url, verbose=False), PORTRAIT, short_speech)  # waits for the cancelled run
    assert time.monotonic() - start < 15
    assert probe_video(video).num_frames == 13
    assert job.status().code.name in ("CANCELLED", "FINISHED")


def test_estimate_line_counts_frames_and_clips():
    plan = {"duration_s": 3.04, "num_frames": 76, "num_clips": 7}
    assert estimate_markdown(plan, 40) == "Video: **3.0 s**, 76 frames in 7 clips × 40 denoising steps."


def test_model_panel_says_what_the_small_model_cannot_do_and_how_to_load_another():
    info = dict(name="emo-small (embedded)", parameters=12_300_000, resolution=64, device="cpu", dtype="float32",
                embedded=True, summary="The project's small embedded model.")  # fmt: skip
    text = model_markdown(info)
    assert "`emo-small (embedded)` · 12.3 M parameters · 64×64 px" in text
    assert "**It cannot**" in text and "--model" in text and "EMO_MODEL" in text
    assert "**It cannot**" not in model_markdown(info | dict(embedded=False))


def test_example_assets_have_a_face_and_a_short_16k_mono_sentence():
    (face,) = detect_faces(PORTRAIT)
    assert face.width > 64
    speech = load_audio(SPEECH)
    assert speech.sampling_rate == 16_000 and speech.samples.shape[0] == 1
    assert 2.0 < speech.duration < 3.5 and SPEECH.stat().st_size < 200_000

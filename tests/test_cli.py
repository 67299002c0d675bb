"""`python -m emo_app`: generate end to end, one-line errors for bad inputs, info."""

import math
import re
import subprocess
import sys
import time
import wave
from importlib import metadata

import pytest
from conftest import speech_like
from PIL import Image
from skimage import data

from emo_app.cli import main
from emo_app.video import probe_video
from pipeline import build_pipeline
from pipeline.audio import write_wav

AUDIO_SECONDS = 0.6
AUDIO_RATE = 16_000  # Hz
FPS = 25
ONE_FRAME = 1 / FPS  # seconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved random tiny EmoPipeline (32x32 frames), loadable with --model."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_pipeline("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and bad input files, by name."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(data.astronaut()).save(folder / "portrait.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    Image.new("RGB", (256, 256), (120, 160, 200)).save(folder / "flat.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.wav").write_text("these are meeting notes, not audio\n")
    write_wav(folder / "speech.wav", speech_like(AUDIO_SECONDS, AUDIO_RATE), AUDIO_RATE)
    with wave.open(str(folder / "empty.wav"), "wb") as empty:
        empty.setnchannels(1)
        empty.setsampwidth(2)
        empty.setframerate(AUDIO_RATE)
    return folder


@pytest.mark.slow
def test_generate_end_to_end_writes_h264_aac_mp4_of_the_audio_length(model_dir, inputs, tmp_path):
    output = tmp_path / "talking.mp4"
    command = [sys.executable, "-m", "emo_app", "generate", "--image", str(inputs / "portrait.png")]
    command += ["--audio", str(inputs / "speech.wav"), "--output", str(output), "--model", str(model_dir)]
    start = time.perf_counter()
    run = subprocess.run(
        [*command, "--steps", "2", "--seed", "5"], capture_output=True, text=True, timeout=300
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    num_frames = math.ceil(AUDIO_SECONDS * FPS)
    assert f"{output}: {num_frames} frames (0.60 s at 25 fps), seed 5" in run.stdout
    assert "clip 2/2" in run.stderr and "Traceback" not in run.stderr
    info = probe_video(output)
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (info.width, info.height, info.num_frames) == (32, 32, num_frames)
    assert abs(info.duration - AUDIO_SECONDS) < ONE_FRAME
    assert abs(info.audio_duration - AUDIO_SECONDS) < ONE_FRAME
    print(f"tiny end-to-end CLI run: {seconds:.1f} s")


@pytest.mark.parametrize(
    ("image", "audio", "extra", "message"),
    [
        ("missing.png", "speech.wav", [], "Image file not found: .*missing.png: check the path."),
        ("corrupt.png", "speech.wav", [], "Cannot read image file .*corrupt.png: it is not a valid image"),
        ("portrait.png", "notes.wav", [], "notes.wav': the file is not a supported audio format"),
        ("portrait.png", "missing.wav", [], "missing.wav': the file does not exist"),
        ("portrait.png", "empty.wav", [], "empty.wav' is empty"),
        ("coffee.png", "speech.wav", [], "No face found in the portrait"),
        ("flat.png", "speech.wav", [], "No face found in the portrait"),
        (
            "portrait.png",
            "speech.wav",
            ["--max-duration", "0.5"],
            "0.60 s long, longer than the 0.5 s limit: .* raise --max-duration",
        ),
        ("portrait.png", "speech.wav", ["--steps", "0"], "steps must be a whole number >= 1, got 0"),
        (
            "portrait.png",
            "speech.wav",
            ["--model", "no/such-model"],
            "model 'no/such-model' is not a local folder",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(
    inputs, model_dir, tmp_path, capsys, image, audio, extra, message
):
    output = tmp_path / "out.mp4"
    args = [
        "generate",
        "--image",
        str(inputs / image),
        "--audio",
        str(inputs / audio),
        "--output",
        str(output),
    ]
    code = main([*args, "--model", str(model_dir), "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_info_prints_model_device_dtype_and_library_versions(model_dir, capsys):
    import diffusers
    import torch
    import transformers

    assert main(["info", "--model", str(model_dir), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for module in (torch, diffusers, transformers):
        assert f"{module.__name__}: {module.__version__}" in lines
    for package in ("gradio", "mediapipe"):  # not imported by the CLI: their installed versions
        assert f"{package}: {metadata.version(package)}" in lines
    assert "device: cpu (" in "\n".join(lines) and "dtype: fp32" in lines
    assert f"model: {model_dir.name} ({model_dir.resolve()})" in lines
    assert "  Model '" + model_dir.name + "' (32x32 px, 3 M parameters)." in lines

"""emo_app.video: clip-by-clip H.264/AAC mp4 with the audio's length, written atomically."""

import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from emo_app.video import VideoWriter, probe_video, write_video
from pipeline.audio import load_audio, write_wav

FPS = 25
CLIP = 12  # frames the generator makes per clip
NUM_FRAMES = 30  # 2.5 clips = 1.2 s at 25 fps
AUDIO_RATE = 44100
ONE_FRAME = 1 / FPS  # seconds


def coloured_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (f, H, W, 3): frame i is the flat colour (8 i, 240 - 8 i, 128)."""
    colours = np.array([[8 * i, 240 - 8 * i, 128] for i in range(num_frames)], np.uint8)
    return np.broadcast_to(colours[:, None, None], (num_frames, height, width, 3)).copy()


def speech_like(seconds: float, rate: int = AUDIO_RATE) -> np.ndarray:
    """A stereo 220 Hz tone, float32 (2, n)."""
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([0.4 * np.sin(2 * np.pi * 220 * t)] * 2).astype(np.float32)


def decoded_frames(path) -> np.ndarray:
    """All frames of a video as uint8 (f, H, W, 3), decoded by ffmpeg."""
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


@pytest.fixture
def audio_1_2s(tmp_path):
    return write_wav(tmp_path / "speech.wav", speech_like(1.2), AUDIO_RATE)


def test_clips_written_one_by_one_make_an_h264_aac_mp4_as_long_as_the_audio(tmp_path, audio_1_2s):
    frames = coloured_frames(NUM_FRAMES, 64, 64)
    output = tmp_path / "out.mp4"

    with VideoWriter(output, fps=FPS, audio=audio_1_2s) as writer:
        for start in range(0, NUM_FRAMES, CLIP):
            writer.write(frames[start : start + CLIP])  # 12, 12, then 6 frames
    info = probe_video(output)

    assert writer.path == output and writer.num_frames == NUM_FRAMES
    assert (info.video_codec, info.pix_fmt, info.audio_codec) == ("h264", "yuv420p", "aac")
    assert (info.width, info.height, info.fps) == (64, 64, FPS)
    assert info.num_frames == NUM_FRAMES
    assert info.duration == pytest.approx(1.2, abs=ONE_FRAME)
    assert info.audio_sample_rate == AUDIO_RATE
    assert info.audio_duration == pytest.approx(info.duration, abs=ONE_FRAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "speech.wav"]  # no temporary files


def test_frame_colours_survive_encoding(tmp_path, audio_1_2s):
    frames = coloured_frames(NUM_FRAMES, 64, 64)

    decoded = decoded_frames(write_video(tmp_path / "out.mp4", frames, fps=FPS, audio=audio_1_2s))

    assert decoded.shape == frames.shape
    for i in (0, 11, 12, 29):
        np.testing.assert_allclose(decoded[i].mean(axis=(0, 1)), frames[i].mean(axis=(0, 1)), atol=3)


def test_odd_size_is_padded_by_one_pixel_repeating_the_edge(tmp_path, audio_1_2s):
    frames = coloured_frames(NUM_FRAMES, 49, 65)
    frames[:, :, -1] = (255, 0, 0)  # a red last column, repeated into the padding column

    output = write_video(tmp_path / "odd.mp4", frames, fps=FPS, audio=audio_1_2s)
    info = probe_video(output)
    decoded = decoded_frames(output)

    assert (info.width, info.height, info.pix_fmt, info.num_frames) == (66, 50, "yuv420p", NUM_FRAMES)
    assert decoded.shape == (NUM_FRAMES, 50, 66, 3)
    np.testing.assert_allclose(decoded[5, :, -1].mean(axis=0), (255, 0, 0), atol=12)
    np.testing.assert_allclose(decoded[5, 24, :60].mean(axis=0), frames[5, 24, :60].mean(axis=0), atol=3)


@pytest.mark.parametrize("audio_seconds", [1.17, 1.2, 2.0])
def test_audio_array_is_padded_or_trimmed_to_the_video_length(tmp_path, audio_seconds):
    mono_16k = speech_like(audio_seconds, 16000)[0]

    output = write_video(
        tmp_path / "out.mp4", coloured_frames(NUM_FRAMES, 32, 32), audio_array=(mono_16k, 16000)
    )
    info = probe_video(output)
    soundtrack = load_audio(output)

    assert info.audio_sample_rate == 16000 and soundtrack.samples.shape[0] == 1
    assert info.audio_duration == pytest.approx(1.2, abs=1e-3)
    # The padding after a short audio is silence.
    assert not soundtrack.samples[0, round(audio_seconds * 16000) + 200 :].any()


def test_an_mp3_soundtrack_starts_with_the_first_frame(tmp_path):
    click = np.zeros(round(1.2 * AUDIO_RATE), np.float32)
    click[round(0.4 * AUDIO_RATE)] = 0.9  # an impulse at 0.4 s
    wav = write_wav(tmp_path / "click.wav", click, AUDIO_RATE)
    mp3 = tmp_path / "click.mp3"  # its stream starts at 0.025 s, after the encoder delay
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(wav), str(mp3)], check=True)

    output = write_video(tmp_path / "out.mp4", coloured_frames(NUM_FRAMES, 32, 32), audio=mp3)

    soundtrack = load_audio(output).mono
    assert np.argmax(np.abs(soundtrack)) == pytest.approx(0.4 * AUDIO_RATE, abs=5)


def test_pil_images_and_single_frames_are_accepted(tmp_path):
    frames = coloured_frames(3, 32, 32)

    with VideoWriter(tmp_path / "pil.mp4") as writer:
        writer.write([Image.fromarray(frame) for frame in frames[:2]])
        writer.write(frames[2])

    info = probe_video(writer.path)
    assert (info.num_frames, info.audio_codec, info.audio_duration) == (3, None, None)


def test_an_exception_inside_the_writer_leaves_no_output_and_no_temporary_files(tmp_path, audio_1_2s):
    frames = coloured_frames(NUM_FRAMES, 64, 64)

    with pytest.raises(KeyboardInterrupt), VideoWriter(tmp_path / "out.mp4", audio=audio_1_2s) as writer:
        writer.write(frames[:CLIP])
        raise KeyboardInterrupt  # e.g. the user cancels between two clips

    assert [p.name for p in tmp_path.iterdir()] == ["speech.wav"]


def test_an_existing_output_is_untouched_when_writing_fails(tmp_path, audio_1_2s):
    output = tmp_path / "out.mp4"
    output.write_bytes(b"previous video")

    with (
        pytest.raises(ValueError, match="differ from the first"),
        VideoWriter(output, audio=audio_1_2s) as writer,
    ):
        writer.write(coloured_frames(CLIP, 64, 64))
        writer.write(coloured_frames(CLIP, 32, 32))
    with (
        pytest.raises(RuntimeError, match="ffmpeg failed"),
        VideoWriter(output, preset="no-such-preset") as writer,
    ):
        writer.write(coloured_frames(CLIP, 64, 64))

    assert output.read_bytes() == b"previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "speech.wav"]


def test_closing_without_frames_raises_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="No frames"), VideoWriter(tmp_path / "out.mp4"):
        pass

    assert list(tmp_path.iterdir()) == []


def test_non_uint8_frames_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="uint8"), VideoWriter(tmp_path / "out.mp4") as writer:
        writer.write(np.zeros((2, 32, 32, 3), np.float32))

    assert list(tmp_path.iterdir()) == []


def test_the_output_gets_the_usual_file_permissions(tmp_path):
    import os
    import stat

    path = write_video(tmp_path / "v.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=25)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask

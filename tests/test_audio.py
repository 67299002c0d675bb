"""pipeline.audio: every format ffmpeg reads loads with the right length, rate and channels; errors are clear."""

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline.audio import Audio, AudioLoadError, load_audio, load_speech_16k, write_wav

RATE = 44100
SECONDS = 1.3
LEFT_HZ, RIGHT_HZ = 440.0, 1000.0
LEFT_AMP, RIGHT_AMP = 0.5, 0.3


def tone(hz: float, seconds: float = SECONDS, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    """A sine of ``hz`` Hz, float32 of shape (round(seconds * rate),)."""
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(signal: np.ndarray, rate: int) -> float:
    """The frequency (Hz) of the largest FFT bin of a 1-D signal."""
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


def rms(signal: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-nostdin", *args], check=True)


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory) -> Path:
    """1.3 s at 44.1 kHz: 440 Hz (amplitude 0.5) on the left, 1000 Hz (0.3) on the right."""
    samples = np.stack([tone(LEFT_HZ, amplitude=LEFT_AMP), tone(RIGHT_HZ, amplitude=RIGHT_AMP)])
    return write_wav(tmp_path_factory.mktemp("audio") / "tone.wav", samples, RATE)


# extension -> (ffmpeg options, expected decoding rate in Hz); opus always decodes at 48 kHz.
FORMATS = {
    "mp3": ([], RATE),
    "m4a": (["-c:a", "aac"], RATE),
    "flac": ([], RATE),
    "ogg": (["-c:a", "libvorbis"], RATE),
    "opus": (["-c:a", "libopus"], 48000),
    "mp4": (["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"], RATE),
    "webm": (["-c:v", "libvpx-vp9", "-c:a", "libopus"], 48000),
}


COLOUR_TRACK = ["-f", "lavfi", "-i", f"color=c=red:s=32x32:r=25:d={SECONDS}"]


@pytest.fixture(scope="module")
def converted(stereo_wav) -> dict[str, Path]:
    """The stereo tone converted by ffmpeg to each format; videos get a 32x32 colour track."""
    paths = {"wav": stereo_wav}
    for ext, (options, _) in FORMATS.items():
        path = stereo_wav.with_name(f"tone.{ext}")
        video = COLOUR_TRACK if ext in ("mp4", "webm") else []
        ffmpeg(*video, "-i", str(stereo_wav), *options, "-shortest", str(path))
        paths[ext] = path
    return paths


@pytest.mark.parametrize("ext", ["wav", *FORMATS])
def test_each_format_loads_with_its_duration_rate_and_stereo_channels(converted, ext):
    audio = load_audio(converted[ext])

    expected_rate = FORMATS[ext][1] if ext in FORMATS else RATE
    assert audio.sampling_rate == expected_rate
    assert audio.samples.dtype == np.float32
    assert audio.samples.shape[0] == 2
    assert audio.duration == pytest.approx(SECONDS, abs=0.03)
    assert audio.path == str(converted[ext])
    # Channel order survives: left is the 440 Hz tone, right the 1000 Hz one, at their amplitudes
    # (within 10 %: LAME's 128 kb/s mp3 comes back about 5 % quieter).
    left, right = audio.samples
    assert peak_hz(left, audio.sampling_rate) == pytest.approx(LEFT_HZ, abs=2)
    assert peak_hz(right, audio.sampling_rate) == pytest.approx(RIGHT_HZ, abs=2)
    assert rms(left) == pytest.approx(LEFT_AMP / np.sqrt(2), rel=0.1)
    assert rms(right) == pytest.approx(RIGHT_AMP / np.sqrt(2), rel=0.1)


def test_wav_decodes_to_the_written_samples(stereo_wav):
    audio = load_audio(stereo_wav)

    expected = np.stack([tone(LEFT_HZ, amplitude=LEFT_AMP), tone(RIGHT_HZ, amplitude=RIGHT_AMP)])

    assert audio.samples.shape == (2, round(SECONDS * RATE))
    np.testing.assert_allclose(audio.samples, expected, atol=1 / 32767)


def test_mono_is_the_mean_of_the_channels(stereo_wav):
    stereo = load_audio(stereo_wav)
    mono = load_audio(stereo_wav, mono=True)

    assert mono.samples.shape == (1, stereo.samples.shape[1])
    np.testing.assert_allclose(mono.samples[0], stereo.samples.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(stereo.mono, mono.samples[0], atol=1e-6)


def test_mono_file_keeps_one_channel(tmp_path):
    path = write_wav(tmp_path / "mono.wav", tone(LEFT_HZ), RATE)

    assert load_audio(path).samples.shape == (1, round(SECONDS * RATE))


def test_resampling_a_file_to_16k_keeps_frequency_level_and_duration(stereo_wav):
    audio = load_audio(stereo_wav, sampling_rate=16000)

    assert audio.sampling_rate == 16000
    assert audio.samples.shape == (2, round(SECONDS * 16000))
    assert peak_hz(audio.samples[0], 16000) == pytest.approx(LEFT_HZ, abs=1)
    assert peak_hz(audio.samples[1], 16000) == pytest.approx(RIGHT_HZ, abs=1)
    assert rms(audio.samples[0][100:-100]) == pytest.approx(LEFT_AMP / np.sqrt(2), rel=0.01)


def test_resampling_an_array_keeps_the_tone_and_removes_frequencies_above_nyquist():
    audio = Audio(np.stack([tone(LEFT_HZ), tone(10000.0)]), RATE, None).resample(16000)

    assert audio.sampling_rate == 16000
    assert audio.duration == pytest.approx(SECONDS, abs=1 / 16000)
    assert peak_hz(audio.samples[0], 16000) == pytest.approx(LEFT_HZ, abs=1)
    # 10 kHz is above the 8 kHz Nyquist limit of 16 kHz: the resampler filters it out instead of aliasing.
    assert rms(audio.samples[1]) < 0.01 * rms(tone(10000.0))


def test_load_speech_16k_is_mono_float32_at_16k(converted):
    speech = load_speech_16k(converted["m4a"])

    assert speech.dtype == np.float32
    assert speech.shape == (round(SECONDS * 16000),)
    assert peak_hz(speech, 16000) == pytest.approx(LEFT_HZ, abs=1)


def test_array_sources_in_either_order_and_layout():
    pcm = (np.stack([tone(LEFT_HZ), tone(RIGHT_HZ)], axis=1) * 32767).astype(np.int16)  # (n, 2) int16

    gradio = load_audio((RATE, pcm))  # Gradio's microphone gives (rate, (n, channels) int16)
    plain = load_audio((pcm.T.astype(np.float32) / 32768, RATE), sampling_rate=16000)

    assert gradio.sampling_rate == RATE and gradio.path is None
    assert gradio.samples.shape == (2, round(SECONDS * RATE))
    np.testing.assert_allclose(gradio.samples, pcm.T / 32768, atol=1e-7)
    assert plain.samples.shape == (2, round(SECONDS * 16000))


def test_silence_is_valid_and_loads_as_zeros(tmp_path):
    path = write_wav(tmp_path / "silence.wav", np.zeros(RATE // 2, np.float32), RATE)

    audio = load_audio(path)

    assert audio.duration == pytest.approx(0.5)
    assert not audio.samples.any()


def test_write_wav_round_trips_within_16_bit_precision(tmp_path):
    samples = np.stack([tone(LEFT_HZ, 0.2), -tone(RIGHT_HZ, 0.2)])

    audio = load_audio(write_wav(tmp_path / "round.wav", samples, RATE))

    np.testing.assert_allclose(audio.samples, samples, atol=1 / 32767)


def test_pcm_wav_at_its_own_rate_reads_without_ffmpeg_and_as_ffmpeg_decodes_it(stereo_wav, monkeypatch):
    mono = write_wav(stereo_wav.with_name("mono16k.wav"), tone(LEFT_HZ, 0.5, 16000), 16000)
    reference = {}
    for path in (stereo_wav, mono):  # ffmpeg's own decoding of the same files, through a copy it must decode
        raw = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), "-f", "f32le", "-"],
            capture_output=True,
            check=True,
        ).stdout
        channels = 2 if path == stereo_wav else 1
        reference[path] = np.frombuffer(raw, "<f4").reshape(-1, channels).T

    def no_ffmpeg():
        raise AssertionError("ffmpeg was called")

    monkeypatch.setattr("pipeline.audio._ffmpeg", no_ffmpeg)
    stereo, speech = load_audio(stereo_wav), load_audio(mono, sampling_rate=16000, mono=True)

    np.testing.assert_array_equal(stereo.samples, reference[stereo_wav])
    np.testing.assert_array_equal(speech.samples, reference[mono])
    assert (stereo.sampling_rate, speech.sampling_rate) == (RATE, 16000)
    with pytest.raises(AssertionError, match="ffmpeg was called"):  # another rate still resamples with ffmpeg
        load_audio(mono, sampling_rate=8000)
    with pytest.raises(AudioLoadError, match="1.30 s long"):
        load_audio(stereo_wav, max_duration=1.0)
    cut = stereo_wav.with_name("cut.wav")  # a file cut off in the middle of a sample: the whole samples load
    cut.write_bytes(stereo_wav.read_bytes()[:-3])
    np.testing.assert_array_equal(load_audio(cut).samples, reference[stereo_wav][:, :-1])


def assert_one_line_error(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_text_file_named_wav_is_not_a_supported_format(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")

    with pytest.raises(AudioLoadError) as error:
        load_audio(path)

    assert str(error.value) == (
        f"Could not read audio from '{path}': the file is not a supported audio format "
        "(wav, mp3, m4a, flac, ogg, or a video with sound)."
    )


def test_empty_wav_raises(tmp_path):
    path = write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)

    with pytest.raises(AudioLoadError) as error:
        load_audio(path)

    assert_one_line_error(error, "empty.wav", "empty", "0 samples")


def test_empty_array_raises():
    with pytest.raises(AudioLoadError, match="empty"):
        load_audio((np.zeros(0, np.float32), 16000))


def test_audio_longer_than_max_duration_raises_with_length_limit_and_option(stereo_wav):
    with pytest.raises(AudioLoadError) as error:
        load_audio(stereo_wav, max_duration=1.0, limit_hint="--max-audio-seconds")

    assert_one_line_error(error, "tone.wav", "1.30 s long", "1 s limit", "--max-audio-seconds")
    assert load_audio(stereo_wav, max_duration=1.5).duration == pytest.approx(SECONDS)


def test_missing_file_raises(tmp_path):
    with pytest.raises(AudioLoadError) as error:
        load_audio(tmp_path / "nowhere.mp3")

    assert_one_line_error(error, "nowhere.mp3", "does not exist")


def test_video_without_audio_track_raises(tmp_path):
    path = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=32x32:r=25:d=0.5", "-c:v", "libx264", str(path))

    with pytest.raises(AudioLoadError) as error:
        load_audio(path)

    assert_one_line_error(error, "silent.mp4", "no audio track")

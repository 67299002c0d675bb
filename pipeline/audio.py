"""Reading a user's audio: any format ffmpeg knows, to float32 samples.

Decoding runs the ffmpeg binary bundled with ``imageio-ffmpeg`` in a subprocess and reads raw float32 PCM
from its stdout, so wav, mp3, m4a/aac, flac, ogg/vorbis/opus and the soundtrack of a video (mp4, mov,
webm, mkv) all load the same way; a 16-bit PCM wav at the asked rate (as ``write_wav`` writes them) is read
directly with the standard library, with the same values, so that prepared training data loads on machines
without ffmpeg. Resampling also goes through ffmpeg (its ``swresample`` windowed-sinc resampler), from a
file or from samples piped in. Only numpy, the standard library and (when decoding)
imageio_ffmpeg are imported here.

Mono and stereo files keep their channels (the soundtrack of the output video uses them); files with
more than two channels are downmixed to stereo by ffmpeg. ``Audio.mono`` is the mean of the channels.
"""

from __future__ import annotations

import re
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_FORMATS = "wav, mp3, m4a, flac, ogg, or a video with sound"

# Slack (seconds) decoded past ``max_duration`` so that "longer than the limit" is decided on samples.
_DURATION_SLACK = 1.0


class AudioLoadError(ValueError):
    """The audio cannot be used; the one-line message names the file, the problem and the fix."""


@dataclass
class Audio:
    """Decoded audio.

    Attributes:
        samples: float32 array of shape (channels, n), nominally in [-1, 1].
        sampling_rate: samples per second (Hz).
        path: the file it was read from, or None for audio given as an array.
    """

    samples: np.ndarray
    sampling_rate: int
    path: str | None = None

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples.shape[-1] / self.sampling_rate

    @property
    def mono(self) -> np.ndarray:
        """The mean of the channels, float32 of shape (n,)."""
        return self.samples.mean(axis=0, dtype=np.float32)

    def resample(self, rate: int) -> Audio:
        """The same audio at ``rate`` Hz (ffmpeg's windowed-sinc resampler); n becomes round(n * rate / sr)."""
        if rate == self.sampling_rate:
            return self
        return Audio(_ffmpeg_resample(self.samples, self.sampling_rate, rate), rate, self.path)


def load_audio(
    source: str | Path | tuple,
    *,
    sampling_rate: int | None = None,
    mono: bool = False,
    max_duration: float | None = None,
    limit_hint: str = "max_duration",
) -> Audio:
    """Load audio from a file or an array.

    Args:
        source: a path to any file ffmpeg can read (audio, or a video with sound), or a
            ``(array, sampling_rate)`` tuple; Gradio's ``(sampling_rate, array)`` order is accepted too.
            The array is (n,), (channels, n) or (n, channels), float or integer PCM (int16 / int32).
        sampling_rate: output rate in Hz; None keeps the source's rate.
        mono: average the channels into one (samples of shape (1, n)).
        max_duration: longest accepted audio in seconds; None for no limit.
        limit_hint: the name of the option that sets ``max_duration``, quoted in the error message.

    Raises:
        AudioLoadError: missing or unreadable file, no audio track, empty audio, or longer than
            ``max_duration``.
    """
    if isinstance(source, tuple):
        audio = _from_array(source)
        length = audio.duration
    else:
        audio, length = _decode_file(Path(source), sampling_rate, max_duration)
    name = f"'{audio.path}'" if audio.path else "the audio array"
    if audio.samples.shape[-1] == 0:
        raise AudioLoadError(f"Audio {name} is empty (0 samples): record or choose a file with sound.")
    if max_duration is not None and length > max_duration:
        raise AudioLoadError(
            f"Audio {name} is {length:.2f} s long, longer than the {max_duration:g} s limit: "
            f"trim the audio or raise {limit_hint}."
        )
    if sampling_rate is not None:
        audio = audio.resample(sampling_rate)
    if mono:
        audio = Audio(audio.mono[None], audio.sampling_rate, audio.path)
    return audio


def load_speech_16k(source: str | Path | tuple, **kwargs) -> np.ndarray:
    """Mono float32 samples at 16 kHz, shape (n,): the input of the wav2vec2 encoder.

    ``kwargs`` go to :func:`load_audio` (``max_duration``, ``limit_hint``).
    """
    return load_audio(source, sampling_rate=16000, mono=True, **kwargs).samples[0]


def write_wav(path: str | Path, samples: np.ndarray, sampling_rate: int) -> Path:
    """Write 16-bit PCM wav; samples are float in [-1, 1] (clipped) or int16, laid out as in load_audio."""
    pcm = np.clip(_channels_first(samples), -1.0, 1.0)
    pcm = np.round(pcm * 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[0])
        f.setsampwidth(2)
        f.setframerate(int(sampling_rate))
        f.writeframes(pcm.T.tobytes())
    return path


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg_path(path: Path) -> str:
    """The absolute path, so that ffmpeg never reads "name:..." in a relative file name as a protocol."""
    return str(path.absolute())


def _channels_first(array: np.ndarray) -> np.ndarray:
    """float32 (channels, n) from (n,), (channels, n) or (n, channels); integer PCM is scaled to [-1, 1]."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer):
        array = array / float(np.iinfo(array.dtype).max + 1)
    array = array.astype(np.float32, copy=False)
    if array.ndim == 1:
        return array[None]
    if array.ndim != 2:
        raise AudioLoadError(f"The audio array has shape {array.shape}: expected (n,) or (channels, n).")
    # Audio has far more samples than channels: the shorter axis is the channel axis.
    return array.T if array.shape[0] > array.shape[1] else array


def _from_array(source: tuple) -> Audio:
    if len(source) != 2:
        raise AudioLoadError("The audio tuple must be (array, sampling_rate).")
    array, rate = source
    if isinstance(array, int | np.integer):
        array, rate = rate, array
    if int(rate) <= 0:
        raise AudioLoadError(f"The audio sampling rate must be a positive number of Hz, got {rate}.")
    samples = _channels_first(array)
    if not np.isfinite(samples).all():
        raise AudioLoadError("The audio array contains NaN or infinite values: pass finite samples.")
    return Audio(np.ascontiguousarray(samples), int(rate), None)


def _probe(path: Path) -> tuple[int, int, float | None]:
    """(sampling_rate Hz, channels to decode (1 or 2), duration s or None) of the first audio stream."""
    info = subprocess.run(
        [_ffmpeg(), "-hide_banner", "-nostdin", "-i", _ffmpeg_path(path)], capture_output=True, text=True
    ).stderr
    stream = re.search(r"Stream #\d+:\d+\S*: Audio: .*?(\d+) Hz, ([^,\n]+)", info)
    if stream is None:
        problem = (
            "the file has no audio track: use a video with sound or an audio file"
            if re.search(r"Stream #\d+:\d+\S*: Video: ", info)
            else f"the file is not a supported audio format ({SUPPORTED_FORMATS})"
        )
        raise AudioLoadError(f"Could not read audio from '{path}': {problem}.")
    channels = 1 if stream.group(2).strip() in ("mono", "1 channels") else 2
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", info)
    hours, minutes, seconds = (0, 0, None) if duration is None else duration.groups()
    length = None if seconds is None else 3600 * int(hours) + 60 * int(minutes) + float(seconds)
    return int(stream.group(1)), channels, length


def _decode_file(path: Path, sampling_rate: int | None, max_duration: float | None) -> tuple[Audio, float]:
    """The decoded audio and the file's length in seconds (decoding stops shortly after ``max_duration``)."""
    if not path.is_file():
        problem = "it is a folder, not a file" if path.is_dir() else "the file does not exist"
        raise AudioLoadError(f"Could not read audio from '{path}': {problem}. Check the path.")
    direct = _read_pcm_wav(path, sampling_rate, max_duration)
    if direct is not None:
        return direct
    native_rate, channels, probed_duration = _probe(path)
    rate = sampling_rate or native_rate
    command = [_ffmpeg(), "-nostdin", "-v", "error", "-i", _ffmpeg_path(path), "-map", "0:a:0"]
    if max_duration is not None:
        # Decode only a little past the limit: enough to tell that it is exceeded.
        command += ["-t", f"{max_duration + _DURATION_SLACK:.3f}"]
    command += ["-f", "f32le", "-ac", str(channels), "-ar", str(rate), "-"]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        raise AudioLoadError(
            f"Could not read audio from '{path}': the file is not a supported audio format "
            f"({SUPPORTED_FORMATS})."
        )
    samples = np.frombuffer(result.stdout, dtype="<f4").reshape(-1, channels).T.copy()
    audio = Audio(samples, rate, str(path))
    truncated = max_duration is not None and audio.duration > max_duration
    return audio, max(audio.duration, probed_duration or 0.0) if truncated else audio.duration


def _read_pcm_wav(
    path: Path, sampling_rate: int | None, max_duration: float | None
) -> tuple[Audio, float] | None:
    """As `_decode_file` for a mono or stereo 16-bit PCM wav whose rate is `sampling_rate` (or any rate when
    None), read with `wave` (samples / 32768, as ffmpeg converts them); None for any other file."""
    if path.suffix.lower() != ".wav":
        return None
    try:
        with wave.open(str(path), "rb") as f:
            rate, channels, frames = f.getframerate(), f.getnchannels(), f.getnframes()
            other_rate = sampling_rate is not None and sampling_rate != rate
            if f.getsampwidth() != 2 or channels not in (1, 2) or other_rate:
                return None
            if max_duration is not None:
                frames = min(frames, int((max_duration + _DURATION_SLACK) * rate))
            data = f.readframes(frames)
            data = data[: len(data) - len(data) % (2 * channels)]  # a cut-off file ends mid-sample
            length = f.getnframes() / rate
    except (wave.Error, EOFError):
        return None
    samples = np.frombuffer(data, dtype="<i2").reshape(-1, channels).T / np.float32(32768)
    audio = Audio(np.ascontiguousarray(samples, dtype=np.float32), rate, str(path))
    return audio, length if max_duration is not None and length > max_duration else audio.duration


def _ffmpeg_resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Resample (channels, n) float32 from ``rate`` to ``new_rate`` Hz by piping through ffmpeg."""
    channels = samples.shape[0]
    pcm_in = ["-f", "f32le", "-ac", str(channels), "-ar", str(rate), "-i", "-"]
    pcm_out = ["-f", "f32le", "-ac", str(channels), "-ar", str(new_rate), "-"]
    result = subprocess.run(
        [_ffmpeg(), "-nostdin", "-v", "error", *pcm_in, *pcm_out],
        input=np.ascontiguousarray(samples.T, dtype="<f4").tobytes(),
        capture_output=True,
        check=True,
    )
    return np.frombuffer(result.stdout, dtype="<f4").reshape(-1, channels).T.copy()

"""Writing the output mp4: H.264 (yuv420p) video with the AAC soundtrack, streamed clip by clip.

Frames are piped as raw RGB into the ffmpeg binary bundled with ``imageio-ffmpeg`` (the one moviepy uses),
which encodes a silent temporary mp4; on ``close`` the audio is muxed in (video stream copied, audio
encoded to AAC) and the result renamed onto the output path. All temporary files live next to the output
and are removed on success and on failure, so an interrupted run never leaves a half-written file and
never replaces an existing one.

Choices:
- Odd sizes: yuv420p needs even width and height, so an odd frame is padded by one pixel on the right
  and/or bottom, repeating the edge pixels (a 65x49 input becomes a 66x50 video); nothing is rescaled.
- Audio length: the soundtrack is cut or padded with silence to exactly the video's length,
  num_frames / fps seconds. The generator makes ceil(audio seconds * fps) frames, so the last frame
  ends less than one frame after the speech, and that remainder is silent.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO

import imageio_ffmpeg
import numpy as np
from PIL import Image

Frames = np.ndarray | Image.Image | list


class VideoWriter:
    """Stream frames into an mp4 (H.264 yuv420p + AAC), written atomically on ``close``.

    Use as a context manager: leaving the block normally finishes the file (``close``); leaving it with
    an exception stops ffmpeg and deletes every temporary file (``abort``), leaving no output.

    Args:
        path: the output .mp4; its folder is created if missing.
        fps: frames per second.
        audio: a file whose (first) audio track becomes the soundtrack (any format ffmpeg reads). It is read
            on ``close``: check it beforehand with ``pipeline.audio.load_audio``.
        audio_array: the soundtrack as ``(samples, sampling_rate)``, samples (channels, n) or (n,) in [-1, 1].
        crf: x264 constant rate factor (0 lossless, 18 visually lossless, 23 x264's default).
        preset: x264 speed/size preset ("ultrafast" ... "veryslow").
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fps: float = 25,
        audio: str | Path | None = None,
        audio_array: tuple[np.ndarray, int] | None = None,
        crf: int = 18,
        preset: str = "medium",
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}.")
        if audio is not None and audio_array is not None:
            raise ValueError("Pass the soundtrack as audio (a file) or audio_array, not both.")
        if audio is not None and not Path(audio).is_file():
            raise FileNotFoundError(f"The soundtrack '{audio}' does not exist.")
        self.path = Path(path)
        self.fps = fps
        self.audio = audio
        self.audio_array = audio_array
        self.crf = crf
        self.preset = preset
        self.num_frames = 0
        self.size: tuple[int, int] | None = None  # (height, width) of the frames given to write
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._temp_files: list[Path] = []
        self._silent_video: Path | None = None  # what the encoder writes, before the audio is muxed
        self._state = "open"  # then "closed" (the file is at path) or "aborted"

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def duration(self) -> float:
        """Seconds of video written so far."""
        return self.num_frames / self.fps

    def write(self, frames: Frames) -> None:
        """Append frames: uint8 (H, W, 3) or (f, H, W, 3), a PIL image, or a list of either.

        The first frame fixes the size; later frames must have the same one.
        """
        if isinstance(frames, list | tuple) and not frames:
            return
        frames = _as_frames(frames)
        if len(frames) == 0:
            return
        if self._state != "open":
            raise RuntimeError(f"The video '{self.path}' is already {self._state}.")
        if self.size is None:
            self.size = frames.shape[1:3]
            self._start_encoder()
        elif frames.shape[1:3] != self.size:
            raise ValueError(f"Frames of size {frames.shape[1:3]} (H, W) differ from the first, {self.size}.")
        try:
            self._process.stdin.write(_pad_to_even(frames).tobytes())
        except BrokenPipeError as error:
            raise self._encoder_error() from error
        self.num_frames += len(frames)

    def close(self) -> Path:
        """Finish encoding, mux the soundtrack, move the file onto ``path`` and return ``path``."""
        if self._state == "closed":
            return self.path
        if self._state == "aborted":
            raise RuntimeError(f"The video '{self.path}' was aborted.")
        try:
            if self.num_frames == 0:
                raise ValueError(f"No frames were written to '{self.path}'.")
            with contextlib.suppress(BrokenPipeError):  # ffmpeg exited early: its log says why
                self._process.stdin.close()
            if self._process.wait() != 0:
                raise self._encoder_error()
            video = self._silent_video
            if self.audio is not None or self.audio_array is not None:
                video = self._mux_audio(video)
            os.chmod(video, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(video, self.path)
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the temporary files; the output path is left as it was (no-op once closed)."""
        if self._state == "closed":
            return
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._cleanup()
        self._state = "aborted"

    def _cleanup(self) -> None:
        for file in self._temp_files:
            file.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
        if self._process is not None:
            with contextlib.suppress(BrokenPipeError):  # unflushed frames of a killed ffmpeg
                self._process.stdin.close()

    def _temp_file(self, suffix: str) -> Path:
        """A new empty file next to the output, registered for deletion."""
        fd, name = tempfile.mkstemp(suffix=suffix, prefix=f".{self.path.stem}.", dir=self.path.parent)
        os.close(fd)
        self._temp_files.append(Path(name).absolute())
        return self._temp_files[-1]

    def _start_encoder(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        height, width = (side + side % 2 for side in self.size)
        self._silent_video = self._temp_file(".video.mp4")
        self._log = tempfile.TemporaryFile()
        raw_rgb = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", _rate(self.fps)]
        x264 = ["-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf), "-pix_fmt", "yuv420p"]
        command = _ffmpeg(
            "-y", *raw_rgb, "-i", "-", "-an", *x264, "-movflags", "+faststart", str(self._silent_video)
        )
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=self._log)

    def _mux_audio(self, video: Path) -> Path:
        """Copy ``video`` into a new temporary mp4 with the soundtrack cut/padded to the video's length."""
        if self.audio_array is None:
            source, pcm, name = ["-i", str(Path(self.audio).absolute())], None, f"'{self.audio}'"
        else:  # piped to ffmpeg as raw float32
            samples, rate = self.audio_array
            samples = np.atleast_2d(np.asarray(samples, dtype="<f4"))  # (channels, n)
            source = ["-f", "f32le", "-ar", str(int(rate)), "-ac", str(len(samples)), "-i", "-"]
            pcm, name = np.ascontiguousarray(samples.T).tobytes(), "the audio array"
        output = self._temp_file(".mp4")
        seconds = f"{self.duration:.6f}"
        # Start the soundtrack with the first frame (mp3 streams start after the encoder delay), then
        # pad with silence and cut, so that it lasts exactly as long as the video.
        fit = f"asetpts=PTS-STARTPTS,apad=whole_dur={seconds},atrim=duration={seconds}"
        result = subprocess.run(
            [
                *_ffmpeg("-y", "-i", str(video), *source, "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy"),
                *("-af", fit, "-c:a", "aac", "-b:a", "192k", "-movflags", "+faststart", str(output)),
            ],
            input=pcm,
            capture_output=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not add the soundtrack {name} to '{self.path}': {_first_line(result.stderr)}"
            )
        return output

    def _encoder_error(self) -> RuntimeError:
        """Why the encoding ffmpeg exited (waits for it)."""
        self._process.wait()
        self._log.seek(0)
        return RuntimeError(f"ffmpeg failed to encode '{self.path}': {_first_line(self._log.read())}")


def write_video(
    path: str | Path,
    frames: Frames,
    *,
    fps: float = 25,
    audio: str | Path | None = None,
    audio_array: tuple[np.ndarray, int] | None = None,
) -> Path:
    """Write ``frames`` (anything ``VideoWriter.write`` takes) to an mp4 in one call; returns its path."""
    with VideoWriter(path, fps=fps, audio=audio, audio_array=audio_array) as writer:
        writer.write(frames)
    return writer.path


@dataclass
class VideoInfo:
    """What ``probe_video`` measured.

    ``num_frames`` is counted by decoding; ``duration`` = num_frames / fps (seconds);
    ``audio_duration`` = decoded audio samples / ``audio_sample_rate`` (seconds, Hz).
    The audio fields are None for a video without sound.
    """

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    video_codec: str
    pix_fmt: str
    audio_codec: str | None
    audio_duration: float | None
    audio_sample_rate: int | None


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's streams from ``ffmpeg -i`` and count its frames and audio samples by decoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The video '{path}' does not exist.")
    info = subprocess.run(
        _ffmpeg("-i", str(path.absolute()), quiet=False), capture_output=True, text=True
    ).stderr
    video = re.search(r"Stream #\d+:\d+\S*: Video: (\w+)[^,]*, (\w+).*", info)
    if video is None:
        raise ValueError(f"'{path}' has no video stream.")
    width, height = re.search(r", (\d+)x(\d+)", video[0]).groups()
    fps = re.search(r"([\d.]+)(k?) (?:fps|tbr)", video[0])
    audio = re.search(r"Stream #\d+:\d+\S*: Audio: (\w+).*?(\d+) Hz", info)

    command = _ffmpeg("-i", str(path.absolute()), "-map", "0:v:0", quiet=False)
    if audio is not None:
        command += ["-map", "0:a:0", "-af", "aformat=channel_layouts=mono,volumedetect"]
    decoded = subprocess.run([*command, "-f", "null", "-"], capture_output=True, text=True, check=True).stderr
    num_frames = int(re.findall(r"frame=\s*(\d+)", decoded)[-1])
    rate = float(fps[1]) * (1000 if fps[2] else 1)
    audio_rate = None if audio is None else int(audio[2])
    audio_samples = None if audio is None else int(re.findall(r"n_samples: (\d+)", decoded)[-1])
    return VideoInfo(
        width=int(width),
        height=int(height),
        fps=rate,
        num_frames=num_frames,
        duration=num_frames / rate,
        video_codec=video[1],
        pix_fmt=video[2],
        audio_codec=None if audio is None else audio[1],
        audio_duration=None if audio is None else audio_samples / audio_rate,
        audio_sample_rate=audio_rate,
    )


def _ffmpeg(*args: str, quiet: bool = True) -> list[str]:
    """An ffmpeg command line (bundled binary, never reading the keyboard; quiet: errors only).

    File arguments are absolute paths: ffmpeg reads a relative "name:..." as a protocol.
    """
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        *(("-v", "error") if quiet else ()),
        *args,
    ]


def _first_line(log: bytes) -> str:
    """The first line of an ffmpeg error log: the cause (later lines are consequences)."""
    lines = log.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "unknown error"


def _rate(fps: float) -> str:
    """fps as ffmpeg reads it exactly: "25", "30000/1001"."""
    return str(Fraction(fps).limit_denominator(1001))


def _as_frames(frames: Frames) -> np.ndarray:
    """uint8 (f, H, W, 3) from a (list of) PIL image(s) or uint8 array(s) of shape (H, W, 3) / (f, H, W, 3)."""
    if isinstance(frames, Image.Image):
        frames = [frames]
    if isinstance(frames, list | tuple):
        frames = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else f for f in frames]
        frames = np.concatenate([np.asarray(f)[None] if np.ndim(f) == 3 else f for f in frames])
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"Frames must be RGB of shape (H, W, 3) or (f, H, W, 3), got {frames.shape}.")
    if frames.dtype != np.uint8:
        raise TypeError(f"Frames must be uint8 (0-255), got {frames.dtype}: convert with (x * 255).round().")
    return frames


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row / column of (f, H, W, 3) frames whose height / width is odd."""
    _, height, width, _ = frames.shape
    if height % 2 == 0 and width % 2 == 0:
        return np.ascontiguousarray(frames)
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, not safe to toggle in threads

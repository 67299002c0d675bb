"""Synthetic talking videos for tests, benchmarks and small demo trainings (no dataset download needed).

A portrait (scikit-image's astronaut, whose face MediaPipe detects) sways and turns a little per frame,
with a speech-like sound muxed in: a harmonic tone whose pitch glides and whose loudness follows a
syllable rhythm (4-5 Hz), the two properties of speech that wav2vec2 features respond to most.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.audio import write_wav

# the astronaut's head, in pixels of the 512 x 512 image: crop window and rotation centre
_HEAD_WINDOW = (97, 0, 353, 256)
_HEAD_CENTER = (225, 120)


def _astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def portrait(size: int = 96) -> Image.Image:
    """The still portrait (size x size RGB) the synthetic videos move."""
    return _astronaut().crop(_HEAD_WINDOW).resize((size, size), Image.BILINEAR)


def speech_like_audio(seconds: float, sampling_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A float32 mono waveform in [-0.5, 0.5]: gliding harmonic tone, amplitude-modulated at 4-5 Hz."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sampling_rate)) / sampling_rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))  # Hz
    phase = 2 * np.pi * np.cumsum(pitch) / sampling_rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(4, 5) * t), 0, None) ** 2
    return (0.5 * tone / np.abs(tone).max() * syllables).astype(np.float32)


def frames(seconds: float, fps: float = 25, size: int = 96, seed: int = 0) -> list[np.ndarray]:
    """(size, size, 3) uint8 frames of the portrait turning (+-4 degrees) and swaying (+-6 source pixels)."""
    rng = np.random.default_rng(seed)
    image = _astronaut()
    phase = rng.uniform(0, 6, size=2)
    out = []
    for i in range(round(seconds * fps)):
        angle = 4 * np.sin(i / 5 + phase[0])
        shift = 6 * np.sin(i / 7 + phase[1])
        moved = image.rotate(angle, center=_HEAD_CENTER, translate=(shift, 0), resample=Image.BILINEAR)
        out.append(np.asarray(moved.crop(_HEAD_WINDOW).resize((size, size), Image.BILINEAR)))
    return out


def write_talking_video(
    path: str | Path,
    seconds: float = 1.6,
    fps: float = 25,
    size: int = 96,
    with_audio: bool = True,
    seed: int = 0,
) -> Path:
    """Write an mp4 (H.264, and AAC audio unless `with_audio` is False) of the moving portrait."""
    import imageio_ffmpeg

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        wav = None
        if with_audio:
            wav = write_wav(Path(tmp) / "audio.wav", speech_like_audio(seconds, seed=seed), 16_000)
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (size, size),
            fps=fps,
            quality=8,
            macro_block_size=16,
            audio_path=str(wav) if wav else None,
            audio_codec="aac" if wav else None,
        )
        writer.send(None)
        for frame in frames(seconds, fps, size, seed):
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path

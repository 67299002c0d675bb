"""benchmarks/eval_embedded.py: its command line refuses what it cannot do before it loads a model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def load_eval():
    path = Path(__file__).parents[1] / "benchmarks" / "eval_embedded.py"
    spec = importlib.util.spec_from_file_location("eval_embedded", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skip_espeak_and_espeak_only_are_refused_together(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        load_eval().main(["--skip-espeak", "--espeak-only", "--model", str(tmp_path / "absent")])
    assert stop.value.code == 2
    assert "--skip-espeak and --espeak-only exclude each other" in capsys.readouterr().err


def test_recordings_run_alone(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        load_eval().main(["--recordings", "--espeak-only", "--model", str(tmp_path / "absent")])
    assert stop.value.code == 2
    assert "--recordings runs alone" in capsys.readouterr().err


def test_voice_figures_pair_every_voice_with_a_portrait_and_measure_the_mouth(tmp_path):
    """Three recordings on two portraits: each recording once, the portraits in turn; a stand-in pipeline opens the
    astronaut's mouth (the photo smiles with its teeth showing) on loud frames and closes it on quiet ones, so
    the measured lip-sync is high, and zero-mouth-head figures are absent."""
    from PIL import Image

    from pipeline.audio import write_wav
    from pipeline.face import face_landmarks
    from pipeline.metrics import loudness_envelope
    from pipeline.mouth_pose import close_mouth

    sr = 16_000
    portrait = np.asarray(
        Image.open(Path(__file__).parents[1] / "assets/examples/portrait.png").convert("RGB")
    )
    portrait = np.asarray(Image.fromarray(portrait).resize((128, 128)))
    closed, _ = close_mouth(portrait, face_landmarks(portrait))
    voices = []
    for i, period in enumerate((0.24, 0.32, 0.4)):  # bursts of a tone, 2 s
        t = np.arange(2 * sr) / sr
        wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * t / period) > 0)
        write_wav(tmp_path / f"v{i}.wav", wave.astype(np.float32), sr)
        voices.append((f"v{i}", tmp_path / f"v{i}.wav"))

    calls = []

    class Talking:  # the pipeline's call and its audio projection, as voice_figures reads them
        audio_projection = SimpleNamespace(mouth_head=None)

        def __call__(self, image, audio, sampling_rate, **kwargs):
            calls.append((id(image), len(audio)))
            loud = loudness_envelope(audio, sampling_rate, round(len(audio) / sampling_rate * 25), 25.0) > -30
            frames = np.stack([portrait if is_loud else closed for is_loud in loud]).astype(np.float32) / 255
            return SimpleNamespace(frames=frames)

    other = portrait.copy()
    cases = [("a", portrait, None, None), ("b", other, None, None)]
    summary = load_eval().voice_figures(Talking(), cases, voices, tmp_path, 2.0, {}, prefix="recordings")
    rows = summary["recordings_cases"]
    assert [(r["case"], r["voice"]) for r in rows] == [("a", "v0"), ("b", "v1"), ("a", "v2")]
    assert [c[0] for c in calls] == [id(portrait), id(other), id(portrait)]
    assert all(n == 2 * sr for _, n in calls)
    assert summary["recordings_face_found"] == 1.0
    assert summary["recordings_lipsync_r"] > 0.8, rows
    assert "recordings_drive_r" not in summary
    assert (tmp_path / "recordings_contact_sheet.png").is_file()

"""How well a model's mouth head follows voices it never heard: the opening it asks for, against the sound.

    python benchmarks/probe_mouth_head.py --model runs/posed4-speech [--model runs/other ...] [--data ../shared/data]

For each model with a mouth head (a posed reference or a mouth drive; `training.mouth.fit_mouth_head`), no
diffusion, only the audio encoder and the head:
- espeak-ng: three sentences (the first is `eval_embedded.py`'s) in the five voices `eval_embedded.py` uses
  (en-us, en+f3, de, fr, es: kept out of `training.spoken_phonemes.training_speech`), 4 s each: the correlation of
  the head's opening with the loudness, per voice and in the mean;
- the held-out real clips (`training.splits`), 3 s each: the correlation with the loudness, and with the mouth
  opening MediaPipe measures on the clip's own frames.
Prints one JSON line per model and appends it to benchmarks/results_mouth_head.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval_embedded import ESPEAK_SENTENCE, ESPEAK_VOICES, espeak, real_clip  # noqa: E402

from pipeline import EmoPipeline  # noqa: E402
from pipeline.audio import load_audio  # noqa: E402
from pipeline.metrics import correlation, loudness_envelope, mouth_opening  # noqa: E402
from training.splits import heldout_files  # noqa: E402

SR, FPS = 16_000, 25.0
SENTENCES = (
    ESPEAK_SENTENCE,
    "My brother keeps a small boat on the lake, but he has never taken it out in the rain.",
    "Please open the window before the meeting starts, it is far too warm in here.",
)


def head_opening(pipe: EmoPipeline, audio: np.ndarray, frames: int) -> np.ndarray:
    with torch.no_grad():
        features = pipe.audio_frame_features(audio, frames, FPS, pipe.device)
        return pipe.audio_projection.mouth_opening(features)[0].float().cpu().numpy()


def probe(model: Path, real_cases: list) -> dict:
    pipe = EmoPipeline.from_pretrained(model)
    if pipe.audio_projection.mouth_head is None:
        raise SystemExit(f"{model}: its audio projection has no mouth head")
    by_voice = {}
    with tempfile.TemporaryDirectory() as folder:
        for voice in ESPEAK_VOICES:
            values = []
            for i, sentence in enumerate(SENTENCES):
                path = espeak(voice, Path(folder), sentence, name=f"sentence{i}")
                audio = load_audio(path, sampling_rate=SR, mono=True).mono[: 4 * SR]
                frames = int(len(audio) / SR * FPS)
                values.append(
                    correlation(head_opening(pipe, audio, frames), loudness_envelope(audio, SR, frames, FPS))
                )
            by_voice[voice] = float(np.mean(values))
    with_loudness, with_mouth = [], []
    for audio, measured in real_cases:
        opening = head_opening(pipe, audio, len(measured))
        with_loudness.append(correlation(opening, loudness_envelope(audio, SR, len(measured), FPS)))
        known = np.isfinite(measured)
        with_mouth.append(correlation(opening[known], measured[known]))
    return {
        "date": str(date.today()),
        "model": str(model),
        "hidden": pipe.audio_projection.config.mouth_head_hidden,
        "espeak_r": float(np.mean(list(by_voice.values()))),
        "espeak_r_by_voice": by_voice,
        "real_r_loudness": float(np.nanmean(with_loudness)),
        "real_r_measured_mouth": float(np.nanmean(with_mouth)),
        "real_clips": len(real_cases),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    real_cases = []
    for path in heldout_files(args.data, "real", (".mp4",)):
        frames, audio = real_clip(path, 3.0, 128)
        real_cases.append((audio, mouth_opening(frames)))
    rows = []
    for model in args.model:
        rows.append(probe(model, real_cases))
        print(json.dumps(rows[-1]), flush=True)
        with open(ROOT / "benchmarks" / "results_mouth_head.jsonl", "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    return rows


if __name__ == "__main__":
    main()

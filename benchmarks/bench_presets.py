"""What each speed preset costs: time, and change of the video against the 40-step DDIM (`quality`) output.

    python benchmarks/bench_presets.py [--model assets/models/emo-small] [--seconds 3] [--threads 2]
        [--fast-steps 6 8] [--app-steps 6]

One held-out portrait and voice of `../shared/data` (never trained on), seed 0, every preset of
`pipeline.presets` (and the model's own default when it runs a preset at another number of steps): seconds
per second of video, speed-up over `quality`, PSNR and SSIM of the frames against `quality`'s, and the
lip-sync measure of `pipeline.metrics` for each (`--fast-steps`: also `fast` at those numbers of steps, for a
model that needs fewer to meet its budget). Then the app's whole path
(`emo_app.generate`: face crop, generation with the model's own defaults, mp4 with sound) on a 5-second voice
-- the embedded model's target is 60 s or less on 2 CPU cores (`--app-steps`: at that number of steps instead
of the model's). One JSON line per run is appended to
benchmarks/results_presets.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import EmoPipeline  # noqa: E402
from pipeline.audio import load_audio, write_wav  # noqa: E402
from pipeline.face import crop_face  # noqa: E402
from pipeline.metrics import lipsync_correlation, psnr, ssim  # noqa: E402
from pipeline.presets import PRESETS  # noqa: E402
from training.splits import heldout_files  # noqa: E402

SR = 16_000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets/models/emo-small"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--fast-steps", type=int, nargs="*", default=[], help="also `fast` at these steps")
    parser.add_argument(
        "--app-steps", type=int, help="the app path at this many steps (default: the model's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = EmoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    faces = heldout_files(args.data, "faces", (".jpg", ".jpeg", ".png"))
    voices = heldout_files(args.data, "grid_s1", (".mp4",))
    portrait = crop_face(faces[0], size=pipe.default_size).image
    voice = load_audio(voices[0], sampling_rate=SR, mono=True).mono
    audio = voice[: round(args.seconds * SR)]

    runs = {name: {"preset": name} for name in PRESETS}
    defaults = pipe.resolved_defaults()
    if (
        defaults["preset"]
        and defaults["num_inference_steps"] != PRESETS[defaults["preset"]].num_inference_steps
    ):
        # a model tuned to its own number of steps of a preset: measure that too
        runs["model default"] = {
            "preset": defaults["preset"],
            "num_inference_steps": defaults["num_inference_steps"],
        }
    for steps in args.fast_steps:
        runs[f"fast, {steps} steps"] = {"preset": "fast", "num_inference_steps": steps}
    rows, frames = {}, {}
    for name, run in runs.items():
        started = time.time()
        frames[name] = pipe(portrait, audio, sampling_rate=SR, **run, output_type="np",
                            generator=torch.manual_seed(0)).frames  # fmt: skip
        elapsed = time.time() - started
        rows[name] = {**run, "seconds_per_second": elapsed / args.seconds,
                      "lipsync_r": lipsync_correlation(frames[name], audio, SR, 25.0)}  # fmt: skip
    for name in runs:
        rows[name]["speedup"] = rows["quality"]["seconds_per_second"] / rows[name]["seconds_per_second"]
        rows[name]["psnr_vs_quality"] = psnr(frames[name], frames["quality"])
        rows[name]["ssim_vs_quality"] = ssim(frames[name], frames["quality"])
        print(name, json.dumps(rows[name]), flush=True)

    # the app's path with the model's defaults on a 5-second voice
    from emo_app.generate import GenerationSettings, generate

    five = np.resize(voice, 5 * SR)
    with tempfile.TemporaryDirectory() as tmp:
        write_wav(Path(tmp) / "voice.wav", five, SR)
        started = time.time()
        generate(pipe, str(faces[0]), str(Path(tmp) / "voice.wav"), Path(tmp) / "out.mp4",
                 GenerationSettings(seed=0, steps=args.app_steps).with_model_defaults(pipe.resolved_defaults()))  # fmt: skip
        app_seconds = time.time() - started

    summary = {
        "date": str(date.today()),
        "model": args.model,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "portrait": faces[0].name,
        "voice": voices[0].name,
        "seconds": args.seconds,
        "presets": rows,
        "defaults": pipe.resolved_defaults(),
        "app_5s_voice_seconds": app_seconds,
        "app_steps": args.app_steps or pipe.resolved_defaults()["num_inference_steps"],
    }
    with open(ROOT / "benchmarks" / "results_presets.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "presets"}, indent=1))
    return summary


if __name__ == "__main__":
    main()

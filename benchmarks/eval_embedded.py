"""How well a model animates people and sentences it never saw: lip-sync, identity, stability, head speed.

    python benchmarks/eval_embedded.py [--model assets/models/emo-small] [--data ../shared/data] [--seconds 3]
        [--preset P] [--steps N] [--guidance-scale G] [--seed S] [--skip-espeak | --espeak-only | --recordings]
        [--vae-only]

Inputs are the held-out part of `../shared/data` (`training.splits`): the first frame of each held-out real
clip with the clip's own voice, and the held-out photos with held-out GRID sentences and recordings. Every
video is made with seed 0 (or `--seed`) and the model's own default settings, or the preset, steps and audio
guidance given (the figures of other settings, e.g. a stronger audio guidance, against the defaults). Figures (`pipeline.metrics`):
- lip-sync: correlation of the mouth opening with the loudness, per video, next to the same measure on the
  real held-out clips (the ceiling of this measure); and on clear synthetic speech (espeak-ng, when it is
  installed): every held-out portrait saying one sentence in 5 voices and languages (en-us, en+f3, de, fr,
  es, in turn), 4 s, where loudness marks the syllables well (`--espeak-only`: these cases alone); for a
  model with a mouth head (a mouth drive or a posed reference) also "drive_r", the same measure of the
  opening its mouth head asked for, and "mouth_vs_drive_r", the correlation of the generated opening with it (how well the denoiser follows);
  `--recordings` alone: the same on every recording of `speech/` (48 people's speech in several languages, and
  singing; no training stage uses them), each on the next portrait in turn, 4 s each;
- identity: the 32x32 colour distance of each video's frames to every portrait; "nearest" is the share of
  videos closest to their own portrait, "margin" the mean gap to the nearest other portrait; the same with
  SSIM at full resolution (structure: a blurry generic face in the portrait's colours scores low);
- mouth motion: the spread (standard deviation) of the generated mouth opening over the real clip's, for the
  held-out clips and for 3 held-out GRID sentences animated from their own first frame (GRID's speaker was
  seen in training, the sentences were not): lip-sync r can be high while the mouth barely moves; next to
  it the same ratio of the real clip passed through the model's VAE (encoded and decoded): the most mouth
  motion its latents and decoder can show;
- stability: mean frame-to-frame change, generated and real;
- head speed: measured head rotation (degrees/frame) of one portrait animated at head_speed 0.2 and 1.5, with
  the share of frames where MediaPipe found a pose (NaN with fewer than two: no measurement);
- time: seconds per second of video on this machine.
Writes one JSON line to benchmarks/results_eval.jsonl and contact sheets under outputs/eval/ (the espeak-ng
cases' in espeak_contact_sheet.png: the portrait, then every 12th frame).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import EmoPipeline  # noqa: E402
from pipeline.audio import load_audio  # noqa: E402
from pipeline.face import crop_face, head_poses, head_rotation_speed  # noqa: E402
from pipeline.metrics import (  # noqa: E402
    appearance_distance,
    contact_sheet,
    correlation,
    lipsync_correlation,
    loudness_envelope,
    mouth_opening,
    ssim,
    temporal_change,
)
from training.splits import heldout_files  # noqa: E402

SR = 16_000
ESPEAK_VOICES = ("en-us", "en+f3", "de", "fr", "es")
ESPEAK_SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest again."


def espeak(voice: str, folder: Path, sentence: str = ESPEAK_SENTENCE, name: str = "espeak") -> Path:
    """`sentence` spoken by espeak-ng's `voice` (150 words/min) -> the wav file `folder/<name>_<voice>.wav`."""
    import subprocess

    path = folder / f"{name}_{voice}.wav"
    if not path.is_file():
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), sentence], check=True)
    return path


def voice_figures(
    pipe: EmoPipeline,
    cases: list,
    voices: list[tuple[str, Path]],
    folder: Path,
    seconds: float,
    settings: dict,
    seed: int = 0,
    prefix: str = "espeak",
) -> dict:
    """Lip-sync of portraits on (label, audio file) `voices`, the longer list of the two run through once and the
    other reused in turn (see the module doc) -> summary with per-case rows, keys starting with `prefix`; the
    contact sheet is `folder/<prefix>_contact_sheet.png`."""
    rows, sheet = [], []
    for i in range(max(len(cases), len(voices))):
        name, portrait, _, _ = cases[i % len(cases)]
        voice, path = voices[i % len(voices)]
        audio = load_audio(path, sampling_rate=SR, mono=True).mono[: round(seconds * SR)]
        frames = pipe(
            portrait, audio, sampling_rate=SR, output_type="np", generator=torch.manual_seed(seed), **settings
        ).frames
        opening = mouth_opening(frames)
        sheet.append([portrait, *frames[:: max(1, len(frames) // 8)][:8]])
        drive = {}
        # a mouth-drive model: the opening its head asked for, by the same measure
        if pipe.audio_projection.mouth_head is not None:
            with torch.no_grad():
                features = pipe.audio_frame_features(audio, len(frames), 25.0, pipe.device)
                asked = pipe.audio_projection.mouth_opening(features)[0].float().cpu().numpy()
            drive["drive_r"] = correlation(asked, loudness_envelope(audio, SR, len(frames), 25.0))
            drive["mouth_vs_drive_r"] = correlation(opening, asked)
        rows.append({
            "case": name,
            "voice": voice,
            "lipsync_r": lipsync_correlation(frames, audio, SR, 25.0),
            **drive,
            "mouth_opening_std": float(np.nanstd(opening)) if np.isfinite(opening).any() else float("nan"),
            "face_found": float(np.isfinite(opening).mean()),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    contact_sheet(sheet[:16]).save(folder / f"{prefix}_contact_sheet.png")
    values = [r["lipsync_r"] for r in rows if np.isfinite(r["lipsync_r"])]
    return {
        f"{prefix}_lipsync_r": float(np.mean(values)) if values else float("nan"),
        f"{prefix}_mouth_opening_std": float(np.nanmean([r["mouth_opening_std"] for r in rows])),
        **{
            f"{prefix}_{key}": float(np.nanmean([r[key] for r in rows]))
            for key in ("drive_r", "mouth_vs_drive_r", "face_found")
            if rows and key in rows[0]
        },
        f"{prefix}_cases": rows,
    }


def real_clip(path: Path, seconds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """First `seconds` of a held-out clip: (frames cropped like the training data, 16 kHz audio)."""
    from training.prepare import read_video_frames

    frames = []
    for frame in read_video_frames(path, 25.0):
        frames.append(frame)
        if len(frames) >= round(seconds * 25):
            break
    crop = crop_face(frames[0], size=size)
    box = crop.box
    crops = np.stack([np.asarray(crop_face(f, size=size, box=box).image) for f in frames])
    audio = load_audio(path, sampling_rate=SR, mono=True).mono[: round(seconds * SR)]
    return crops, audio


def mouth_motion_ratio(frames: np.ndarray, real: np.ndarray) -> float:
    """The spread of the mouth opening of `frames` over the real clip's."""
    return float(np.nanstd(mouth_opening(frames)) / np.nanstd(mouth_opening(real)))


def real_figures(frames: np.ndarray, real: np.ndarray, audio: np.ndarray) -> dict:
    """Lip-sync and stability of the real clip, and the generated mouth's spread of opening over the real one's."""
    return {
        "real_lipsync_r": lipsync_correlation(real, audio, SR, 25.0),
        "real_temporal_change": temporal_change(real),
        "mouth_motion_ratio": mouth_motion_ratio(frames, real),
    }


def vae_round_trip(pipe: EmoPipeline, frames: np.ndarray) -> np.ndarray:
    """The real frames (f, H, W, 3) uint8 encoded and decoded by the model's VAE: what its latents can show."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def vae_ceiling(pipe: EmoPipeline, model: str, cases: list, grid_cases: list) -> dict:
    """`--vae-only`: the mouth motion ratio and lip-sync r of the real held-out clips after the VAE round trip,
    appended to results_eval.jsonl as a "vae_round_trip" line."""
    rows = {}
    for group, chosen in (("clips", cases), ("grid", grid_cases)):
        figures = []
        for name, _, audio, real in chosen:
            passed = vae_round_trip(pipe, real)
            row = {"case": name, "lipsync_r": lipsync_correlation(passed, audio, SR, 25.0)}
            figures.append(row | real_figures(passed, real, audio))
            print(json.dumps(figures[-1]), flush=True)
        rows[group] = figures
    summary = {
        "date": str(date.today()),
        "model": str(model),
        "kind": "vae_round_trip",
        "vae_mouth_motion_ratio": float(np.nanmean([r["mouth_motion_ratio"] for r in rows["clips"]])),
        "vae_lipsync_r": float(np.nanmean([r["lipsync_r"] for r in rows["clips"]])),
        "real_lipsync_r": float(np.nanmean([r["real_lipsync_r"] for r in rows["clips"]])),
        "grid_vae_mouth_motion_ratio": float(np.nanmean([r["mouth_motion_ratio"] for r in rows["grid"]])),
        "grid_vae_lipsync_r": float(np.nanmean([r["lipsync_r"] for r in rows["grid"]])),
        "grid_real_lipsync_r": float(np.nanmean([r["real_lipsync_r"] for r in rows["grid"]])),
        "per_case": rows["clips"],
        "grid_cases": rows["grid"],
    }
    with open(ROOT / "benchmarks" / "results_eval.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("per_case", "grid_cases")}, indent=1))
    return summary


def identity_scores(videos: list, portraits: list, distance) -> tuple[float, float, float]:
    """(mean distance of each video to its own portrait, share of videos nearest to their own portrait, mean
    gap to the nearest other portrait), over every 5th frame."""
    table = np.array([[np.mean([distance(f, p) for f in video[::5]]) for p in portraits] for video in videos])
    own = np.diag(table)
    others = np.where(np.eye(len(portraits), dtype=bool), np.inf, table).min(axis=1)
    return float(np.mean(own)), float(np.mean(own < others)), float(np.mean(others - own))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets/models/emo-small"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-cases", type=int, default=0, help="first N cases only (a quick check)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "eval")
    parser.add_argument("--preset", help="a generation preset instead of the model's own default")
    parser.add_argument("--steps", type=int, help="denoising steps instead of the model's (or preset's)")
    parser.add_argument("--guidance-scale", type=float, help="audio guidance instead of the model's")
    parser.add_argument(
        "--espeak-only",
        action="store_true",
        help="only the lip-sync on espeak-ng speech (a quick comparison)",
    )
    parser.add_argument(
        "--recordings",
        action="store_true",
        help="only the lip-sync on every recording of speech/ (languages, singing), a portrait each in turn",
    )
    parser.add_argument(
        "--espeak-seconds", type=float, default=4.0, help="seconds of each espeak-ng or recording case"
    )
    parser.add_argument(
        "--skip-espeak",
        action="store_true",
        help="leave out the espeak-ng lip-sync (measured once per model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed for every video")
    parser.add_argument(
        "--vae-only",
        action="store_true",
        help="only the real held-out clips through the model's VAE: the mouth motion its latents can show",
    )
    args = parser.parse_args(argv)
    if args.skip_espeak and args.espeak_only:
        parser.error("--skip-espeak and --espeak-only exclude each other")
    if args.recordings and (args.espeak_only or args.vae_only):
        parser.error("--recordings runs alone: leave out --espeak-only and --vae-only")
    seed = args.seed
    settings = {
        key: value
        for key, value in (
            ("preset", args.preset),
            ("num_inference_steps", args.steps),
            ("guidance_scale", args.guidance_scale),
        )
        if value is not None
    }
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = EmoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_size
    args.out.mkdir(parents=True, exist_ok=True)

    # cases: (name, portrait crop, audio, real frames or None)
    cases = []
    for path in heldout_files(args.data, "real", (".mp4",)):
        frames, audio = real_clip(path, args.seconds, size)
        cases.append((path.stem, frames[0], audio, frames))
    voices = heldout_files(args.data, "grid_s1", (".mp4",))[:3] + heldout_files(
        args.data, "speech", (".flac",)
    )
    for i, path in enumerate(heldout_files(args.data, "faces", (".jpg", ".jpeg", ".png"))):
        voice = voices[i % len(voices)]
        audio = load_audio(voice, sampling_rate=SR, mono=True).mono[: round(args.seconds * SR)]
        cases.append((path.stem, np.asarray(crop_face(path, size=size).image), audio, None))

    if args.max_cases:
        cases = cases[: args.max_cases]
    grid_cases = []  # the GRID speaker (seen in training) saying held-out sentences: mouth motion only
    for path in heldout_files(args.data, "grid_s1", (".mp4",))[:3]:
        frames, audio = real_clip(path, args.seconds, size)
        grid_cases.append((path.stem, frames[0], audio, frames))
    if args.vae_only:
        return vae_ceiling(pipe, args.model, [c for c in cases if c[3] is not None], grid_cases)
    synthetic = {}
    if args.recordings:
        recordings = [(p.stem, p) for p in sorted((args.data / "speech").glob("*.flac"))]
        synthetic = voice_figures(
            pipe, cases, recordings, args.out, args.espeak_seconds, settings, seed, prefix="recordings"
        )
    elif shutil.which("espeak-ng") and not args.skip_espeak:
        voices = [(voice, espeak(voice, args.out)) for voice in ESPEAK_VOICES]
        synthetic = voice_figures(pipe, cases, voices, args.out, args.espeak_seconds, settings, seed)
    elif args.espeak_only:
        raise SystemExit("--espeak-only: espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    if args.espeak_only or args.recordings:
        summary = {"date": str(date.today()), "model": str(args.model), "cases": len(cases), **synthetic}
        with open(ROOT / "benchmarks" / "results_eval.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_cases")}, indent=1))
        return summary
    results, videos, seconds_of_video, seconds_spent = [], [], 0.0, 0.0
    for name, portrait, audio, real in cases:
        started = time.time()
        frames = pipe(
            portrait, audio, sampling_rate=SR, output_type="np", generator=torch.manual_seed(seed), **settings
        ).frames
        seconds_spent += time.time() - started
        seconds_of_video += len(audio) / SR
        row = {
            "case": name,
            "lipsync_r": lipsync_correlation(frames, audio, SR, 25.0),
            "temporal_change": temporal_change(frames),
        }
        if real is not None:
            row |= real_figures(frames, real, audio)
            row["vae_mouth_motion_ratio"] = mouth_motion_ratio(vae_round_trip(pipe, real), real)
        results.append(row)
        videos.append(frames)
        print(json.dumps(row), flush=True)
    grid_results = []
    for name, portrait, audio, real in grid_cases:
        frames = pipe(
            portrait, audio, sampling_rate=SR, output_type="np", generator=torch.manual_seed(seed), **settings
        ).frames
        row = {"case": name, "lipsync_r": lipsync_correlation(frames, audio, SR, 25.0)}
        row["vae_mouth_motion_ratio"] = mouth_motion_ratio(vae_round_trip(pipe, real), real)
        grid_results.append(row | real_figures(frames, real, audio))
        print(json.dumps(grid_results[-1]), flush=True)

    # identity: each video against every portrait, by 32x32 colour distance and by structure at full
    # resolution (1 - SSIM: a blurry, generic face in the right colours fails it)
    portraits = [c[1] for c in cases]
    _, nearest, margin = identity_scores(videos, portraits, appearance_distance)
    ssim_distance, nearest_ssim, margin_ssim = identity_scores(
        videos, portraits, lambda f, p: 1.0 - ssim(f, p)
    )

    # head speed: one portrait, the same voice and seed, two speeds
    name, portrait, audio, _ = cases[0]
    head = {}
    for speed in (0.2, 1.5):
        frames = pipe(
            portrait,
            audio,
            sampling_rate=SR,
            head_speed=speed,
            output_type="np",
            generator=torch.manual_seed(seed),
            **settings,
        ).frames
        poses = head_poses([(f * 255).astype(np.uint8) for f in frames])
        found = sum(pose is not None for pose in poses)
        # head_rotation_speed reads 0 with fewer than two poses: that is no measurement, not a still head
        measured = float(np.mean(head_rotation_speed(poses))) if found >= 2 else float("nan")
        head[str(speed)] = {
            "measured_deg_per_frame": measured,
            "pose_found": found / len(poses),
            "temporal_change": temporal_change(frames),
        }

    def mean(key: str, rows: list[dict] = results) -> float:
        values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        return float(np.mean(values)) if values else float("nan")

    summary = {
        "date": str(date.today()),
        "model": str(args.model),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "size": size,
        "defaults": pipe.resolved_defaults(**settings),
        "cases": len(cases),
        "seconds": args.seconds,
        "seed": seed,
        "lipsync_r": mean("lipsync_r"),
        "lipsync_r_clip_portraits": float(
            np.nanmean([r["lipsync_r"] for r in results if "real_lipsync_r" in r])
        ),
        "real_lipsync_r": mean("real_lipsync_r"),
        "mouth_motion_ratio": mean("mouth_motion_ratio"),
        "grid_lipsync_r": mean("lipsync_r", grid_results),
        "grid_real_lipsync_r": mean("real_lipsync_r", grid_results),
        "grid_mouth_motion_ratio": mean("mouth_motion_ratio", grid_results),
        "vae_mouth_motion_ratio": mean("vae_mouth_motion_ratio"),
        "grid_vae_mouth_motion_ratio": mean("vae_mouth_motion_ratio", grid_results),
        "identity_nearest": nearest,
        "identity_margin": margin,
        "identity_ssim": 1.0 - ssim_distance,
        "identity_ssim_nearest": nearest_ssim,
        "identity_ssim_margin": margin_ssim,
        "temporal_change": mean("temporal_change"),
        "real_temporal_change": mean("real_temporal_change"),
        "head_speed": head,
        "seconds_per_second_of_video": seconds_spent / seconds_of_video,
        "per_case": results,
        "grid_cases": grid_results,
        **synthetic,
    }
    with open(ROOT / "benchmarks" / "results_eval.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    rows = [[c[1], *v[:: max(1, len(v) // 6)][:6]] for c, v in zip(cases, videos, strict=True)]
    contact_sheet(rows).save(args.out / "contact_sheet.png")
    contact_sheet(rows[:4]).save(args.out / "frame_strip.png")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("per_case", "espeak_cases")}, indent=1))
    return summary


if __name__ == "__main__":
    main()

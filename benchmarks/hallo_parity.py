"""Does a converted Hallo model reproduce Hallo's own inference? Frame-by-frame difference to its output.

    python -m pipeline.convert hallo --release REL --output /tmp/hallo-converted --dtype fp32
    python benchmarks/hallo_parity.py --model /tmp/hallo-converted --inputs IN --reference out.npz

IN holds what Hallo's `scripts/inference.py` was given: `ref.png`, `audio.wav` (16 kHz), `face_emb.npy` (the
512-d insightface embedding), `masks/ref_face_mask.png` and `masks/ref_sep_{background,face,lip}.png` (Hallo's
cached masks, named after the image), and `noise.pt`, the initial noise of every clip (1, 4, clips x 16, h, w).
The reference .npz holds Hallo's frames as `frames` (T, H, W, 3) in [0, 1]; with `dbg_clip{k}_step{i}` (the
latents after each DDIM step) the per-step differences are printed too, to find where two runs part.
Runs in float32 on the CPU with one thread, as the parity check does. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import EmoPipeline  # noqa: E402


def read_wav(path: Path) -> np.ndarray:
    """16-bit mono PCM at 16 kHz as float32 / 32768 (what librosa gives Hallo for such a file)."""
    with wave.open(str(path)) as f:
        if (f.getnchannels(), f.getsampwidth(), f.getframerate()) != (1, 2, 16000):
            raise ValueError(f"{path}: expected 16-bit mono 16 kHz PCM")
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


def hallo_inputs(folder: Path, image_name: str = "ref") -> dict:
    """The inputs Hallo was given, as EmoPipeline arguments."""
    masks = folder / "masks"
    region = {
        name: np.asarray(Image.open(masks / f"{image_name}_sep_{file}.png").convert("L"))
        for name, file in (("full", "background"), ("face", "face"), ("lip", "lip"))
    }
    return dict(
        image=Image.open(folder / f"{image_name}.png").convert("RGB"),
        audio=read_wav(folder / "audio.wav"),
        face_embedding=np.load(folder / "face_emb.npy"),
        face_mask=Image.open(masks / f"{image_name}_face_mask.png"),  # an image: resized as Hallo resizes it
        region_masks=region,
        latents=torch.load(folder / "noise.pt", weights_only=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a converted Hallo folder (fp32)")
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="Hallo's output .npz (frames)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--size", type=int, help="pixels of the video (default: the portrait's width)")
    for region in ("pose", "face", "lip"):
        parser.add_argument(f"--{region}-weight", type=float, default=1.0)
    parser.add_argument("--save", type=Path, help="write our frames here (.npy)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = EmoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    data = hallo_inputs(args.inputs)
    reference = np.load(args.reference)
    latents_after: list[np.ndarray] = []

    def on_step(p, step, t, tensors):
        latents_after.append(tensors["latents"].float().numpy())
        return tensors

    size = args.size or data["image"].size[0]
    started = time.perf_counter()
    out = pipe(
        data["image"], data["audio"], sampling_rate=16000, height=size, width=size,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, face_embedding=data["face_embedding"],
        face_mask=data["face_mask"], region_masks=data["region_masks"], latents=data["latents"],
        pose_weight=args.pose_weight, face_weight=args.face_weight, lip_weight=args.lip_weight,
        output_type="np", callback_on_step_end=on_step,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    frames = np.asarray(out.frames, np.float32)
    if args.save:
        np.save(args.save, frames)
    theirs = reference["frames"].astype(np.float32)
    result = {
        "frames": list(frames.shape),
        "reference_frames": list(theirs.shape),
        "seconds": round(seconds, 2),
    }
    if frames.shape == theirs.shape:
        diff = np.abs(frames - theirs)
        result |= {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                   "max_abs_per_frame": [round(float(d), 6) for d in diff.reshape(len(diff), -1).max(1)]}  # fmt: skip
    steps = {}
    for n, ours in enumerate(latents_after):
        key = f"dbg_clip{n // args.steps}_step{n % args.steps}"
        if key in reference.files:
            steps[key] = float(np.abs(ours - reference[key]).max())
    result["latents_max_abs"] = steps
    print(json.dumps(result))


if __name__ == "__main__":
    main()

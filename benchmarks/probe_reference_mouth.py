"""Does the generated mouth follow the mouth of the injected reference latents? A probe for a "posed reference".

    python benchmarks/probe_reference_mouth.py [--model assets/checkpoints/emo-small4] [--photos 4]
        [--openings 0 0.06 0.12] [--seconds 2] [--threads 2]

The idea it tests: the small models keep the portrait through the reference latents added to every frame
(`reference_latent_channels`), and copy from them closely; if they also copied the mouth, a voice-driven
opening could be drawn into those latents frame by frame (the portrait's mouth opened by the warp of
`training.talking_photos`) without retraining. For each held-out photo (`training.splits`) and each opening
(a fraction of the face height), the backbone gets the latents of the photo with its mouth opened by that much
in place of the plain photo's (a forward pre-hook swaps them; ReferenceNet and the motion frames still see the
plain photo), with espeak-ng's en-us sentence and seed 0. Printed per photo and opening: the mouth opening
MediaPipe measures on the warped photo, the mean opening of the generated frames and the share of frames
where it found a face. One JSON line goes to benchmarks/results_probe.jsonl; a contact sheet (per photo and
opening: the warped photo, then the frames at a third and two thirds of the video) to outputs/probe/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import EmoPipeline  # noqa: E402
from pipeline.audio import load_audio  # noqa: E402
from pipeline.face import crop_face, face_landmarks  # noqa: E402
from pipeline.metrics import CHIN, FOREHEAD, contact_sheet, mouth_opening  # noqa: E402
from pipeline.mouth_pose import open_mouth  # noqa: E402
from training.splits import heldout_files  # noqa: E402

SR = 16_000
SENTENCE = "The quick brown fox jumps over the lazy dog."


def with_injected(pipe: EmoPipeline, latents: torch.Tensor):
    """A handle of a backbone pre-hook that gives every row with a reference `latents` as its injected
    reference latents (rows without one, the unconditional branch's zeros, stay zero)."""

    def hook(module, args, kwargs):
        given = kwargs.get("reference_latents")
        if given is not None:
            used = given.flatten(1).abs().amax(1) > 0
            swapped = torch.where(used[:, None, None, None], latents.to(given), given)
            kwargs = {**kwargs, "reference_latents": swapped}
        return args, kwargs

    return pipe.denoising_unet.register_forward_pre_hook(hook, with_kwargs=True)


def probe(
    pipe: EmoPipeline, portrait: np.ndarray, audio: np.ndarray, openings, sheet: list | None = None
) -> list[dict]:
    """One portrait (uint8, the model's size) -> per opening: warped photo's and generated mouth opening.
    `sheet`: a list that gets one contact-sheet row (per opening the warped photo and two generated frames)."""
    if not pipe.denoising_unet.config.reference_latent_channels:
        raise ValueError("the model has no reference-latent injection (`reference_latent_channels` 0)")
    size = pipe.default_size
    landmarks = face_landmarks(portrait)
    if landmarks is None:
        raise ValueError("no face found in the portrait")
    face = float(np.hypot(*(landmarks[FOREHEAD] - landmarks[CHIN])))
    rows, images = [], []
    for fraction in openings:
        warped = open_mouth(portrait, landmarks, fraction * face)
        # as a PIL image: diffusers reads a numpy image as floats in [0, 1]
        image = PIL.Image.fromarray(warped)
        latents = pipe.encode_image(pipe.image_processor.preprocess(image, height=size, width=size))
        handle = with_injected(pipe, latents)
        try:
            frames = pipe(
                portrait, audio, sampling_rate=SR, output_type="np", generator=torch.manual_seed(0)
            ).frames
        finally:
            handle.remove()
        images += [warped, frames[len(frames) // 3], frames[2 * len(frames) // 3]]
        generated = mouth_opening(frames)
        found = np.isfinite(generated)
        rows.append({
            "opening": fraction,
            "warped_mouth": float(mouth_opening([warped])[0]),
            "generated_mouth": float(np.nanmean(generated)) if found.any() else float("nan"),
            "face_found": float(found.mean()),
        })  # fmt: skip
    if sheet is not None:
        sheet.append(images)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets/checkpoints/emo-small4"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--openings", type=float, nargs="+", default=[0.0, 0.06, 0.12])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "probe")
    args = parser.parse_args(argv)
    if not shutil.which("espeak-ng"):
        raise SystemExit(
            "espeak-ng is not installed (Debian: apt-get install espeak-ng): the probe speaks with it"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = EmoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), SENTENCE], check=True)
        audio = load_audio(wav, sampling_rate=SR, mono=True).mono[: round(args.seconds * SR)]
    results, sheet = {}, []
    for path in heldout_files(args.data, "faces", (".jpg", ".jpeg", ".png"))[: args.photos]:
        portrait = np.asarray(crop_face(path, size=pipe.default_size).image)
        results[path.stem] = probe(pipe, portrait, audio, args.openings, sheet)
        print(path.stem, json.dumps(results[path.stem]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet).save(args.out / "contact_sheet.png")
    summary = {
        "date": str(date.today()),
        "model": str(args.model),
        "seconds": args.seconds,
        "photos": results,
    }
    with open(ROOT / "benchmarks" / "results_probe.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()

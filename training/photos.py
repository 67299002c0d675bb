"""Still portraits -> pseudo-clips for stage 1: many identities, each frame a slightly moved view of the photo.

    python -m training.photos --photos DIR --out DIR [--size 128] [--frames 12] [--skip-heldout]

Stage 1 learns to copy the person of the reference into the target frame. Video clips give few people;
photos give many. Each photo becomes one clip of `frames` frames in `training.prepare`'s layout (so
`EmoDataset` reads it like any clip, the reference and the target drawn from the same photo): the face crop
under small random shifts, zooms, rotations and brightness changes, the face box moved with it. A photo has
no sound: the folder serves stage 1 only (`data.root: [videos, photos]`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from pipeline.face import NoFaceError, crop_face

from .prepare import PrepareOptions, write_manifest

logger = logging.getLogger("training.photos")

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def augmented_views(
    crop: Image.Image, box: tuple[float, float, float, float], frames: int, rng: np.random.Generator
) -> tuple[list[Image.Image], list[list[float]]]:
    """`frames` views of a square crop (shift <= 3 %, zoom 0.94-1.06, rotation <= 4 degrees, brightness
    0.9-1.1) and the face box of each (moved by the same shift and zoom)."""
    size = crop.size[0]
    views, boxes = [], []
    for t in range(frames):
        if t == 0:
            dx = dy = angle = 0.0
            zoom = bright = 1.0
        else:
            dx, dy = rng.uniform(-0.03, 0.03, 2) * size
            zoom, angle, bright = rng.uniform(0.94, 1.06), rng.uniform(-4, 4), rng.uniform(0.9, 1.1)
        c = size / 2
        # output pixel p comes from input pixel c + (p - c - d) / zoom (rotation about the centre)
        view = crop.rotate(angle, resample=Image.BICUBIC, center=(c, c))
        a = 1 / zoom
        view = view.transform(
            (size, size),
            Image.AFFINE,
            (a, 0, c - a * (c + dx), 0, a, c - a * (c + dy)),
            resample=Image.BICUBIC,
        )
        views.append(ImageEnhance.Brightness(view).enhance(bright))
        x0, y0, x1, y1 = box
        boxes.append(
            [round(float(c + (v - c) * zoom + d), 2) for v, d in ((x0, dx), (y0, dy), (x1, dx), (y1, dy))]
        )
    return views, boxes


def prepare_photo(path: Path, name: str, out: Path, size: int, frames: int, seed: int) -> bool:
    """One photo -> `out/videos/name/` (one clip); False when it has no face."""
    final = out / "videos" / name
    if (final / "meta.json").is_file():
        return True
    big = round(size * 1.25)  # augment a wider crop, keep its centre: no empty corners
    try:
        crop = crop_face(path, size=big, margin=0.875)  # centre `size` px = the 0.6 margin of the videos
    except (NoFaceError, OSError, ValueError) as error:
        logger.info("skipped %s: %s", path.name, str(error).splitlines()[0])
        return False
    partial = out / "videos" / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    clip = partial / "clips" / "000"
    clip.mkdir(parents=True)
    b = crop.face_box_in_crop
    views, boxes = augmented_views(crop.image, (b.x0, b.y0, b.x1, b.y1), frames, np.random.default_rng(seed))
    o = (big - size) // 2
    boxes = [[v - o for v in box] for box in boxes]
    for t, view in enumerate(views):
        view.crop((o, o, o + size, o + size)).save(clip / f"{t:05d}.jpg", quality=95)
    meta = {
        "source": str(path),
        "fps": 25.0,
        "size": size,
        "num_frames": frames,
        "image_format": "jpg",
        "audio": None,
        "wav2vec": None,
        "clips": [{"index": 0, "start": 0, "end": frames, "boxes": boxes, "speeds": [0.0] * frames}],
    }
    (partial / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return True


def prepare_photos(photos: list[Path], out: Path, size: int = 128, frames: int = 12, seed: int = 0) -> dict:
    """Every photo -> a pseudo-clip under `out`; writes and returns `out/manifest.json`."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    skipped = {}
    for index, path in enumerate(sorted(photos)):
        name = "photo__" + path.stem
        if not prepare_photo(path, name, out, size, frames, seed + index):
            skipped[str(path)] = "no face found"
    return write_manifest(out, PrepareOptions(size=size, clip_length=frames, min_clip_length=frames), skipped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.photos", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--photos", type=Path, required=True, help="folder of portraits (searched recursively)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument(
        "--skip-heldout", action="store_true", help="leave out training.splits' held-out people"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .splits import is_heldout

    photos = [p for p in args.photos.rglob("*") if p.suffix.lower() in PHOTO_EXTENSIONS]
    if args.skip_heldout:
        photos = [p for p in photos if not is_heldout(p.name)]
    manifest = prepare_photos(photos, args.out, args.size, args.frames)
    logger.info(
        "%d photos -> %d clips (%d without a face)",
        len(photos),
        manifest["num_clips"],
        len(manifest["skipped"]),
    )


if __name__ == "__main__":
    main()

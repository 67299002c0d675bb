"""Talking photos: many people's faces with a mouth that moves with a real voice, for stages 2 and 3.

    python -m training.talking_photos --photos runs/emo-small/photos --clips runs/emo-small/data \
        --out runs/emo-small/talking_photos [--per-photo 3]

The clips give the backbone's audio attention few mouths to learn from: half of them are GRID's one speaker,
the rest about 28 people. A model trained on them opens the mouths it saw and leaves a new person's mouth
still. The photos (`training.photos`) have many people but no sound. This module joins the two: each photo
becomes `per_photo` clips whose mouth opens and closes as the mouth of a real clip did, frame by frame (the
lip gap MediaPipe measured on it, `training.mouth`), with that clip's own sound. The mouth is opened by an
image warp on the photo's FaceMesh landmarks: the lower lip and the jaw move down by the opening (fading out
below the chin and past the mouth corners), and the gap between the lips is filled with the dark inside of a
mouth, an upper row of teeth when it is wide. Crude next to a real mouth, but it is the one thing the clips
lack: the same voice-to-mouth timing on many faces. The head stays still (speed 0), as in the photo.

Donor clips are drawn half from GRID and half from the other videos (more voices than GRID's one), and the
opening follows the donor's measure scaled between its 5th and 95th percentile to a peak of `amplitude` (a
fraction of the face height, drawn per clip): mouths measured at 128 px differ in scale from person to person,
and a quiet donor must still give a visible opening.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.face import face_landmarks
from pipeline.metrics import CHIN, FOREHEAD
from pipeline.mouth_pose import open_mouth

from .data import read_clips
from .prepare import PrepareOptions, write_manifest

logger = logging.getLogger("training.talking_photos")


def normalised_opening(mouth: np.ndarray, fill: bool = True) -> np.ndarray:
    """A video's measured lip gap (NaN where not measured) -> 0 at its 5th percentile, 1 at its 95th (clipped
    to [0, 1.2]), the gaps filled by interpolation (`fill`; else they stay NaN)."""
    mouth = np.asarray(mouth, np.float64)
    known = np.isfinite(mouth)
    if known.sum() < 2:
        raise ValueError("fewer than two measured frames")
    low, high = np.percentile(mouth[known], [5, 95])
    if fill:
        mouth = np.interp(np.arange(len(mouth)), np.flatnonzero(known), mouth[known])
    return np.clip((mouth - low) / max(high - low, 1e-6), 0.0, 1.2)


def donor_clips(clips_root: Path, min_measured: float = 0.5) -> tuple[list, list, dict]:
    """Clips with sound whose mouth was measured in at least `min_measured` of the frames -> (GRID's, others,
    {video: (its meta, its `normalised_opening`)})."""
    grid, other, videos = [], [], {}
    for clip in read_clips(clips_root):
        if clip.video not in videos:
            folder = clips_root / "videos" / clip.video
            meta = json.loads((folder / "meta.json").read_text())
            mouth = np.load(folder / "mouth.npy") if (folder / "mouth.npy").is_file() else None
            videos[clip.video] = (meta, mouth)
        meta, mouth = videos[clip.video]
        if not meta.get("audio") or mouth is None:
            continue
        if np.isfinite(mouth[clip.start : clip.start + clip.num_frames]).mean() < min_measured:
            continue
        (grid if clip.video.startswith("grid") else other).append(clip)
    used = {c.video for c in grid + other}
    return (
        grid,
        other,
        {v: (meta, normalised_opening(mouth)) for v, (meta, mouth) in videos.items() if v in used},
    )


def write_talking_photo(
    image: np.ndarray,
    landmarks: np.ndarray,
    photo_meta: dict,
    donor,
    donor_video: tuple[dict, np.ndarray],
    clips_root: Path,
    out: Path,
    name: str,
    amplitude: float,
) -> None:
    """A photo (its first view, FaceMesh landmarks and `training.photos` meta) + one donor clip (and its video's
    meta and normalised opening) -> `out/videos/name`."""
    donor_meta, opening = donor_video
    opening = opening[donor.start : donor.start + donor.num_frames]
    face = float(np.hypot(*(landmarks[FOREHEAD] - landmarks[CHIN])))
    partial = out / "videos" / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "clips" / "000").mkdir(parents=True)
    for t, value in enumerate(opening):
        frame = open_mouth(image, landmarks, float(value) * amplitude * face)
        Image.fromarray(frame).save(partial / "clips" / "000" / f"{t:05d}.jpg", quality=95)
    audio = donor_meta["audio"]
    (partial / audio["file"]).symlink_to((clips_root / "videos" / donor.video / audio["file"]).resolve())
    frames = (donor.start, donor.start + donor.num_frames)
    meta = {
        "source": f"{photo_meta['source']} + mouth of {donor.video} frames {frames[0]}-{frames[1]}",
        "fps": donor_meta["fps"],
        "size": photo_meta["size"],
        "num_frames": donor_meta["num_frames"],  # the donor's timeline: the clip sits where its sound is
        "image_format": "jpg",
        "audio": audio,
        "wav2vec": None,
        "clips": [
            {
                "index": 0,
                "start": frames[0],
                "end": frames[1],
                "boxes": [photo_meta["clips"][0]["boxes"][0]] * donor.num_frames,
                "speeds": [0.0] * donor.num_frames,
            }
        ],
        "talking_photo": {"donor": donor.video, "amplitude": amplitude},
    }
    (partial / "meta.json").write_text(json.dumps(meta))
    np.save(partial / OPENING_FILE, added_opening(opening * amplitude, donor.start, donor_meta["num_frames"]))
    final = out / "videos" / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


OPENING_FILE = (
    "mouth.npy"  # as `training.mouth` names the measured one: what the dataset's posed reference reads
)


def added_opening(opening: np.ndarray, start: int, video_frames: int) -> np.ndarray:
    """The opening a talking-photo clip added to its photo's mouth (fractions of the face height, frame by frame
    from `start`) on its video's timeline (NaN outside the clip): the measured lip gap of `training.mouth` less
    the photo's own, a constant, exact where the measure is not."""
    values = np.full(video_frames, np.nan)
    values[start : start + len(opening)] = opening
    return values


def write_openings(talking_root: str | Path, clips_root: str | Path) -> int:
    """Write the `OPENING_FILE` of every talking-photo clip under `talking_root` that lacks one (clips made
    before the file existed), from its donor's measured mouth (`clips_root`) -> the number written."""
    talking_root, clips_root = Path(talking_root), Path(clips_root)
    openings: dict[str, np.ndarray] = {}
    written = 0
    for folder in sorted((talking_root / "videos").iterdir()):
        if not (folder / "meta.json").is_file() or (folder / OPENING_FILE).is_file():
            continue
        meta = json.loads((folder / "meta.json").read_text())
        donor = meta["talking_photo"]["donor"]
        if donor not in openings:
            openings[donor] = normalised_opening(np.load(clips_root / "videos" / donor / "mouth.npy"))
        clip = meta["clips"][0]
        opening = openings[donor][clip["start"] : clip["end"]] * meta["talking_photo"]["amplitude"]
        np.save(folder / OPENING_FILE, added_opening(opening, clip["start"], meta["num_frames"]))
        written += 1
    return written


def make_talking_photos(
    photos_root: str | Path,
    clips_root: str | Path,
    out: str | Path,
    per_photo: int = 3,
    amplitude: tuple[float, float] = (0.04, 0.08),
    seed: int = 0,
) -> dict:
    """Every photo of `photos_root` x `per_photo` donor clips of `clips_root` -> talking-photo clips under
    `out`; writes and returns `out/manifest.json`. Existing clips are kept (the command resumes)."""
    photos_root, clips_root, out = Path(photos_root), Path(clips_root), Path(out)
    grid, other, videos = donor_clips(clips_root)
    if not grid and not other:
        raise ValueError(
            f"{clips_root} has no clip with sound and a measured mouth: run training.mouth first"
        )
    rng = np.random.default_rng(seed)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    skipped = {}
    photos = sorted(p for p in (photos_root / "videos").iterdir() if (p / "meta.json").is_file())
    for photo in photos:
        image = landmarks = None  # read and measured once per photo, when a clip of it is missing
        for k in range(per_photo):
            pool = grid if (k % 2 == 0 and grid) or not other else other
            donor = pool[int(rng.integers(len(pool)))]
            peak = float(rng.uniform(*amplitude))
            name = f"talk__{photo.name}__{k}"
            if (out / "videos" / name / "meta.json").is_file():
                continue
            if image is None:
                meta = json.loads((photo / "meta.json").read_text())
                first = photo / "clips" / "000" / f"00000.{meta['image_format']}"
                image = np.asarray(Image.open(first).convert("RGB"))
                landmarks = face_landmarks(image)
            if landmarks is None:
                skipped[photo.name] = "FaceMesh found no face"
                break
            write_talking_photo(
                image, landmarks, meta, donor, videos[donor.video], clips_root, out, name, peak
            )
    size = json.loads((photos[0] / "meta.json").read_text())["size"] if photos else 128
    return write_manifest(out, PrepareOptions(size=size, clip_length=50, min_clip_length=1), skipped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.talking_photos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--photos", type=Path, required=True, help="photo pseudo-clips (training.photos)")
    parser.add_argument(
        "--clips", type=Path, required=True, help="prepared clips with mouth.npy (training.mouth)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-photo", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = make_talking_photos(args.photos, args.clips, args.out, args.per_photo, seed=args.seed)
    logger.info(
        "%d talking-photo clips (%d photos without a face)", manifest["num_clips"], len(manifest["skipped"])
    )


if __name__ == "__main__":
    main()

"""Held-out split of the talking-face material (`../shared/data`): what training never sees.

Evaluation on identities and sentences a model was not trained on needs whole *people* kept out, not
single files: the same person appears in several folders (a styletalk speaker has a real clip, a
video-only clip and a photo; a portrait animated by another model has generated clips). So:

- people: every file whose path names one of `HELDOUT_PEOPLE` is held out, in every folder;
- GRID (one speaker: it teaches the mouth) and the audio-only recordings: about 10 % of the sentences,
  chosen by a stable hash of the file name, are held out (new sentences, new voices).

Paths are relative to the data root with forward slashes, e.g. "real/x.mp4", "grid_s1/y.mp4".
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

# Substrings of file names (lower case) naming a person kept out of training, with where they appear.
HELDOUT_PEOPLE = (
    "reagan",  # styletalk: real/ clip, video_only/ clip, faces/ photo
    "latentsync__assets_demo2",  # LatentSync demo speaker: real/
    "video-retalking__examples_face_2",  # video-retalking example: real/
    "driving_d14",  # LivePortrait driving clip: real/
    "v-express",  # V-Express dataset example: real/
    "monalisa",  # AniTalker: faces/ portrait, generated/ clips, speech/ audio
    "macron",  # Real3DPortrait: faces/
    "dicaprio",  # MEMO: faces/
    "joyvasa_005",  # JoyVASA: faces/
    "hallo__examples_reference_images_3",  # Hallo: faces/
    "sadtalker__examples_source_image_art_5",  # SadTalker painting: faces/
)
# Folders whose files are sentences or voices rather than people: ~10 % held out by hash.
HASHED_FOLDERS = ("grid_s1", "speech")
HASHED_FRACTION = 10  # one in this many


def hash_bucket(name: str, buckets: int = HASHED_FRACTION) -> int:
    """A stable bucket in [0, buckets) of a name (sha1, the same on every machine and Python)."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % buckets


def is_heldout(relpath: str) -> bool:
    """True when `relpath` (relative to the data root) must never be used for training."""
    path = PurePosixPath(relpath.replace("\\", "/"))
    name = path.name.lower()
    if any(person in name for person in HELDOUT_PEOPLE):
        return True
    return bool(path.parts) and path.parts[0] in HASHED_FOLDERS and hash_bucket(path.stem) == 0


def heldout_files(data_root: Path, folder: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The held-out files of `data_root/folder` with one of `suffixes`, sorted (what evaluations use)."""
    return [
        p
        for p in sorted((data_root / folder).iterdir())
        if p.suffix.lower() in suffixes and is_heldout(f"{folder}/{p.name}")
    ]


def split(relpaths: list[str]) -> tuple[list[str], list[str]]:
    """-> (training paths, held-out paths), each in the given order."""
    train = [p for p in relpaths if not is_heldout(p)]
    held = [p for p in relpaths if is_heldout(p)]
    return train, held

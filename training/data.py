"""Datasets over a `training.prepare` folder: single frames (stage 1) and clips with audio (stages 2-3).

One class serves all stages; what a sample holds follows from `num_frames` (f) and `num_motion_frames` (n):
- stage 1 (f = 1, n = 0): a target frame, another random frame of the same clip as the reference, the
  face mask of the target frame's box;
- stages 2-3 (f = 12, n = 4): n + f contiguous frames (the first n are motion frames), a reference frame
  of the same clip outside them when the clip allows it, the union face mask of the n + f frames, the
  wav2vec2 features and head speeds of the f frames with `audio_margin` / `speed_margin` frames of context
  on both sides (edges repeated at the video's ends, as the pipeline does), for the m = 2 windows.
- any stage, when every video folder holds a `face_embedding.npy` (512-d, written by
  `training.face_embeddings`): the video's face embedding, for models with identity tokens (Hallo's).

Randomness is a pure function of (seed, sample id): `EpochSampler` yields ids `epoch * len + index`, so a
sample is the same in every run, in any DataLoader worker, and after a resume.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pipeline.face import FaceBox, face_mask, mouth_mask, union_box


@dataclass
class ClipInfo:
    """A prepared clip: its frame files, where it sits in its video, per-frame boxes and speeds."""

    video: str
    folder: Path
    image_format: str
    start: int  # first frame, index in the video at the training fps
    num_frames: int
    size: int  # crop side, pixels
    boxes: np.ndarray  # (num_frames, 4) face boxes x0, y0, x1, y1 in crop pixels
    speeds: np.ndarray  # (num_frames,) head rotation speed, degrees/frame
    video_frames: int  # frames of the whole video
    wav2vec: Path | None  # (video_frames, layers, dim) features of the whole video
    face_embedding: Path | None = None  # (512,) face-recognition embedding of the video's speaker


FACE_EMBEDDING_FILE = "face_embedding.npy"  # in a prepared video folder (see `training.face_embeddings`)


def read_clips(root: str | Path) -> list[ClipInfo]:
    """All clips listed in `root/manifest.json`, in manifest order."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: run `python -m training.prepare --out {root}` first"
        )
    clips = []
    for video in json.loads(manifest_path.read_text())["videos"]:
        folder = root / "videos" / video["name"]
        meta = json.loads((folder / "meta.json").read_text())
        wav2vec = folder / meta["wav2vec"]["file"] if meta["wav2vec"] else None
        embedding = folder / FACE_EMBEDDING_FILE
        for clip in meta["clips"]:
            clips.append(
                ClipInfo(
                    video=video["name"],
                    folder=folder / "clips" / f"{clip['index']:03d}",
                    image_format=meta["image_format"],
                    start=clip["start"],
                    num_frames=clip["end"] - clip["start"],
                    size=meta["size"],
                    boxes=np.asarray(clip["boxes"], np.float32),
                    speeds=np.asarray(clip["speeds"], np.float32),
                    video_frames=meta["num_frames"],
                    wav2vec=wav2vec,
                    face_embedding=embedding if embedding.is_file() else None,
                )
            )
    return clips


class EpochSampler(Sampler[int]):
    """Sample ids of one epoch: `epoch * size + i` for a permutation of range(size) seeded by (seed, epoch).

    The epoch is set with `start_epoch` (not `set_epoch`, which accelerate's loaders call themselves).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            if self.shuffle
            else range(self.size)
        )
        return iter(int(self.epoch * self.size + i) for i in order)


class EmoDataset(Dataset):
    """Training samples (see the module docstring). Items are dicts of tensors:

    pixel_values (n + f, 3, R, R) in [-1, 1]; reference (3, R, R) in [-1, 1]; face_mask (1, R, R) of 0/1;
    mouth_mask (1, R, R) of 0/1 (`pipeline.face.mouth_mask` of the union face box, for a mouth-weighted loss);
    reference_mouth_mask (1, R, R) of 0/1 (the same of the reference frame's own face box, as the pipeline
    finds it on a portrait: `behaviour.mask_reference_mouth`);
    with `posed_reference` (models with `behaviour.posed_reference`): the reference is a frame outside the window
    with one of the most closed mouths of the clip (its video's `mouth.npy`), and posed_reference (f, 3, R, R) in
    [-1, 1] holds it once per target frame with its mouth opened by how much wider that frame's measured mouth is
    (`pipeline.mouth_pose.open_mouth`; unchanged where a mouth was not measured or FaceMesh misses the reference);
    and when `with_audio`: audio_features (f + 2 audio_margin, layers, dim), speeds (f + 2 speed_margin,)
    in degrees/frame; when every clip's video has one: face_embedding (512,) float32 (`has_face_embeddings`).
    R = `resolution` (prepared frames are resized when it differs).
    """

    def __init__(
        self,
        root: str | Path | list[str | Path],
        resolution: int,
        num_frames: int = 1,
        num_motion_frames: int = 0,
        with_audio: bool = False,
        audio_layers: int | None = None,
        audio_margin: int = 2,
        speed_margin: int = 2,
        mask_expand: float = 1.2,
        samples_per_clip: int = 1,
        audio_features_dir: str | Path | None = None,
        seed: int = 0,
        posed_reference: bool = False,
    ):
        self.resolution = resolution
        self.num_frames, self.num_motion_frames = num_frames, num_motion_frames
        self.with_audio, self.audio_layers = with_audio, audio_layers
        self.audio_margin, self.speed_margin = audio_margin, speed_margin
        self.mask_expand, self.seed = mask_expand, seed
        self.audio_features_dir = Path(audio_features_dir) if audio_features_dir else None
        window = num_frames + num_motion_frames
        roots = [root] if isinstance(root, str | Path) else list(root)
        all_clips = [clip for r in roots for clip in read_clips(r)]
        self.clips = [c for c in all_clips if c.num_frames >= window + (1 if window == 1 else 0)]
        if not self.clips:
            raise ValueError(f"no clip in {root} has {window} frames or more (of {len(all_clips)} clips)")
        if with_audio and self.audio_features_dir is None and any(c.wav2vec is None for c in self.clips):
            raise ValueError(
                f"{root} has no cached wav2vec2 features: prepare with --wav2vec, or compute them"
            )
        with_embedding = [c.face_embedding is not None for c in self.clips]
        if any(with_embedding) and not all(with_embedding):
            missing = sorted({c.video for c in self.clips if c.face_embedding is None})
            raise ValueError(
                f"{len(missing)} videos have no {FACE_EMBEDDING_FILE} (e.g. {missing[0]}) while others have: "
                "run `python -m training.face_embeddings` on the data (all videos or none)"
            )
        self.has_face_embeddings = all(with_embedding)
        self.samples_per_clip = samples_per_clip
        self.posed_reference = posed_reference
        self._gaps: dict[Path, np.ndarray] = {}  # video folder -> its mouth.npy, read once (per worker)
        if posed_reference:
            missing = sorted(
                {c.video for c in self.clips if not (c.folder.parent.parent / "mouth.npy").is_file()}
            )
            if missing:
                raise ValueError(
                    f"{len(missing)} videos have no mouth.npy (e.g. {missing[0]}), which a posed reference needs: "
                    "run `python -m training.small_model ... --stop-after mouth` on the data"
                )

    def __len__(self) -> int:
        return len(self.clips) * self.samples_per_clip

    def audio_path(self, clip: ClipInfo) -> Path:
        """The (video_frames, layers, dim) feature file of the clip's video."""
        if self.audio_features_dir is not None:
            return self.audio_features_dir / f"{clip.video}.npy"
        return clip.wav2vec

    def _image(self, clip: ClipInfo, t: int) -> torch.Tensor:
        image = Image.open(clip.folder / f"{t:05d}.{clip.image_format}").convert("RGB")
        if image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return array.permute(2, 0, 1)

    def _posed_reference(
        self, clip: ClipInfo, reference: int, gaps: np.ndarray, frames: range
    ) -> torch.Tensor:
        """The reference once per target frame (the last f of `frames`), its mouth opened by the frame's measured
        gap less the reference's (fractions of the face height) -> (f, 3, R, R) in [-1, 1]."""
        from pipeline.face import face_landmarks
        from pipeline.mouth_pose import face_height, posed_frames

        image = ((self._image(clip, reference).permute(1, 2, 0).numpy() + 1.0) * 127.5).round()
        image = image.clip(0, 255).astype(np.uint8)
        targets = list(frames)[self.num_motion_frames :]
        wider = np.nan_to_num(gaps[targets] - gaps[reference], nan=0.0).clip(0, None)
        landmarks = face_landmarks(image) if wider.any() else None
        if landmarks is None:
            posed = np.repeat(image[None], len(targets), axis=0)
        else:
            distinct, index = posed_frames(image, landmarks, wider * face_height(landmarks))
            posed = distinct[index]
        return torch.from_numpy(posed.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        clip = self.clips[sample_id % len(self) // self.samples_per_clip]
        rng = np.random.default_rng([self.seed, sample_id])
        window = self.num_motion_frames + self.num_frames
        start = int(rng.integers(0, clip.num_frames - window + 1))
        frames = range(start, start + window)
        outside = [t for t in range(clip.num_frames) if t not in frames]
        candidates = outside if outside else list(range(clip.num_frames))
        gaps = None
        if self.posed_reference:
            video = clip.folder.parent.parent
            if video not in self._gaps:
                self._gaps[video] = np.load(video / "mouth.npy")
            gaps = self._gaps[video][clip.start : clip.start + clip.num_frames]
            measured = [t for t in candidates if np.isfinite(gaps[t])]
            if measured:  # one of the most closed mouths (the lowest quarter): the pose then only opens it
                order = sorted(measured, key=lambda t: gaps[t])
                candidates = order[: max(1, len(order) // 4)]
        reference = int(rng.choice(candidates))

        scale = self.resolution / clip.size
        box = union_box([FaceBox(*(clip.boxes[t] * scale)) for t in frames])
        mask = face_mask(box, (self.resolution, self.resolution), expand=self.mask_expand)
        sample = {
            "pixel_values": torch.stack([self._image(clip, t) for t in frames]),
            "reference": self._image(clip, reference),
            "face_mask": torch.from_numpy(mask)[None],
            "mouth_mask": torch.from_numpy(mouth_mask(box, (self.resolution,) * 2))[None],
            "reference_mouth_mask": torch.from_numpy(
                mouth_mask(FaceBox(*(clip.boxes[reference] * scale)), (self.resolution,) * 2)
            )[None],
        }
        if self.posed_reference:
            sample["posed_reference"] = self._posed_reference(clip, reference, gaps, frames)
        if self.has_face_embeddings:
            sample["face_embedding"] = torch.from_numpy(
                np.load(clip.face_embedding).astype(np.float32).reshape(-1)
            )
        if self.with_audio:
            first = clip.start + start + self.num_motion_frames  # the f frames' first index in the video
            rows = np.clip(
                np.arange(first - self.audio_margin, first + self.num_frames + self.audio_margin),
                0,
                clip.video_frames - 1,
            )
            features = np.load(self.audio_path(clip), mmap_mode="r")
            layers = features.shape[1] if self.audio_layers is None else self.audio_layers
            sample["audio_features"] = torch.from_numpy(
                np.ascontiguousarray(features[rows, -layers:], np.float32)
            )
            local = np.clip(
                np.arange(
                    start + self.num_motion_frames - self.speed_margin, start + window + self.speed_margin
                ),
                0,
                clip.num_frames - 1,
            )
            sample["speeds"] = torch.from_numpy(clip.speeds[local])
        return sample

"""Training data preparation: talking videos -> face-crop clips with audio, boxes, head speeds (and wav2vec2).

    python -m training.prepare --videos DIR --out DIR [--fps 25] [--size 512] [--clip-length 125]
        [--min-clip-length 16] [--margin 0.6] [--wav2vec DIR] [--workers 4] [--image-format jpg]

Per video (layout in training/README.md): frames resampled to `fps`; MediaPipe face boxes on every frame
(first decoding pass); runs of consecutive frames with a face, cut at scene jumps, split into clips of
`clip_length` frames (a tail shorter than `min_clip_length` is dropped); one square crop per clip around
the union of its face boxes (stable over the clip), written as `size` x `size` images (second decoding
pass); per-frame face boxes in crop pixels, head pose and head rotation speed (degrees/frame); the audio
at 16 kHz mono; optionally wav2vec2 features of the whole video, per frame.

A video folder is written under a temporary name and renamed when complete, so re-running skips the
videos already done and redoes the interrupted ones. Unreadable videos, videos without audio and videos
without a usable face clip are skipped; the reason is logged and listed in `manifest.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.audio import AudioLoadError, load_audio, write_wav
from pipeline.face import FaceBox, crop_face, face_boxes, head_poses, head_rotation_speed, union_box

logger = logging.getLogger("training.prepare")

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
SAMPLING_RATE = 16_000
MANIFEST_VERSION = 1


@dataclass
class PrepareOptions:
    """fps: training frame rate (Hz); size: crop side (pixels); clip lengths in frames; margin: crop margin
    around the clip's union face box, as a fraction of its side (see `pipeline.face.crop_face`);
    max_jump: a face-box centre moving more than this fraction of the box side in one frame ends a clip
    (scene cut); wav2vec: a wav2vec2 folder (or an EmoPipeline folder, whose audio encoder is used)."""

    fps: float = 25.0
    size: int = 512
    clip_length: int = 125
    min_clip_length: int = 16
    margin: float = 0.6
    max_jump: float = 0.5
    image_format: str = "jpg"
    jpeg_quality: int = 95
    wav2vec: str | None = None


@dataclass
class VideoResult:
    name: str
    source: str
    status: str  # "done", "exists" or "skipped"
    reason: str = ""
    num_clips: int = 0


class SkipVideo(Exception):
    """The video cannot give training clips; the message is the reason."""


# ------------------------------------------------------------------------------------------------ frames
def read_video_frames(path: Path, fps: float) -> Iterator[np.ndarray]:
    """Decode a video resampled to `fps` frames per second -> (H, W, 3) uint8 RGB frames, streamed."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"fps={fps}"])
    meta = next(reader)
    width, height = meta["size"]
    try:
        for raw in reader:
            yield np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def split_runs(boxes: list[FaceBox | None], max_jump: float) -> list[tuple[int, int]]:
    """[start, end) frame ranges of consecutive frames with a face and no jump of the box (scene cut)."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, box in enumerate(boxes):
        prev = boxes[i - 1] if i else None
        jump = False
        if box is not None and prev is not None:
            side = max(prev.width, prev.height, 1.0)
            jump = (
                max(abs(box.center[0] - prev.center[0]), abs(box.center[1] - prev.center[1]))
                > max_jump * side
            )
        if start is not None and (box is None or jump):
            runs.append((start, i))
            start = None
        if box is not None and start is None:
            start = i
    if start is not None:
        runs.append((start, len(boxes)))
    return runs


def cut_clips(runs: list[tuple[int, int]], clip_length: int, min_clip_length: int) -> list[tuple[int, int]]:
    """Split each run into [start, end) clips of `clip_length` frames; tails shorter than the minimum go."""
    clips = []
    for start, end in runs:
        for s in range(start, end, clip_length):
            e = min(s + clip_length, end)
            if e - s >= min_clip_length:
                clips.append((s, e))
    return clips


# ------------------------------------------------------------------------------------------------ audio
def load_wav2vec(path: str):
    """(audio encoder, feature extractor) from a wav2vec2 folder or an EmoPipeline folder."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    root = Path(path)
    if (root / "audio_encoder").is_dir():
        encoder_dir, extractor_dir = root / "audio_encoder", root / "feature_extractor"
    else:
        encoder_dir = extractor_dir = root
    return Wav2Vec2Model.from_pretrained(encoder_dir).eval(), Wav2Vec2FeatureExtractor.from_pretrained(
        extractor_dir
    )


def audio_frame_features(waveform: np.ndarray, num_frames: int, fps: float, encoder, extractor) -> np.ndarray:
    """Whole-video 16 kHz waveform -> (num_frames, layers + 1, hidden) float32 wav2vec2 features, all layers.

    The same function as inference (`pipeline.audio_features.wav2vec_frame_features`); a training clip
    slices these rows, as the pipeline slices a long audio's features clip by clip.
    """
    from pipeline.audio_features import wav2vec_frame_features

    layers = encoder.config.num_hidden_layers + 1
    features = wav2vec_frame_features(encoder, extractor, waveform, num_frames, fps, num_layers=layers)
    return features.cpu().numpy()


# ------------------------------------------------------------------------------------------------ one video
_WAV2VEC = None  # (encoder, extractor) loaded once per worker process


def _init_worker(wav2vec: str | None) -> None:
    global _WAV2VEC
    import torch

    torch.set_num_threads(1)
    _WAV2VEC = load_wav2vec(wav2vec) if wav2vec else None


def _last_line(error: BaseException) -> str:
    """The last line of an error message (ffmpeg's own message comes last), or its type."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _box_list(box: FaceBox) -> list[float]:
    return [round(v, 2) for v in (box.x0, box.y0, box.x1, box.y1)]


def _write_clip(
    frames: list[np.ndarray],
    crop_box_source: FaceBox,
    boxes: list[FaceBox],
    folder: Path,
    options: PrepareOptions,
) -> dict:
    """Crop a clip's frames with one square crop, write them, measure head pose -> the clip's metadata."""
    folder.mkdir(parents=True)
    crops = []
    crop = None
    for t, frame in enumerate(frames):
        crop = crop_face(frame, size=options.size, margin=options.margin, box=crop_box_source)
        image = crop.image
        crops.append(np.asarray(image))
        name = folder / f"{t:05d}.{options.image_format}"
        if options.image_format == "jpg":
            image.save(name, quality=options.jpeg_quality)
        else:
            image.save(name)
    x0, y0, _, _ = crop.crop_box
    factor = options.size / crop.side
    in_crop = [
        FaceBox((b.x0 - x0) * factor, (b.y0 - y0) * factor, (b.x1 - x0) * factor, (b.y1 - y0) * factor)
        for b in boxes
    ]
    poses = head_poses(crops)
    return {
        "crop_box": list(crop.crop_box),
        "boxes": [_box_list(b) for b in in_crop],
        "poses": [
            None if p is None else [round(p.yaw, 3), round(p.pitch, 3), round(p.roll, 3)] for p in poses
        ],
        "speeds": [round(float(s), 4) for s in head_rotation_speed(poses)],
    }


def prepare_video(source: Path, name: str, out: Path, options: PrepareOptions) -> VideoResult:
    """Prepare one video into `out/videos/name/`; never raises for a bad video (the result says why)."""
    final = out / "videos" / name
    if (final / "meta.json").is_file():
        return VideoResult(name, str(source), "exists")
    partial = out / "videos" / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        meta = _prepare(source, partial, options)
    except SkipVideo as error:
        shutil.rmtree(partial, ignore_errors=True)
        return VideoResult(name, str(source), "skipped", str(error))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return VideoResult(name, str(source), "done", num_clips=len(meta["clips"]))


def _prepare(source: Path, folder: Path, options: PrepareOptions) -> dict:
    # 1. Cheap checks first: a decodable first frame, then the sound (a silent video is useless for EMO)
    try:
        next(read_video_frames(source, options.fps))
    except (OSError, RuntimeError, StopIteration, ValueError) as error:
        raise SkipVideo(f"unreadable video: {_last_line(error)}") from None
    try:
        waveform = load_audio(source, sampling_rate=SAMPLING_RATE, mono=True).mono
    except AudioLoadError as error:
        raise SkipVideo(f"no usable audio: {error}") from None

    # 2. First pass: a face box per frame
    boxes = face_boxes(read_video_frames(source, options.fps))
    if not any(boxes):
        raise SkipVideo(f"no face found in any of its {len(boxes)} frames")
    clips = cut_clips(split_runs(boxes, options.max_jump), options.clip_length, options.min_clip_length)
    if not clips:
        raise SkipVideo(f"no run of >= {options.min_clip_length} consecutive frames with a face")

    # 3. Second pass: crop and write each clip's frames, head pose and speed
    folder.mkdir(parents=True)
    clip_meta = []
    frames = read_video_frames(source, options.fps)
    position = 0
    for index, (start, end) in enumerate(clips):
        chunk = []
        for frame in frames:
            position += 1
            if position - 1 >= start:
                chunk.append(frame.copy())
            if position == end:
                break
        clip_boxes = [b for b in boxes[start:end] if b is not None]
        info = _write_clip(
            chunk, union_box(clip_boxes), clip_boxes, folder / "clips" / f"{index:03d}", options
        )
        clip_meta.append({"index": index, "start": start, "end": end, **info})
    frames.close()

    # 4. Audio file and (optionally) wav2vec2 features of the whole video
    write_wav(folder / "audio.wav", waveform, SAMPLING_RATE)
    wav2vec = None
    if _WAV2VEC is not None:
        encoder, extractor = _WAV2VEC
        features = audio_frame_features(waveform, len(boxes), options.fps, encoder, extractor)
        np.save(folder / "wav2vec.npy", features)
        wav2vec = {"file": "wav2vec.npy", "source": options.wav2vec, "shape": list(features.shape)}

    meta = {
        "source": str(source),
        "fps": options.fps,
        "size": options.size,
        "num_frames": len(boxes),
        "image_format": options.image_format,
        "audio": {"file": "audio.wav", "sampling_rate": SAMPLING_RATE, "num_samples": len(waveform)},
        "wav2vec": wav2vec,
        "clips": clip_meta,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------------ all videos
def find_videos(root: Path) -> dict[str, Path]:
    """Video files under `root` (recursively) by output name: relative path without suffix, '/' -> '__'."""
    names: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS):
        rel = path.relative_to(root)
        name = "__".join(rel.with_suffix("").parts)
        if name in names:  # same stem, two containers: keep both apart
            name = "__".join(rel.parts).replace(".", "_")
        names[name] = path
    return names


def _run_one(args: tuple[Path, str, Path, PrepareOptions]) -> VideoResult:
    return prepare_video(*args)


def write_manifest(out: Path, options: PrepareOptions, skipped: dict[str, str]) -> dict:
    """Index every finished video folder (this run's and earlier runs') into `out/manifest.json`."""
    videos = []
    for meta_path in sorted((out / "videos").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        videos.append(
            {
                "name": meta_path.parent.name,
                "source": meta["source"],
                "num_frames": meta["num_frames"],
                "wav2vec": meta["wav2vec"] is not None,
                "clips": [{"index": c["index"], "num_frames": c["end"] - c["start"]} for c in meta["clips"]],
            }
        )
    manifest = {
        "version": MANIFEST_VERSION,
        "options": asdict(options),
        "num_videos": len(videos),
        "num_clips": sum(len(v["clips"]) for v in videos),
        "videos": videos,
        "skipped": skipped,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def prepare(videos: Path, out: Path, options: PrepareOptions, workers: int = 1) -> dict:
    """Prepare every video under `videos` into `out` with `workers` processes -> the manifest."""
    found = find_videos(videos)
    if not found:
        raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {videos}")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for stale in (out / "videos").glob(".*.partial"):  # left by an interrupted run
        shutil.rmtree(stale)
    jobs = [(path, name, out, options) for name, path in found.items()]
    skipped: dict[str, str] = {}
    if workers <= 1:
        _init_worker(options.wav2vec)
        results = map(_run_one, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (options.wav2vec,))
        results = pool.imap_unordered(_run_one, jobs)
    try:
        for result in results:
            if result.status == "skipped":
                skipped[result.source] = result.reason
                logger.warning("skipped %s: %s", result.source, result.reason)
            elif result.status == "exists":
                logger.info("already prepared: %s", result.name)
            else:
                logger.info("prepared %s: %d clips", result.name, result.num_clips)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    manifest = write_manifest(out, options, skipped)
    logger.info(
        "%d videos, %d clips, %d skipped -> %s",
        manifest["num_videos"],
        manifest["num_clips"],
        len(skipped),
        out / "manifest.json",
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    defaults = PrepareOptions()
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--videos", type=Path, required=True, help="folder of talking videos (searched recursively)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (see training/README.md)")
    parser.add_argument("--fps", type=float, default=defaults.fps, help="training frame rate, Hz")
    parser.add_argument("--size", type=int, default=defaults.size, help="face-crop side, pixels")
    parser.add_argument("--clip-length", type=int, default=defaults.clip_length, help="frames per clip")
    parser.add_argument(
        "--min-clip-length",
        type=int,
        default=defaults.min_clip_length,
        help="shortest clip kept, frames (>= n + f of stages 2-3)",
    )
    parser.add_argument(
        "--margin", type=float, default=defaults.margin, help="crop margin around the face box"
    )
    parser.add_argument(
        "--max-jump",
        type=float,
        default=defaults.max_jump,
        help="box-centre move per frame (fraction of the box side) that ends a clip",
    )
    parser.add_argument("--image-format", choices=("jpg", "png"), default=defaults.image_format)
    parser.add_argument(
        "--wav2vec", default=None, help="wav2vec2 (or EmoPipeline) folder: cache audio features"
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = PrepareOptions(
        fps=args.fps,
        size=args.size,
        clip_length=args.clip_length,
        min_clip_length=args.min_clip_length,
        margin=args.margin,
        max_jump=args.max_jump,
        image_format=args.image_format,
        wav2vec=args.wav2vec,
    )
    prepare(args.videos, args.out, options, workers=args.workers)


if __name__ == "__main__":
    main()

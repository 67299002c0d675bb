"""Moving a small-model run to a lent GPU machine and back, within its transfer limit (64 MiB a call).

    python -m training.device_pack pack WORK PACK        # here: prepared data -> ~35 MB (from ~250 MB)
    python -m training.device_pack unpack PACK WORK      # there: needs numpy, OpenCV and Python <= 3.12
    python -m training.device_pack collect MODEL OUT NAME    # there: a trained model's changed parts, fp16
    python -m training.device_pack restore BASE 'OUT/NAME.tar.*' MODEL   # here: the full model again

`pack` writes a `small_model` work folder's prepared clips and talking photos (`data/`, `talking_photos/`,
`photos/DONE`) compactly: the frames of every clip as H.264 (yuv444, crf 18; about 40 dB PSNR against the
JPEGs), in a few shards decoded in parallel; the sound as 4-bit IMA ADPCM (about 30 dB SNR), each distinct
wav once (talking photos link their donor's); the rest (meta.json, mouth.npy, manifests, DONE) in a tar.
`unpack` rebuilds the same folder, so `python -m training.small_model --work WORK` finds every step before
the stages done. `collect` keeps what stages 2-3 change (all but `vae` and `audio_encoder`) as fp16 in chunks
of at most 15 MiB (the device returns 16 MiB a file); `restore` puts them, upcast to fp32, over a copy of the
model training started from. training/README.md ("Training on a lent GPU") has the whole recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
import wave
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PARTS = ("data", "talking_photos")
KEPT_AS_IS = ("vae", "audio_encoder")  # frozen in stages 2-3: `collect` leaves them out
CHUNK = 15 * 2**20


def _audioop():
    """The standard library's ADPCM codec (removed in Python 3.13)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop
    except ImportError as error:
        raise RuntimeError(
            "device_pack needs Python 3.12 or older: its audio codec is the audioop module"
        ) from error
    return audioop


def _cast(weights: dict, dtype) -> dict:
    """A state dict with its floating tensors in `dtype` (the others, e.g. integer buffers, as they are)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}


# ------------------------------------------------------------------------------------------------ pack
def pack(work: Path, out: Path, shards: int = 8, crf: int = 18) -> dict:
    """`work`'s prepared data -> `out` (frames*.mp4, audio.adpcm, meta.tar.xz, index.json); returns counts."""
    import imageio_ffmpeg
    from PIL import Image

    audioop = _audioop()
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip_dirs, wavs, other = [], [], []
    for part in PARTS:
        for path in sorted((work / part).rglob("*")):
            if path.is_dir() and any(path.glob("*.jpg")):
                clip_dirs.append(path)
            elif path.suffix == ".wav":
                wavs.append(path)
            elif path.is_file() and path.suffix != ".jpg":
                other.append(path)
    with tarfile.open(out / "meta.tar.xz", "w:xz") as tar:
        if (work / "photos" / "DONE").is_file():
            other.append(work / "photos" / "DONE")
        for path in other:
            tar.add(path, arcname=str(path.relative_to(work)))

    blobs, audio_index = {}, []
    for path in wavs:
        with wave.open(str(path)) as f:
            if f.getsampwidth() != 2 or f.getnchannels() != 1:
                raise ValueError(f"{path}: expected 16-bit mono wav, as training.prepare writes")
            rate, pcm = f.getframerate(), f.readframes(f.getnframes())
        key = hashlib.sha1(pcm).hexdigest()
        if key not in blobs:
            blobs[key] = audioop.lin2adpcm(pcm, 2, None)[0]
        audio_index.append({"path": str(path.relative_to(work)), "key": key, "rate": rate, "bytes": len(pcm)})
    offsets, stream = {}, io.BytesIO()
    for key, blob in blobs.items():
        offsets[key] = (stream.tell(), len(blob))
        stream.write(blob)
    (out / "audio.adpcm").write_bytes(stream.getvalue())
    for item in audio_index:
        item["offset"], item["length"] = offsets[item.pop("key")]

    frames = [(d, sorted(d.glob("*.jpg"))) for d in clip_dirs]
    total = sum(len(files) for _, files in frames)
    groups, count = [[]], 0
    for folder, files in frames:  # consecutive clips per shard, about total / shards frames each
        if count >= total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((folder, files))
        count += len(files)
    frame_index = []
    for number, group in enumerate(g for g in groups if g):
        name = f"frames{number}.mp4"
        width, height = Image.open(group[0][1][0]).size
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", f"{width}x{height}", "-r", "25", "-i", "-", "-c:v", "libx264", "-crf", str(crf),
            "-pix_fmt", "yuv444p", str(out / name),
        ]  # fmt: skip
        encoder = subprocess.Popen(command, stdin=subprocess.PIPE)
        for folder, files in group:
            for file in files:
                image = Image.open(file).convert("RGB")
                if image.size != (width, height):
                    raise ValueError(f"{file}: {image.size}, not the {width}x{height} of the other frames")
                encoder.stdin.write(np.asarray(image).tobytes())
            frame_index.append(
                {"shard": name, "dir": str(folder.relative_to(work)), "files": [f.name for f in files]}
            )
        encoder.stdin.close()
        if encoder.wait() != 0:
            raise RuntimeError(f"ffmpeg could not encode {out / name}")
    (out / "index.json").write_text(json.dumps({"audio": audio_index, "frames": frame_index}))
    return {"clips": len(clip_dirs), "frames": total, "wavs": len(wavs), "distinct_wavs": len(blobs),
            "bytes": sum(p.stat().st_size for p in out.iterdir())}  # fmt: skip


# ------------------------------------------------------------------------------------------------ unpack
def _decode_shard(pack_dir: str, work: str, shard: str, entries: list) -> int:
    import cv2

    capture = cv2.VideoCapture(str(Path(pack_dir) / shard))
    written = 0
    for entry in entries:
        folder = Path(work) / entry["dir"]
        folder.mkdir(parents=True, exist_ok=True)
        for name in entry["files"]:
            ok, frame = capture.read()
            if not ok:
                raise RuntimeError(f"{shard} ends before {entry['dir']}/{name}")
            cv2.imwrite(str(folder / name), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
            written += 1
    return written


def unpack(pack_dir: Path, work: Path, workers: int | None = None) -> int:
    """`pack`'s output -> the work folder again; returns the number of frames written."""
    audioop = _audioop()
    pack_dir, work = Path(pack_dir), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pack_dir / "meta.tar.xz") as tar:
        tar.extractall(work, filter="data")
    index = json.loads((pack_dir / "index.json").read_text())
    blob = (pack_dir / "audio.adpcm").read_bytes()
    for item in index["audio"]:
        pcm = audioop.adpcm2lin(blob[item["offset"] : item["offset"] + item["length"]], 2, None)[0]
        path = work / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(item["rate"])
            f.writeframes(pcm[: item["bytes"]])
    shards: dict[str, list] = {}
    for entry in index["frames"]:
        shards.setdefault(entry["shard"], []).append(entry)
    if not shards:
        return 0
    with ProcessPoolExecutor(workers or len(shards)) as pool:
        jobs = [pool.submit(_decode_shard, str(pack_dir), str(work), s, e) for s, e in shards.items()]
        return sum(job.result() for job in jobs)


# ------------------------------------------------------------------------------------------------ models
def collect(model: Path, out: Path, name: str) -> list[Path]:
    """A trained model's folder without `KEPT_AS_IS`, weights as fp16, tarred -> out/name.tar.0, .1, ..."""
    import torch
    from safetensors.torch import load_file, save

    model, out = Path(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        for path in sorted(model.rglob("*")):
            if not path.is_file() or path.relative_to(model).parts[0] in KEPT_AS_IS:
                continue
            data = path.read_bytes()
            if path.suffix == ".safetensors":
                data = save(_cast(load_file(path), torch.float16))
            info = tarfile.TarInfo(str(path.relative_to(model)))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data, files = stream.getvalue(), []
    for number, start in enumerate(range(0, len(data), CHUNK)):
        files.append(out / f"{name}.tar.{number}")
        files[-1].write_bytes(data[start : start + CHUNK])
    return files


def restore(base: Path, chunks: list[Path], out: Path) -> Path:
    """A copy of `base` (the model the training started from) with `collect`'s chunks over it, upcast to fp32."""
    import torch
    from safetensors.torch import load, save_file

    chunks = sorted(chunks, key=lambda p: int(Path(p).name.rsplit(".", 1)[1]))
    data = b"".join(Path(p).read_bytes() for p in chunks)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("README.md", "*.jpg"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            target = out / member.name
            if not target.resolve().is_relative_to(out.resolve()):
                raise ValueError(f"{member.name}: outside the model folder")
            content = tar.extractfile(member).read()
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.suffix == ".safetensors":
                save_file(_cast(load(content), torch.float32), target)
            else:
                target.write_bytes(content)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.device_pack", description=__doc__.split("\n")[0]
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack", help="a work folder's prepared data -> a compact pack")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--crf", type=int, default=18)
    p = verbs.add_parser("unpack", help="a pack -> the work folder")
    p.add_argument("pack", type=Path)
    p.add_argument("work", type=Path)
    p = verbs.add_parser("collect", help="a trained model's changed parts, fp16, in chunks")
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p = verbs.add_parser("restore", help="the full model from its base and the collected chunks")
    p.add_argument("base", type=Path)
    p.add_argument("chunks", type=Path, nargs="+")
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        print(json.dumps(pack(args.work, args.out, args.shards, args.crf)))
    elif args.verb == "unpack":
        print(f"{unpack(args.pack, args.work)} frames -> {args.work}")
    elif args.verb == "collect":
        files = collect(args.model, args.out, args.name)
        print(f"{args.model} -> {', '.join(str(f) for f in files)}")
    else:
        print(f"restored {restore(args.base, args.chunks, args.out)}")


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory of a Hallo-layout EmoPipeline: seconds per frame and peak VRAM, Hallo's settings.

    python benchmarks/bench_hallo.py --device cuda --dtype fp16                 # full size, random weights
    python benchmarks/bench_hallo.py --model models/hallo --device cuda --dtype fp16   # a converted folder
    python benchmarks/bench_hallo.py --random tiny --device cpu --steps 2       # the script itself, on a CPU

Full size is Hallo's published network (SD 1.5 UNets with its audio and motion modules, wav2vec2-base, the
SD VAE): ~2.4 B parameters built with random weights, so no download is needed; speed and memory do not
depend on the values. Defaults are Hallo's: 512 x 512, 40 DDIM steps, guidance 3.5, 16-frame clips with
2 motion frames. Hallo's paper reports ~1.6 s per frame and ~9.8 GB. Results are appended as JSON lines to
benchmarks/results_hallo.jsonl; RESULTS.md quotes them with the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # hallo_release: Hallo's key layout, independent of our models

from pipeline import EmoPipeline  # noqa: E402
from pipeline.hallo import hallo_pipeline, model_configs  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD15_UNET = dict(  # SD 1.5's unet/config.json, the values that shape the network
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, attention_head_dim=8, norm_num_groups=32, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)  # fmt: skip
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
    sample_size=512,
)  # fmt: skip
WAV2VEC_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def random_hallo_pipeline(size: str, device: str) -> EmoPipeline:
    """Hallo's network at `size` ("full" or "tiny") with random weights, built on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from hallo_release import TINY_SIZES, TINY_UNET, TINY_WAV2VEC, hallo_net_shapes
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from pipeline.models import AudioProjection, EmoUNet3DModel, FaceLocator, IdentityProjection, ReferenceNet

    full = size == "full"
    unet_config = SD15_UNET if full else TINY_UNET
    wav2vec = Wav2Vec2Config(**(WAV2VEC_BASE if full else TINY_WAV2VEC))
    extra = {} if full else TINY_SIZES
    shapes = hallo_net_shapes(
        unet_config, wav2vec_layers=wav2vec.num_hidden_layers, wav2vec_hidden=wav2vec.hidden_size, **extra
    )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, shape in shapes.items():  # shapes only: configs are read from them
        prefix, rest = key.split(".", 1)
        groups.setdefault(prefix + ".", {})[rest] = torch.empty(shape, device="meta")
    with torch.device("meta"):  # SD's config.json as diffusers writes it (every field, defaults included)
        sd_config = dict(UNet2DConditionModel(**unet_config).config)
    configs = model_configs(sd_config, groups, wav2vec)
    classes = dict(
        reference_net=ReferenceNet, denoising_unet=EmoUNet3DModel, face_locator=FaceLocator,
        identity_projection=IdentityProjection, audio_projection=AudioProjection,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: 2.4 B parameters initialise fast on a GPU
        models = {name: cls(**configs[name]) for name, cls in classes.items()}
        vae = AutoencoderKL(**(SD_VAE if full else dict(SD_VAE, block_out_channels=[8, 16, 16, 16],
                                                         norm_num_groups=8, layers_per_block=1)))  # fmt: skip
        encoder = Wav2Vec2Model(wav2vec)
    for module in (*models.values(), vae, encoder):
        module.eval()  # as from_pretrained leaves them (wav2vec2's layer drop is on in training mode)
    return hallo_pipeline(models, vae, encoder, Wav2Vec2FeatureExtractor(do_normalize=True))


def inputs(size: int, seconds: float) -> dict:
    """A portrait-like image, a voice-like tone, a face box, soft region masks and a face embedding."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    box = np.zeros((size, size), np.float32)
    box[size // 6 : 5 * size // 6, size // 5 : 4 * size // 5] = 1
    yy, xx = np.mgrid[:64, :64]
    face = (np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 300) * 255).astype(np.uint8)
    lip = (np.exp(-((yy - 44) ** 2 + (xx - 32) ** 2) / 40) * 255).astype(np.uint8)
    masks = {"full": 255 - face, "face": np.clip(face.astype(int) - lip, 0, 255).astype(np.uint8), "lip": lip}
    return dict(image=image, audio=audio, face_mask=box, region_masks=masks,
                face_embedding=rng.standard_normal(512).astype(np.float32))  # fmt: skip


def bench(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    started = time.perf_counter()
    if args.model:
        pipe = EmoPipeline.from_pretrained(args.model, torch_dtype=dtype)
    else:
        pipe = random_hallo_pipeline(args.random, device)
    for name, module in pipe.components.items():  # nn.Module.to: no diffusers cast warnings
        if isinstance(module, torch.nn.Module):  # Hallo runs wav2vec2 in float32
            torch.nn.Module.to(module, device, torch.float32 if name == "audio_encoder" else dtype)
    pipe.set_progress_bar_config(disable=True)
    build_seconds = time.perf_counter() - started
    size = args.size or pipe.default_size
    clip = pipe.config.generation_defaults["clip_length"]
    fps = pipe.config.generation_defaults["fps"]
    data = inputs(size, args.clips * clip / fps)
    kwargs = dict(sampling_rate=16000, num_inference_steps=args.steps, output_type="np", height=size,
                  width=size, face_mask=data["face_mask"], region_masks=data["region_masks"],
                  face_embedding=data["face_embedding"])  # fmt: skip
    clip_times: list[float] = []
    last = [0.0]

    def on_clip(pipe, i, n, frames):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        clip_times.append(now - last[0])
        last[0] = now

    pipe(
        data["image"], data["audio"][: 16000 * clip // fps], **{**kwargs, "num_inference_steps": 1}
    )  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    last[0] = time.perf_counter()
    out = pipe(data["image"], data["audio"], callback_on_clip_end=on_clip, **kwargs)
    frames = np.asarray(out.frames)
    per_clip = float(np.median(clip_times))
    result = {
        "model": args.model or f"random {args.random} Hallo layout",
        "parameters": sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                          for p in m.parameters()),
        "device": device, "dtype": args.dtype, "size": size, "steps": args.steps, "clips": args.clips,
        "frames": int(frames.shape[0]), "seconds_per_clip": per_clip, "seconds_per_frame": per_clip / clip,
        "first_clip_seconds": clip_times[0], "build_seconds": build_seconds,
        "frames_finite": bool(np.isfinite(frames).all()), "frames_std": float(frames.std()),
        "peak_cpu_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["cpu"] = platform.processor() or platform.machine()
        result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a converted Hallo folder (python -m pipeline.convert hallo ...)")
    parser.add_argument("--random", choices=("full", "tiny"), default="full", help="size without --model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--size", type=int, help="pixels (default: the model's, Hallo 512)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--clips", type=int, default=2, help="16-frame clips (the second has motion frames)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_hallo.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args)
    result["command"] = " ".join(["python", *sys.argv])
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

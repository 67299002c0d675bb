"""Speed and memory of EmoPipeline: seconds per 12-frame clip, peak memory, parameters and FLOPs.

    python benchmarks/bench_pipeline.py --config tiny --device cpu                # the tiny test model
    python benchmarks/bench_pipeline.py --config sd15 --device cuda --dtype fp16  # EMO's size, random weights
    python benchmarks/bench_pipeline.py --config assets/models/emo-small           # the embedded model
    python benchmarks/bench_pipeline.py --flops                                   # full-size counts, no weights

Results are appended as JSON lines to benchmarks/results.jsonl; RESULTS.md quotes them with the command.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import CONFIGS, EmoPipeline, EmoUNet3DModel, ReferenceNet, build_pipeline  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def count_flops(clip_length: int = 12, motion_frames: int = 4, size: int = 512) -> dict:
    """Parameters and FLOPs of the full-size backbone and ReferenceNet, built on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        backbone = EmoUNet3DModel()
        reference_net = ReferenceNet()
        latent = size // 8
        sample = torch.randn(1, 4, clip_length, latent, latent)
        reference_input = torch.randn(1 + motion_frames, 4, latent, latent)
        with FlopCounterMode(display=False) as ref_counter:
            features = reference_net(reference_input)
        reference_tokens = {k: v[:1] for k, v in features.reference_tokens.items()}
        motion = {k: v[1:][None] for k, v in features.motion_features.items()}
        with FlopCounterMode(display=False) as counter:
            backbone(
                sample, torch.tensor([500]), reference_tokens, motion,
                audio_tokens=torch.randn(1, clip_length, 32, 768), speed_tokens=torch.randn(1, clip_length, 256),
                face_features=torch.randn(1, 320, latent, latent),
            )  # fmt: skip
    return {
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
        "reference_net_params": sum(p.numel() for p in reference_net.parameters()),
        "backbone_gflops_per_frame_per_step": counter.get_total_flops() / clip_length / 1e9,
        "reference_net_gflops_per_clip": ref_counter.get_total_flops() / 1e9,
    }


def bench(
    config: str, device: str, dtype: str, clips: int, steps: int, guidance: float,
    compile_backbone: bool = False, preset: str | None = None, profile: bool = False,
) -> dict:  # fmt: skip
    """`config`: a size name of `CONFIGS` (random weights) or a saved pipeline folder."""
    torch.manual_seed(0)
    if Path(config).is_dir():
        pipe = EmoPipeline.from_pretrained(config, dtype=DTYPES[dtype]).to(device)
    else:
        pipe = build_pipeline(config).to(device, DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_size
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    audio = np.random.default_rng(1).normal(0, 0.1, int(16000 * clips * 12 / 25)).astype(np.float32)
    kwargs = dict(sampling_rate=16_000, face_mask=np.ones((size, size)), num_inference_steps=steps,
                  guidance_scale=guidance, output_type="none", preset=preset)  # fmt: skip
    if preset is not None:
        kwargs.pop("num_inference_steps")
    if compile_backbone:
        pipe.denoising_unet.compile()  # torch.compile in place (nn.Module.compile): the folder still saves
    clip_times: list[float] = []
    last = [0.0]

    def on_clip(pipe, i, n, frames):
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        clip_times.append(now - last[0])
        last[0] = now

    started = time.perf_counter()
    pipe(image, audio[:1600], **kwargs)  # warm-up (and compilation)
    warmup_seconds = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    last[0] = time.perf_counter()
    pipe(image, audio, callback_on_clip_end=on_clip, **kwargs)
    result = {
        "config": config, "device": device, "dtype": dtype, "size": size, "steps": steps,
        "guidance_scale": guidance, "clips": clips,
        "seconds_per_clip": float(np.median(clip_times[1:] if len(clip_times) > 1 else clip_times)),
        "first_clip_seconds": clip_times[0], "warmup_seconds": warmup_seconds, "compiled": compile_backbone,
        "preset": preset,
        "peak_cpu_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
    if profile:
        result["top_ops"] = profile_step(pipe, image, audio, kwargs, device)
    if device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["cpu"] = platform.processor() or platform.machine()
        result["threads"] = torch.get_num_threads()
    return result


def profile_step(pipe, image, audio, kwargs: dict, device: str, top: int = 12) -> list[dict]:
    """torch.profiler over one denoising step (both guidance branches) -> the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    state = {"prof": None}

    def on_step(pipe, step, t, tensors):
        if step == 0:  # the profiler covers step 1 only
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
        elif step == 1 and state["prof"] is not None:
            if device == "cuda":
                torch.cuda.synchronize()
            state["prof"].__exit__(None, None, None)
        return tensors

    pipe(
        image,
        audio[:1600],
        callback_on_step_end=on_step,
        **{**kwargs, "preset": None, "num_inference_steps": 3},
    )
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(state["prof"].key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in state["prof"].key_averages())
    return [{"op": e.key, "ms": getattr(e, key) / 1000, "share": getattr(e, key) / total} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny", help=f"{sorted(CONFIGS)} or a pipeline folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the backbone (time it takes: warmup_seconds)"
    )
    parser.add_argument("--preset", help="a pipeline.presets name instead of --steps")
    parser.add_argument(
        "--profile", action="store_true", help="profile one denoising step: top ops by self time"
    )
    parser.add_argument("--flops", action="store_true", help="count full-size parameters and FLOPs only")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flops:
        result = {"kind": "flops", **count_flops()}
    else:
        result = {"kind": "speed", **bench(args.config, args.device, args.dtype, args.clips, args.steps,
                                           args.guidance_scale, args.compile, args.preset, args.profile)}  # fmt: skip
    result["command"] = " ".join(["python", *sys.argv])
    print(json.dumps(result, indent=2))
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

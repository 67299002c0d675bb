"""Training throughput and memory of one EMO stage: samples per second and peak memory per optimiser step.

    python benchmarks/bench_training.py --config training/configs/tiny_stage2.yaml --steps 10      # CPU, tiny
    python benchmarks/bench_training.py --config training/configs/stage2.yaml --model sd15 --steps 20 \\
        --set train.batch_size=1                  # CUDA, EMO's size (random weights), bf16 from the config

The stage's real training step runs (`training.train.training_loss`, backward, optimiser step, under the
config's mixed precision, gradient checkpointing and optimiser); `--model` replaces the config's init by
random weights of that size (no downloads). Without `--data` a synthetic dataset is prepared in a temporary
folder at the config's resolution. The first `--warmup` steps are not timed. Results are appended as JSON
lines to benchmarks/results_training.jsonl; RESULTS.md quotes them with the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import load_config  # noqa: E402
from training.train import (  # noqa: E402
    build_training_model,
    compute_audio_features,
    make_dataset,
    make_optimizer,
    training_loss,
)


def synthetic_dataset(folder: Path, size: int, frames_needed: int) -> Path:
    """Two synthetic talking videos prepared at `size` pixels, clips long enough for the stage."""
    from training import synthetic
    from training.prepare import PrepareOptions, prepare

    videos = folder / "videos"
    videos.mkdir(parents=True)
    seconds = max(2.0, (frames_needed + 2) / 25)
    for seed in range(2):
        synthetic.write_talking_video(videos / f"v{seed}.mp4", seconds=seconds, size=max(96, size), seed=seed)
    options = PrepareOptions(size=size, clip_length=max(frames_needed, 20), min_clip_length=frames_needed)
    prepare(videos, folder / "data", options)
    return folder / "data"


def benchmark(config, steps: int, warmup: int) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    t = config.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    pipe, model, params = build_training_model(config, accelerator.device)
    audio_dir = None
    if config.stage > 1 and config.data.audio_features == "compute":
        audio_dir = Path(config.output_dir) / "audio_features"
        fps = json.loads((Path(config.data.root) / "manifest.json").read_text())["options"]["fps"]
        compute_audio_features(pipe, config.data.root, audio_dir, fps)
    dataset = make_dataset(config, pipe, audio_dir)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size, shuffle=True, drop_last=True, num_workers=config.data.num_workers
    )
    optimizer = make_optimizer(config, params)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    cuda = accelerator.device.type == "cuda"

    def batches():
        while True:
            yield from loader

    stream = batches()
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        for _ in range(t.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss = training_loss(model, pipe, scheduler, next(stream), config, generator, accelerator)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples = steps * t.batch_size * t.gradient_accumulation_steps
    result = {
        "stage": config.stage,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "mixed_precision": t.mixed_precision,
        "resolution": config.data.resolution,
        "frames_per_sample": config.data.num_frames + config.data.num_motion_frames,
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_checkpointing": t.gradient_checkpointing,
        "use_8bit_adam": t.use_8bit_adam,
        "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "steps": steps,
        "seconds_per_step": round(seconds / steps, 4),
        "samples_per_second": round(samples / seconds, 3),
        "last_loss": round(loss.item(), 5),
    }
    if cuda:
        result["peak_cuda_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["peak_cpu_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a stage YAML")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--model", default=None, help="random weights of this build_pipeline size (tiny, sd15)"
    )
    parser.add_argument("--data", default=None, help="a prepared dataset (default: a synthetic one)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_training.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.set)
    if args.model:
        overrides += [
            "init.pipeline=null",
            "init.base_models=null",
            f"init.model={args.model}",
            "init.motion_module=null",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        overrides.append(f"output_dir={tmp}/run")
        config = load_config(args.config, overrides)
        if args.data is None:  # synthetic clips; their audio features from the model's own encoder
            frames = config.data.num_frames + config.data.num_motion_frames + 1
            root = synthetic_dataset(Path(tmp), config.data.resolution, frames)
            overrides += [f"data.root={root}", "data.audio_features=compute"]
        else:
            overrides.append(f"data.root={args.data}")
        config = load_config(args.config, overrides)
        result = benchmark(config, args.steps, args.warmup)
    result["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(result, indent=1))
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

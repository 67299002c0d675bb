"""A small EMO trained from scratch on synthetic talking videos: the app's embedded stand-in model.

    python -m training.small_model --out assets/models/emo-small [--work runs/emo-small]

No weights can be downloaded here, so every part starts random: (1) synthetic talking videos (the
astronaut portrait turning and swaying, speech-like sound) go through `training.prepare`; (2) the VAE,
which the stages keep frozen, is first fitted as an autoencoder on the prepared frames (and its latent
scaling factor set to 1 / latent std); (3) stage 1 and stage 2 run with `training.train` on 64 x 64 crops;
(4) the stage 2 export is copied to `--out`. It mostly reproduces the reference portrait; it is a stand-in
until a model trained on real video exists.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from pipeline import build_pipeline
from pipeline.loading import CONFIGS

from . import synthetic
from .config import config_from_dict
from .data import EmoDataset
from .prepare import PrepareOptions, prepare
from .train import train

logger = logging.getLogger("training.small_model")

RESOLUTION = 64
# the "tiny" networks with a VAE that downsamples 4x: 64 x 64 frames -> 16 x 16 latents
SMALL = {
    **CONFIGS["tiny"],
    "vae": {
        **CONFIGS["tiny"]["vae"],
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "sample_size": RESOLUTION,
    },
    "face_locator": {"block_out_channels": (8, 16, 32)},
}


def fit_vae(
    pipe, data_root: Path, steps: int, batch_size: int = 8, lr: float = 1e-3, kl_weight: float = 1e-6
) -> float:
    """Fit `pipe.vae` as an autoencoder on the prepared frames -> final reconstruction MSE (pixels -1..1)."""
    dataset = EmoDataset(data_root, RESOLUTION, seed=0)
    frames = torch.cat([dataset[i]["pixel_values"] for i in range(len(dataset) * 4)])  # 4 draws per clip
    vae = pipe.vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    mse = torch.tensor(float("nan"))
    for step in range(steps):
        batch = frames[torch.randint(0, len(frames), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        loss = mse + kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            logger.info("vae step %d: reconstruction mse %.4f", step, mse.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = vae.encode(frames[:64]).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return mse.item()


def stage_config(stage: int, work: Path, data_root: Path, steps: int, init: dict) -> dict:
    clip = (
        {"num_frames": 1, "num_motion_frames": 0} if stage == 1 else {"num_frames": 8, "num_motion_frames": 4}
    )
    trainable = ["backbone", "reference_net", "face_locator"] + (["temporal", "audio"] if stage == 2 else [])
    return {
        "stage": stage,
        "output_dir": str(work / f"stage{stage}"),
        "init": init,
        "data": {
            "root": str(data_root),
            "resolution": RESOLUTION,
            "num_workers": 0,
            "samples_per_clip": 8,
            **clip,
        },
        "train": {
            "trainable": trainable,
            "learning_rate": 3e-4,
            "lr_warmup_steps": 50,
            "batch_size": 4 if stage == 1 else 1,
            "max_steps": steps,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "use_8bit_adam": False,
            "ema": True,
            "ema_decay": 0.99,
            "seed": 0,
        },
        "checkpointing": {"every": 500, "keep": 1},
        "log_every": 50,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.small_model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("assets/models/emo-small"))
    parser.add_argument("--work", type=Path, default=Path("runs/emo-small"))
    parser.add_argument("--videos", type=int, default=6, help="synthetic videos of 4 s")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--stage1-steps", type=int, default=1500)
    parser.add_argument("--stage2-steps", type=int, default=400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = args.work

    # 1. Synthetic data, audio features from the model's own (random) wav2vec2
    torch.manual_seed(0)
    pipe = build_pipeline(SMALL)
    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for seed in range(args.videos):
        if not (videos / f"talk{seed}.mp4").is_file():
            synthetic.write_talking_video(videos / f"talk{seed}.mp4", seconds=4.0, size=96, seed=seed)
    init = work / "init"
    pipe.save_pretrained(init)
    data_root = work / "data"
    prepare(
        videos,
        data_root,
        PrepareOptions(size=RESOLUTION, clip_length=50, min_clip_length=12, wav2vec=str(init)),
    )

    # 2. The VAE, fitted once and frozen afterwards
    mse = fit_vae(pipe, data_root, args.vae_steps)
    logger.info("vae: reconstruction mse %.4f, scaling factor %.3f", mse, pipe.vae.config.scaling_factor)
    pipe.save_pretrained(init)

    # 3. Stages 1 and 2
    result = train(
        config_from_dict(stage_config(1, work, data_root, args.stage1_steps, {"pipeline": str(init)}))
    )
    logger.info("stage 1: loss %.4f after %d steps", result["loss"], result["step"])
    stage2 = stage_config(2, work, data_root, args.stage2_steps, {"pipeline": str(result["export"])})
    result = train(config_from_dict(stage2))
    logger.info("stage 2: loss %.4f after %d steps", result["loss"], result["step"])

    # 4. Export
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(result["export"], args.out)
    logger.info("small model -> %s", args.out)


if __name__ == "__main__":
    main()

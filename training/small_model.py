"""The embedded model: a small EMO trained from nothing on the real talking faces of `../shared/data`.

    python -m training.small_model --data ../shared/data --work runs/emo-small --out assets/models/emo-small

Every step writes its result under `--work` and is skipped when that result exists, and the stages resume
from their last checkpoint, so the same command continues after an interruption (a new machine needs only
`--work` copied). Steps:
1. data: the training part of `--data` (`training.splits` keeps the held-out people and sentences out):
   every `--grid-every`-th GRID sentence, the real and generated talking clips -> 128 px face-crop clips
   (`training.prepare`); the face photos -> augmented pseudo-clips for stage 1 (`training.photos`);
2. mouth: the lip gap measured with MediaPipe on every prepared frame (`training.mouth`); with
   `--talking-photos N`, N clips per photo whose mouth moves as a real clip's, with its sound
   (`training.talking_photos`), for stages 2 and 3;
3. vae: an 8x-downsampling VAE (4x with `--latent-scale 4`) fitted as an autoencoder on the frames and
   photos, frozen afterwards;
4. audio: a log-mel audio encoder pretrained to predict the measured mouth opening, frozen afterwards;
5. stage 1 (images: ReferenceNet, backbone, face locator), stage 2 (clips with audio: + temporal and
   audio layers, mouth-weighted loss), stage 3 (speed layers on the measured head speed) with `training.train`;
6. decoder: the VAE's decoder trained further with its encoder frozen (the latent space of the stages
   stays; can run alongside them: `python -c "from training.small_model import ..."`), then export: stage
   3's pipeline with the refined decoder and this model's generation defaults, to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline import EmoPipeline, build_pipeline
from pipeline.behaviour import Behaviour

from .config import config_from_dict
from .data import EmoDataset
from .photos import PHOTO_EXTENSIONS, prepare_photos
from .prepare import PrepareOptions, prepare
from .splits import hash_bucket, is_heldout
from .train import train

logger = logging.getLogger("training.small_model")

RESOLUTION = 128
CLIP_LENGTH, MOTION_FRAMES = 8, 4
SMALL = {
    "unet": dict(
        sample_size=RESOLUTION // 8,
        in_channels=8,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    "backbone": dict(
        out_channels=8,
        audio_dim=64,
        motion_num_attention_heads=4,
        motion_norm_num_groups=16,
        speed_dim=64,
        reference_latent_channels=8,  # the reference's latents added to every frame (identity at this size)
    ),
    "vae": dict(
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    ),
    "audio_encoder": dict(type="mel", hidden_size=64, num_hidden_layers=4),
    "audio_projection": dict(intermediate_dim=128, output_dim=64, context_tokens=8),
    "speed_encoder": dict(hidden_dim=64, output_dim=64),
    "face_locator": dict(block_out_channels=(8, 16, 32, 32)),
}


def small_config(latent_scale: int = 8) -> dict:
    """The small model's sizes: `SMALL` (an 8x VAE: 16x16 latents at 128 px, the shipped model), or with
    `latent_scale` 4 a 4x VAE (32x32 latents, four times the latent pixels of the mouth) and a backbone with a
    third level, without attention, on the 32x32 latents (a two-level backbone at that size is ~3.5x slower)."""
    config = copy.deepcopy(SMALL)
    if latent_scale == 8:
        return config
    if latent_scale != 4:
        raise ValueError(f"latent_scale {latent_scale}: the small model has a 4x or 8x VAE")
    config["vae"] |= dict(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    config["unet"] |= dict(
        sample_size=RESOLUTION // 4,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    config["face_locator"] = dict(block_out_channels=(8, 16, 32))
    return config


# the model's own settings, saved in its model_index.json (see benchmarks/bench_presets.py for the choice)
GENERATION_DEFAULTS = dict(clip_length=CLIP_LENGTH, num_motion_frames=MOTION_FRAMES, fps=25.0, preset="fast")


# ------------------------------------------------------------------------------------------------ 1. data
def prepare_data(data: Path, work: Path, grid_every: int, workers: int) -> tuple[Path, Path]:
    """The training part of `data` -> (prepared video clips, photo pseudo-clips)."""
    videos = work / "videos"
    for folder, every in (("grid_s1", grid_every), ("real", 1), ("generated", 1)):
        files = [f for f in sorted((data / folder).glob("*.mp4")) if not is_heldout(f"{folder}/{f.name}")]
        (videos / folder).mkdir(parents=True, exist_ok=True)
        for f in files[::every]:
            link = videos / folder / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    clips = work / "data"
    options = PrepareOptions(size=RESOLUTION, clip_length=50, min_clip_length=CLIP_LENGTH + MOTION_FRAMES)
    if not (clips / "DONE").is_file():
        prepare(videos, clips, options, workers=workers)
        (clips / "DONE").touch()
    photos = work / "photos"
    if not (photos / "DONE").is_file():
        files = [p for p in (data / "faces").iterdir() if p.suffix.lower() in PHOTO_EXTENSIONS]
        prepare_photos([p for p in files if not is_heldout(f"faces/{p.name}")], photos, RESOLUTION)
        (photos / "DONE").touch()
    return clips, photos


# ------------------------------------------------------------------------------------------------ 3. vae
def _frame_pool(roots: list[Path], seed: int, with_mouth: bool = False):
    """Three random frames per clip of `roots`, (n, 3, R, R) in [-1, 1]; with `with_mouth` also their mouth
    regions (n, 1, R, R) in {0, 1} (`pipeline.face.mouth_mask` of the face box)."""
    dataset = EmoDataset([str(r) for r in roots], RESOLUTION, seed=seed)
    order = np.random.default_rng(seed).permutation(len(dataset) * 3) % len(dataset)
    samples = [dataset[int(i)] for i in order]
    frames = torch.stack([s["pixel_values"][0] for s in samples])
    if not with_mouth:
        return frames
    return frames, torch.stack([s["mouth_mask"].float() for s in samples])


def reconstruction_loss(
    recon: torch.Tensor, target: torch.Tensor, mouth: torch.Tensor | None = None, mouth_weight: float = 0.0
) -> torch.Tensor:
    """MSE + L1 of a reconstruction, each pixel weighted 1 + `mouth_weight` inside the `mouth` region
    (b, 1, H, W) (the mean weight is divided out, so the unweighted pixels keep their scale)."""
    if mouth is None or not mouth_weight:
        return torch.nn.functional.mse_loss(recon, target) + (recon - target).abs().mean()
    error = (recon - target) ** 2 + (recon - target).abs()
    weight = 1.0 + mouth_weight * mouth
    return (error * weight).mean() / weight.mean()


def _train_autoencoder(
    vae, pool: torch.Tensor, params: list, steps: int, batch_size: int, lr: float, seed: int,
    train_encoder: bool, crop_fraction: float = 0.0, name: str = "vae", mouths: torch.Tensor | None = None,
    mouth_weight: float = 0.0,
) -> float:  # fmt: skip
    """Reconstruction training of `params` (`reconstruction_loss`: L1 + MSE, the `mouths` regions of `pool`
    weighted by 1 + `mouth_weight`, plus a tiny KL when the encoder trains) on random batches of `pool`,
    mirrored every other step; the first `crop_fraction` of the steps see random 64 px crops (the VAE is
    convolutional: 4x cheaper). Returns the last reconstruction MSE."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    mse = torch.tensor(float("nan"))
    for step in range(steps):
        chosen = torch.randint(0, len(pool), (batch_size,), generator=generator)
        batch = pool[chosen]
        mouth = mouths[chosen] if mouths is not None else None
        if step < crop_fraction * steps:
            y, x = torch.randint(0, RESOLUTION - 64 + 1, (2,), generator=generator).tolist()
            batch = batch[..., y : y + 64, x : x + 64]
            mouth = mouth[..., y : y + 64, x : x + 64] if mouth is not None else None
        if step % 2:
            batch = batch.flip(-1)
            mouth = mouth.flip(-1) if mouth is not None else None
        with torch.set_grad_enabled(train_encoder):
            posterior = vae.encode(batch).latent_dist
            latents = posterior.sample(generator)
        recon = vae.decode(latents).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        loss = reconstruction_loss(recon, batch, mouth, mouth_weight)
        if train_encoder:
            loss = loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d: reconstruction mse %.4f", name, step, mse.item())
    vae.eval().requires_grad_(False)
    return mse.item()


def fit_vae(
    vae, roots: list[Path], steps: int, batch_size: int = 16, lr: float = 1e-3, crop_fraction: float = 0.75
) -> float:
    """Fit `vae` as an autoencoder on frames of `roots` -> final reconstruction MSE of whole frames; the
    first `crop_fraction` of the steps on 64 px crops. Sets the latent scaling factor to 1 / std of the
    latents (as SD's 0.18215)."""
    pool = _frame_pool(roots, seed=0)
    vae.train().requires_grad_(True)
    mse = _train_autoencoder(vae, pool, list(vae.parameters()), steps, batch_size, lr, seed=0,
                             train_encoder=True, crop_fraction=crop_fraction)  # fmt: skip
    with torch.no_grad():
        std = vae.encode(pool[:128]).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return mse


def refine_decoder(
    vae, roots: list[Path], steps: int, batch_size: int = 8, lr: float = 5e-4, mouth_weight: float = 0.0
) -> float:
    """Train the VAE's decoder further with its encoder frozen -> final reconstruction MSE of whole frames;
    `mouth_weight`: extra loss weight of the mouth region.

    The latent space (the encoder) stays the one the stages were trained in, so a sharper decoder can
    replace the old one in a trained pipeline; it runs alongside the stages."""
    pool, mouths = _frame_pool(roots, seed=1, with_mouth=True)
    vae.requires_grad_(False)
    vae.decoder.train().requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    return _train_autoencoder(vae, pool, params, steps, batch_size, lr, seed=1, train_encoder=False,
                              name="decoder", mouths=mouths, mouth_weight=mouth_weight)  # fmt: skip


def refined_vae(
    work: Path,
    vae_dir: Path,
    roots: list[Path],
    steps: int,
    mouth_weight: float = 0.0,
    name: str = "vae_decoder",
) -> Path:
    """`work/<name>`: the VAE of the pipeline `vae_dir` with its decoder trained `steps` more (done once)."""
    from diffusers import AutoencoderKL

    out = work / name
    if not (out / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir / "vae")
        mse = refine_decoder(vae, roots, steps, mouth_weight=mouth_weight)
        vae.save_pretrained(out)
        (work / f"{name}.json").write_text(
            json.dumps({"mse": mse, "steps": steps, "mouth_weight": mouth_weight})
        )
    return out


# ------------------------------------------------------------------------------------------------ 5. stages
def stage_config(
    stage: int,
    work: Path,
    roots: list[Path],
    steps: int,
    init: str,
    name: str | None = None,
    mouth_weight: float = 4.0,
    motion_dropout: float = 0.2,
    learning_rate: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    loader_workers: int = 1,
    max_minutes: float = 0.0,
    mouth_drive_lr_scale: float = 1.0,
    mixed_precision: str = "no",
) -> dict:
    """The `training.train` config of one stage; `name` (default "stage<n>") is its folder under `work`; stage n
    trains with seed n + `seed` (the sample order and noise draws). `batch_size` (stages 2-3; default 4) and
    `loader_workers` size it for a GPU, as `mixed_precision` ("bf16" there; the default "no" is fp32, as the
    shipped model trained); `max_minutes` > 0 ends it at the first step after that much time."""
    if stage == 1:
        clip = {"num_frames": 1, "num_motion_frames": 0}
        trainable = ["backbone", "reference_net", "face_locator"]
        batch_size, lr = 16, 5e-4
    elif stage == 2:
        clip = {"num_frames": CLIP_LENGTH, "num_motion_frames": MOTION_FRAMES}
        trainable = ["backbone", "reference_net", "face_locator", "temporal", "audio"]
        batch_size, lr = batch_size or 4, 2e-4
    else:
        clip = {"num_frames": CLIP_LENGTH, "num_motion_frames": MOTION_FRAMES}
        trainable = ["temporal", "speed"]
        batch_size, lr = batch_size or 4, 2e-4
    return {
        "stage": stage,
        "output_dir": str(work / (name or f"stage{stage}")),
        "init": {"pipeline": init},
        "data": {
            "root": [str(r) for r in roots] if len(roots) > 1 else str(roots[0]),
            "resolution": RESOLUTION,
            "audio_features": "compute",
            "num_workers": loader_workers,
            "samples_per_clip": 4,
            **clip,
        },
        "train": {
            "trainable": trainable,
            "learning_rate": learning_rate or lr,
            "lr_warmup_steps": 50,
            "batch_size": batch_size,
            "max_steps": steps,
            "max_minutes": max_minutes,
            "mixed_precision": mixed_precision,
            "gradient_checkpointing": False,
            "use_8bit_adam": False,
            "mouth_weight": 0.0 if stage == 1 else mouth_weight,
            "mouth_drive_lr_scale": mouth_drive_lr_scale,
            "ema": True,
            "ema_decay": 0.995,
            "seed": stage + seed,
            "condition_dropout": {"reference": 0.05, "audio": 0.1, "motion": motion_dropout},
        },
        "checkpointing": {"every": 100, "keep": 1},
        "log_every": 25,
    }


def run_stage(stage: int, work: Path, roots: list[Path], steps: int, init: Path, **options) -> Path:
    """Train (or resume, or skip when done) one stage -> its exported pipeline folder (`options`: those of
    `stage_config`)."""
    out = work / (options.get("name") or f"stage{stage}")
    if (out / "DONE").is_file():
        return out / "pipeline"
    started = time.time()
    config = config_from_dict(stage_config(stage, work, roots, steps, str(init), **options))
    resume = "latest" if any(out.glob("checkpoint-*")) else None
    result = train(config, resume=resume)
    minutes = (time.time() - started) / 60
    logger.info(
        "stage %d: loss %.4f after %d steps (%.1f min this run)",
        stage,
        result["loss"],
        result["step"],
        minutes,
    )
    (out / "DONE").write_text(
        json.dumps({"loss": result["loss"], "steps": result["step"], "minutes": minutes})
    )
    return result["export"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.small_model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the talking-face material")
    parser.add_argument("--work", type=Path, default=Path("runs/emo-small"), help="intermediate results")
    parser.add_argument("--out", type=Path, default=Path("assets/models/emo-small"))
    parser.add_argument("--grid-every", type=int, default=3, help="use every n-th GRID sentence")
    parser.add_argument(
        "--latent-scale",
        type=int,
        choices=(8, 4),
        default=8,
        help="the VAE's downsampling (`small_config`): 8 as the shipped model, 4 for 32x32 latents (fresh runs)",
    )
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--audio-steps", type=int, default=800)
    parser.add_argument(
        "--stage1-steps", type=int, help="default 1200; 0 with --continue-from (which then skips stage 1)"
    )
    parser.add_argument("--stage2-steps", type=int, default=1200)
    parser.add_argument("--stage3-steps", type=int, default=200)
    parser.add_argument(
        "--decoder-steps", type=int, default=1500, help="VAE decoder refinement (frozen encoder)"
    )
    parser.add_argument(
        "--decoder-mouth-weight",
        type=float,
        default=0.0,
        help="extra loss weight of the mouth region in the decoder refinement",
    )
    parser.add_argument(
        "--refine-decoder",
        action="store_true",
        help="with --continue-from: train the kept decoder --decoder-steps more (with --decoder-mouth-weight) "
        "before the export; the encoder, so the latent space, stays",
    )
    parser.add_argument(
        "--stop-after", choices=["data", "mouth", "vae", "audio", "stage1", "stage2", "stage3"]
    )
    parser.add_argument(
        "--continue-from",
        type=Path,
        help="a small model made by this command (e.g. assets/models/emo-small): skip vae and audio, train "
        "stage 1 (--stage1-steps, default 0), 2 and 3 further from it, keep its VAE (folders stage<n>_continued)",
    )
    parser.add_argument(
        "--mouth-weight", type=float, default=4.0, help="stages 2-3: extra loss weight of the mouth"
    )
    parser.add_argument(
        "--motion-dropout",
        type=float,
        default=0.2,
        help="stages 2-3: chance of training without motion frames",
    )
    parser.add_argument("--learning-rate", type=float, help="stages 2-3 (default 2e-4)")
    parser.add_argument("--batch-size", type=int, help="stages 2-3 (default 4; more on a GPU)")
    parser.add_argument("--loader-workers", type=int, default=1, help="data loader processes of stages 2-3")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="stages 2-3 on a GPU: autocast (the two fp32 runs on an H200 were GPU-bound at 1.5-1.8 steps/s)",
    )
    parser.add_argument(
        "--stage2-minutes",
        type=float,
        default=0.0,
        help="> 0: stage 2 ends (checkpoint, export) at the first step after this many minutes, "
        "or at --stage2-steps if sooner",
    )
    parser.add_argument("--stage3-minutes", type=float, default=0.0, help="as --stage2-minutes")
    parser.add_argument(
        "--mask-reference-mouth",
        action="store_true",
        help="hide the portrait's mouth from the reference-latent injection (behaviour.mask_reference_mouth); "
        "tried once, not in the shipped model (see its model card)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="stages 2-3 train with seed <stage> + this; give a new one when continuing a continued model, "
        "so that it does not replay the sample order of the run before",
    )
    parser.add_argument(
        "--talking-photos",
        type=int,
        default=0,
        help="stages 2-3 also train on this many talking-photo clips per photo (`training.talking_photos`: "
        "the photos' mouths opened as a real clip's, with its sound); 0: none",
    )
    parser.add_argument(
        "--mouth-drive",
        action="store_true",
        help="with --continue-from: add a mouth drive (the voice's predicted mouth opening drawn into the "
        "mouth region of every frame, `mouth_drive` of the backbone and the audio projection) before stage 2",
    )
    parser.add_argument(
        "--posed-reference",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="with --continue-from: give every frame the portrait with its mouth opened as the frame's (training: "
        "measured; inference: the voice's, up to FRACTION of the face height; `behaviour.posed_reference`)",
    )
    parser.add_argument(
        "--mouth-head-steps",
        type=int,
        default=1500,
        help="fitting the mouth head (--mouth-drive, --posed-reference)",
    )
    parser.add_argument(
        "--head-speech",
        type=int,
        default=0,
        metavar="N",
        help="--posed-reference: fit the mouth head also on N espeak-ng sentences with the opening of their "
        "phonemes (`training.spoken_phonemes`; 800 with --mouth-head-hidden 64 follows new voices best)",
    )
    parser.add_argument(
        "--mouth-drive-lr-scale",
        type=float,
        default=1.0,
        help="stages 2-3: the backbone's mouth-drive conv learns at this times the learning rate",
    )
    parser.add_argument(
        "--mouth-head-hidden",
        type=int,
        default=0,
        help="the mouth head's hidden width; 0 (default): linear, which followed new voices better when "
        "fitted on the clips alone (with --head-speech, 64 does better)",
    )
    parser.add_argument("--workers", type=int, default=2, help="data preparation processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work
    times = {}

    def done(step: str, started: float) -> bool:
        times[step] = round((time.time() - started) / 60, 1)
        logger.info("%s: %.1f min", step, times[step])
        return args.stop_after == step

    started = time.time()
    clips, photos = prepare_data(args.data, work, args.grid_every, args.workers)
    if done("data", started):
        return

    from .mouth import measure_clips, pretrain_audio_encoder

    started = time.time()
    measure_clips(clips)
    talking = []
    if args.talking_photos:
        from .talking_photos import make_talking_photos, write_openings

        talking = [work / "talking_photos"]
        if not (talking[0] / "DONE").is_file():
            manifest = make_talking_photos(photos, clips, talking[0], args.talking_photos)
            logger.info("talking photos: %d clips", manifest["num_clips"])
            (talking[0] / "DONE").touch()
        if written := write_openings(talking[0], clips):  # talking photos made before the openings were kept
            logger.info("talking photos: the added mouth opening of %d clips written", written)
    if done("mouth", started):
        return

    options = dict(
        mouth_weight=args.mouth_weight,
        motion_dropout=args.motion_dropout,
        learning_rate=args.learning_rate,
        seed=args.seed,
        batch_size=args.batch_size,
        loader_workers=args.loader_workers,
        mouth_drive_lr_scale=args.mouth_drive_lr_scale,
        mixed_precision=args.mixed_precision,
    )
    if args.continue_from is not None:
        continue_training(args, work, clips, photos, options, talking)
        return

    vae_dir = work / "init_vae"
    started = time.time()
    if (vae_dir / "vae" / "config.json").is_file():
        blocks = json.loads((vae_dir / "vae" / "config.json").read_text())["block_out_channels"]
        held = 2 ** (len(blocks) - 1)  # the VAE's downsampling, as EmoPipeline.vae_scale_factor
        if held != args.latent_scale:
            raise SystemExit(
                f"--work {work} holds a model whose VAE downsamples {held}x: give --latent-scale {held}, "
                f"or another --work for --latent-scale {args.latent_scale}"
            )
    if not (vae_dir / "model_index.json").is_file():
        torch.manual_seed(0)
        pipe = build_pipeline(small_config(args.latent_scale))
        switches = behaviour_switches(args)
        pipe.register_to_config(behaviour=replace(pipe.behaviour, **switches).to_config())
        mse = fit_vae(pipe.vae, [clips, photos], args.vae_steps)
        (work / "vae.json").write_text(
            json.dumps({"mse": mse, "scaling_factor": pipe.vae.config.scaling_factor})
        )
        pipe.save_pretrained(vae_dir)
    if done("vae", started):
        return

    init = work / "init"
    started = time.time()
    if not (init / "model_index.json").is_file():
        pipe = EmoPipeline.from_pretrained(vae_dir)
        heldout = {
            c.name
            for c in (clips / "videos").iterdir()
            if c.name.startswith("grid_s1") and hash_bucket(c.name) == 1
        }
        result = pretrain_audio_encoder(pipe, clips, args.audio_steps, heldout=heldout)
        (work / "audio_encoder.json").write_text(json.dumps(result))
        logger.info("audio encoder: r %.3f on training windows, %.3f on %d unseen GRID sentences",
                    result["train_r"], result["heldout_r"], len(heldout))  # fmt: skip
        pipe.save_pretrained(init)
    if done("audio", started):
        return

    previous = init
    stage1_steps = 1200 if args.stage1_steps is None else args.stage1_steps
    for stage, steps in ((1, stage1_steps), (2, args.stage2_steps), (3, args.stage3_steps)):
        started = time.time()
        roots = [clips, photos] if stage == 1 else [clips, *talking]
        stage_options = options_of_stage(args, stage, options)
        previous = run_stage(stage, work, roots, steps, previous, **stage_options)
        if done(f"stage{stage}", started):
            return

    started = time.time()
    decoder = refined_vae(work, vae_dir, [clips, photos], args.decoder_steps, args.decoder_mouth_weight)
    done("decoder", started)

    from diffusers import AutoencoderKL

    export(
        EmoPipeline.from_pretrained(previous, vae=AutoencoderKL.from_pretrained(decoder)), previous, args.out
    )


def export(pipe: EmoPipeline, stage_pipeline: Path, out: Path, config_from: Path | None = None) -> None:
    """Write the small model to `out` with its generation defaults and the training config of the last stage
    (`stage_pipeline`'s, else `config_from`'s: the continued model's when no stage ran)."""
    pipe.register_generation_defaults(**GENERATION_DEFAULTS)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    for folder in (stage_pipeline, config_from):
        if folder is not None and (folder / "training_config.yaml").is_file():
            shutil.copy(folder / "training_config.yaml", out / "training_config.yaml")
            break
    logger.info("small model -> %s", out)


def options_of_stage(args, stage: int, options: dict) -> dict:
    """The `stage_config` options of `stage`: stage 1 none (its own settings), stages 2-3 `options` and their
    --stage<n>-minutes."""
    if stage == 1:
        return {}
    return options | {"max_minutes": getattr(args, f"stage{stage}_minutes")}


def behaviour_switches(args) -> dict:
    """The pipeline switches (`pipeline.behaviour`) the command line turns on."""
    return {"mask_reference_mouth": True} if args.mask_reference_mouth else {}


def with_small_layout(source: Path, out: Path, switches: dict | None = None) -> Path:
    """`source` made to the current small layout, saved to `out` (done once): a reference-latent injection (as
    `SMALL`'s) added to its backbone, zero-initialised so that the model predicts what it did, and
    the behaviour `switches` turned on (those already on stay on); `source` itself when it has both."""
    switches = switches or {}
    from pipeline.models import EmoUNet3DModel

    def is_current(folder: Path) -> bool:
        index = json.loads((folder / "model_index.json").read_text())
        behaviour = Behaviour.from_config(index.get("behaviour"))
        return bool(
            EmoUNet3DModel.load_config(folder / "denoising_unet").get("reference_latent_channels")
        ) and (behaviour == replace(behaviour, **switches))

    if is_current(source):
        return source  # checked first: a later source that has it is never swapped for an older cached one
    if (out / "model_index.json").is_file() and is_current(out):
        return out
    pipe = EmoPipeline.from_pretrained(source)
    old = pipe.denoising_unet
    if not old.config.reference_latent_channels:
        channels = pipe.vae.config.latent_channels
        new = EmoUNet3DModel.from_config(old.config, reference_latent_channels=channels)
        result = new.load_state_dict(old.state_dict(), strict=False)
        if result.unexpected_keys or any(
            not k.startswith("reference_latent_in.") for k in result.missing_keys
        ):
            raise SystemExit(f"--continue-from {source}: its backbone's weights do not fit its own config")
        pipe.register_modules(denoising_unet=new)
        logger.info("added the reference-latent injection (%d channels) to %s", channels, source)
    pipe.register_to_config(behaviour=replace(pipe.behaviour, **switches).to_config())
    pipe.save_pretrained(out)
    logger.info("%s in the current small layout -> %s", source, out)
    return out


def with_mouth_drive(
    source: Path, out: Path, clips: Path, head_steps: int, head_hidden: int = 0, **fit_options
) -> Path:
    """`source` with a mouth drive, saved to `out` (done once; `source` itself when it has one): a mouth head on
    its audio projection, fitted to the opening measured on the real `clips` from the frozen audio encoder's
    features (`training.mouth.fit_mouth_head`, figures in `out/mouth_head.json`), and the backbone's
    zero-initialised `mouth_drive_in`, so the model starts out predicting exactly what it did. `head_hidden`: the
    head's hidden width, 0 for linear (`AudioProjection.mouth_head_hidden`). `fit_options`: those of
    `fit_mouth_head`."""
    from pipeline.models import AudioProjection, EmoUNet3DModel

    from .mouth import fit_mouth_head

    if EmoUNet3DModel.load_config(source / "denoising_unet").get("mouth_drive"):
        return source
    if (out / "model_index.json").is_file():
        return out
    pipe = EmoPipeline.from_pretrained(source)
    added = {"denoising_unet": {}, "audio_projection": {"mouth_head_hidden": head_hidden}}
    for name, cls in (("denoising_unet", EmoUNet3DModel), ("audio_projection", AudioProjection)):
        old = getattr(pipe, name)
        new = cls.from_config(old.config, mouth_drive=True, **added[name])
        result = new.load_state_dict(old.state_dict(), strict=False)
        if result.unexpected_keys or any(
            not k.startswith(("mouth_drive_in.", "mouth_head.")) for k in result.missing_keys
        ):
            raise SystemExit(f"{source}: its {name} weights do not fit its own config")
        pipe.register_modules(**{name: new})
    figures = fit_mouth_head(pipe, clips, head_steps, **fit_options)
    logger.info("mouth head: r %.3f on training windows, %.3f on held-out videos", figures["train_r"],
                figures["heldout_r"])  # fmt: skip
    pipe.save_pretrained(out)
    (out / "mouth_head.json").write_text(json.dumps(figures | {"steps": head_steps, "hidden": head_hidden}))
    return out


def with_posed_reference(
    source: Path,
    out: Path,
    clips: Path,
    head_steps: int,
    amplitude: float,
    head_hidden: int = 0,
    speech: int = 0,
    **fit_options,
) -> Path:
    """`source` with a posed reference (`behaviour.posed_reference` = `amplitude`), saved to `out` (done once;
    `source` itself when it has one): a mouth head of `head_hidden` width (0: linear) on its audio projection,
    fitted to the opening measured on the real `clips` scaled 0..1 per video and on `speech` espeak-ng sentences
    (`training.mouth.fit_posed_head`, figures in `out/mouth_head.json`; `fit_options`: those of
    `fit_mouth_head`); the backbone is unchanged, and learns to follow the pose in stages 2-3 (the dataset opens
    each reference by the target frame's measured mouth)."""
    from .mouth import fit_posed_head

    if EmoPipeline.load_config(source).get("behaviour", {}).get("posed_reference"):
        return source
    if (out / "model_index.json").is_file():
        return out
    pipe = EmoPipeline.from_pretrained(source)
    try:
        figures = fit_posed_head(pipe, clips, head_steps, head_hidden, speech, **fit_options)
    except ValueError as error:
        raise SystemExit(f"{source}: {error}") from None
    logger.info("mouth head (0..1): r %.3f on training windows, %.3f on held-out videos", figures["train_r"],
                figures["heldout_r"])  # fmt: skip
    pipe.register_to_config(behaviour=replace(pipe.behaviour, posed_reference=amplitude).to_config())
    pipe.save_pretrained(out)
    (out / "mouth_head.json").write_text(json.dumps(figures))
    return out


def continue_training(
    args, work: Path, clips: Path, photos: Path, options: dict, talking: list[Path] = ()
) -> None:
    """More training from a finished small model: stage 1 (`--stage1-steps`, default 0 here), stage 2, stage 3;
    its VAE (refined decoder) is kept. A model of an older layout is brought to the current one first
    (`with_small_layout`)."""
    source = args.continue_from.resolve()
    if not (source / "model_index.json").is_file():
        raise SystemExit(f"--continue-from {source}: not a model folder (no model_index.json)")
    if args.out.resolve() == source:
        raise SystemExit(
            f"--out {args.out} is the --continue-from model: write the new model to another folder"
        )
    previous = with_small_layout(source, work / "init_continued", behaviour_switches(args))
    if args.mouth_drive:
        previous = with_mouth_drive(
            previous, work / "init_mouth_drive", clips, args.mouth_head_steps, args.mouth_head_hidden
        )
    if args.posed_reference:
        previous = with_posed_reference(
            previous, work / "init_posed_reference", clips, args.mouth_head_steps, args.posed_reference,
            args.mouth_head_hidden, args.head_speech,
        )  # fmt: skip
    stages = ((1, args.stage1_steps or 0), (2, args.stage2_steps), (3, args.stage3_steps))
    for stage, steps in stages:
        if steps == 0:
            continue
        started = time.time()
        roots = [clips, photos] if stage == 1 else [clips, *talking]
        stage_options = options_of_stage(args, stage, options)
        previous = run_stage(
            stage, work, roots, steps, previous, name=f"stage{stage}_continued", **stage_options
        )
        logger.info("stage%d (continued): %.1f min", stage, (time.time() - started) / 60)
        if args.stop_after == f"stage{stage}":
            return
    # the export stage folders hold the source's VAE (training freezes it): the refined decoder stays
    vae = None
    if args.refine_decoder:
        from diffusers import AutoencoderKL

        started = time.time()
        folder = refined_vae(work, source, [clips, photos], args.decoder_steps, args.decoder_mouth_weight,
                             name="vae_decoder_continued")  # fmt: skip
        logger.info("decoder (continued): %.1f min", (time.time() - started) / 60)
        vae = AutoencoderKL.from_pretrained(folder)
    pipe = EmoPipeline.from_pretrained(previous, **({"vae": vae} if vae is not None else {}))
    export(pipe, previous, args.out, config_from=source)


if __name__ == "__main__":
    main()

"""One trainer for EMO's three stages; the stage, what trains and the optimisation come from a config file.

    python -m training.train --config training/configs/stage1.yaml [--resume latest] [--max-steps N]
        [--output-dir DIR] [--set train.batch_size=8 ...]
    accelerate launch --config_file training/configs/accelerate_multi_gpu.yaml -m training.train --config ...

A step (v-prediction on DDPM noise of the pipeline's zero-terminal-SNR schedule):
1. frames -> VAE latents (posterior mode, frozen VAE); reference image and the n motion frames -> ReferenceNet
   in one pass -> reference tokens (backbone reference-attention) and motion features (temporal modules);
2. condition dropout: per sample, reference tokens / audio tokens / motion features are replaced by zeros,
   the null conditions the pipeline uses (first clip, classifier-free guidance); probabilities in the config;
3. audio features (with m frames of context each side) -> audio projection -> the f frames' tokens;
   stage 3 also head speeds -> speed encoder; face mask -> face locator;
4. backbone on the noisy latents of the f target frames -> MSE to the velocity target.

Converted Hallo models (`pipeline.hallo`) run through the same step, with what their configs ask for:
identity tokens (the projected face embedding of the sample's video, or of zeros when the data has none),
ReferenceNet tokens joined to self-attention ("concat": a sample whose reference is dropped runs plain
self-attention with the null identity, as the pipeline's unconditional branch), motion frames read from the
ReferenceNet's attention tokens, region masks (full/face/lip) for the audio modules made from the face and
mouth boxes, audio features computed Hallo's way. Stage 3 on a model without speed layers adds them
(`add_speed_layers`: zero output, so training starts from the model's own prediction).

All networks that the step runs are members of ONE `nn.Module` (`EmoTrainingModel`, as DeepSpeed needs);
frozen ones keep `requires_grad=False`. Checkpoints (`accelerator.save_state` + the trainer's own state:
step, epoch, batch position, noise RNG) are written under a temporary name and renamed, so a crash while
writing leaves the previous one intact; `--resume latest` continues with the same data order, noise,
optimiser and scheduler state, so a killed-and-resumed run ends with the weights of an uninterrupted one.
The stage ends by exporting an EmoPipeline folder to `output_dir/pipeline` (the next stage's `init.pipeline`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline import EmoPipeline, EmoUNet3DModel, SpeedEncoder, build_pipeline, load_motion_module
from pipeline.models.backbone import hide_mouth, mouth_drive_map

from .config import Config, load_config, parameter_matcher
from .data import EmoDataset, EpochSampler, read_clips

logger = logging.getLogger("training.train")

COMPONENTS = (
    "reference_net",
    "denoising_unet",
    "face_locator",
    "audio_projection",
    "speed_encoder",
    "identity_projection",  # None in EMO-native models
)
SPEED_LAYER = (".attn_speed.", ".norm_speed.")  # parameter names of the speed layers in the backbone
CHECKPOINT_PREFIX = "checkpoint-"


# ------------------------------------------------------------------------------------------------ model
class EmoTrainingModel(nn.Module):
    """The networks of a training step, as one module: (latents, conditions) -> the backbone's prediction.

    The null conditions follow the pipeline's behaviour (`pipeline.behaviour`): a dropped motion condition
    is zero features, or (first_motion_frames "reference", Hallo) the reference image as motion frames;
    under joint guidance (Hallo) a dropped reference also drops the face-locator features.
    """

    def __init__(self, pipe: EmoPipeline):
        super().__init__()
        for name in COMPONENTS:
            setattr(self, name, getattr(pipe, name))
        behaviour = pipe.behaviour
        self.null_motion_is_reference = behaviour.first_motion_frames == "reference"
        self.joint_guidance = behaviour.guidance == "joint"
        self.mask_reference_mouth = behaviour.mask_reference_mouth

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        reference_latents: torch.Tensor,
        motion_latents: torch.Tensor | None,
        face_mask: torch.Tensor,
        audio_features: torch.Tensor | None,
        speeds: torch.Tensor | None,
        keep: dict[str, torch.Tensor],
        face_embedding: torch.Tensor | None = None,
        region_masks: dict[tuple[int, int], torch.Tensor] | None = None,
        reference_mouth_mask: torch.Tensor | None = None,
        mouth_mask: torch.Tensor | None = None,
        posed_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noisy: (b, 4, f, h, w); reference_latents (b, 4, h, w); motion_latents (b, n, 4, h, w) or None;
        face_mask (b, 1, H, W); audio_features (b, f + 2m, layers, dim) or None; speeds (b, f + 2m) deg/frame
        or None; keep: per-sample 1/0 (b,) for "reference", "audio", "motion".
        Models with identity tokens: face_embedding (b, 512) or None (the null identity, a zero embedding);
        models with region audio modules: region_masks {(h, w): (b, h*w, 3)} at every level;
        models with `behaviour.mask_reference_mouth`: reference_mouth_mask (b, 1, H, W), the reference's mouth;
        models with a mouth drive: mouth_mask (b, 1, H, W), the clip's mouth region, where the frozen mouth head's
        opening is drawn (zeros without audio: stage 1 and dropped audio, as in guidance);
        models with `behaviour.posed_reference`: posed_latents (b, 4, f, h, w), the reference with each frame's mouth
        opening, injected in place of the still reference (ReferenceNet keeps the still one).
        Returns the prediction (b, 4, f, h, w)."""
        b = noisy.shape[0]
        unet = self.denoising_unet
        concat = unet.config.reference_attention == "concat"
        # 0. Identity tokens (b, k, d): a sample without reference gets the null identity, as in guidance
        identity = None
        if self.identity_projection is not None:
            if face_embedding is None:
                face_embedding = reference_latents.new_zeros(b, self.identity_projection.config.embedding_dim)
            identity = self.identity_projection(face_embedding * _expand(keep["reference"], face_embedding))
        # 1. ReferenceNet once for the reference and the motion frames
        if motion_latents is not None and self.null_motion_is_reference:
            dropped = _expand(keep["motion"], motion_latents) == 0
            motion_latents = torch.where(dropped, reference_latents[:, None], motion_latents)
        inputs = (
            reference_latents
            if motion_latents is None
            else torch.cat([reference_latents, motion_latents.flatten(0, 1)])
        )
        if identity is None:
            out = self.reference_net(inputs)
        else:  # rows: the b references, then each sample's n motion frames with that sample's identity
            n = 0 if motion_latents is None else motion_latents.shape[1]
            out = self.reference_net(
                inputs, identity_tokens=torch.cat([identity, identity.repeat_interleave(n, dim=0)])
            )
        backbone_inputs = {}
        if concat:  # only the samples that keep their reference attend to its tokens
            used = [bool(k) for k in keep["reference"].tolist()]
            rows = [i for i, use in enumerate(used) if use]
            reference_tokens = {k: v[:b][rows] for k, v in out.reference_tokens.items()} if rows else None
            backbone_inputs["reference_used"] = used
        else:
            reference_tokens = {
                k: v[:b] * _expand(keep["reference"], v) for k, v in out.reference_tokens.items()
            }
        motion_features = None
        if motion_latents is not None:
            n = motion_latents.shape[1]
            from_attention = unet.config.motion_frame_features == "attention"
            source = out.reference_tokens if from_attention else out.motion_features  # (b + b n, ...)
            motion_features = {}
            for k, v in source.items():
                rows_of_motion = v[b:].unflatten(0, (b, n))
                motion_features[k] = (
                    rows_of_motion
                    if self.null_motion_is_reference
                    else rows_of_motion * _expand(keep["motion"], rows_of_motion)
                )
        # 2. Audio tokens of the f frames (the projection's m-frame windows see the context frames)
        audio_tokens = None
        if audio_features is not None:
            m = self.audio_projection.config.window
            tokens = self.audio_projection(audio_features)
            audio_tokens = tokens[:, m : tokens.shape[1] - m] * _expand(keep["audio"], tokens)
        speed_tokens = None
        if speeds is not None:
            m = self.speed_encoder.config.window
            speed_tokens = self.speed_encoder(speeds)
            speed_tokens = speed_tokens[:, m : speed_tokens.shape[1] - m]
        face_features = self.face_locator(face_mask)
        if self.joint_guidance:  # the joint unconditional branch has no face-locator features either
            face_features = face_features * _expand(keep["reference"], face_features)
        if identity is not None:
            backbone_inputs["identity_tokens"] = identity
        if region_masks is not None:
            backbone_inputs["region_masks"] = region_masks
        if unet.config.reference_latent_channels:  # zeros for a dropped reference, as in guidance
            injected = reference_latents if posed_latents is None else posed_latents
            if self.mask_reference_mouth:  # the portrait's mouth hidden, as the pipeline hides it
                if reference_mouth_mask is None:
                    raise ValueError("this model hides the reference's mouth: give `reference_mouth_mask`")
                injected = hide_mouth(reference_latents, reference_mouth_mask)
            backbone_inputs["reference_latents"] = injected * _expand(keep["reference"], injected)
        if unet.config.mouth_drive:
            f, latent_size = noisy.shape[2], tuple(noisy.shape[-2:])
            if audio_features is None:
                opening = noisy.new_zeros(b, f)
            else:
                m = self.audio_projection.config.window
                opening = self.audio_projection.mouth_opening(audio_features)[
                    :, m : audio_features.shape[1] - m
                ]
                opening = opening * _expand(keep["audio"], opening)
            if mouth_mask is None:
                raise ValueError("this model has a mouth drive: give `mouth_mask`")
            backbone_inputs["mouth_drive"] = mouth_drive_map(opening, mouth_mask, latent_size)
        # 3. Backbone
        return unet(
            noisy,
            timesteps,
            reference_tokens=reference_tokens,
            motion_features=motion_features,
            audio_tokens=audio_tokens,
            speed_tokens=speed_tokens,
            face_features=face_features,
            **backbone_inputs,
        ).sample


def _expand(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) -> (b, 1, ...) broadcastable to `like`, in its dtype."""
    return keep.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class TrainState:
    """What the trainer adds to `accelerator.save_state`: progress, data position and the noise RNG."""

    def __init__(self, seed: int):
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batches_in_epoch = (
            state["step"],
            state["epoch"],
            state["batches_in_epoch"],
        )
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------------------------------------ setup
def load_initial_pipeline(config: Config) -> EmoPipeline:
    """The stage's starting pipeline: a folder (previous stage), base models (SD 1.5...) or a size config."""
    init = config.init
    if init.pipeline is not None:
        pipe = EmoPipeline.from_pretrained(init.pipeline)
    elif init.base_models is not None:
        pipe = EmoPipeline.from_base_models(**init.base_models)
    else:
        pipe = build_pipeline(init.model)
    if init.motion_module is not None:
        report = load_motion_module(pipe.denoising_unet, init.motion_module)
        logger.info("motion module: %d tensors loaded", len(report.loaded.get("denoising_unet", [])))
    return pipe


def add_speed_layers(pipe: EmoPipeline) -> list[str]:
    """Give a pipeline without speed layers (a converted Hallo model) EMO's: a backbone of the same config
    plus `speed_dim`, holding the old weights, and a fresh `SpeedEncoder`. Returns the added backbone
    parameter names.

    speed_dim: the backbone's own if it has one, else the speed encoder's output size if there is an encoder,
    else EMO's default (`EmoUNet3DModel`'s). The speed cross-attention's output projection starts at zero
    (as in EMO-native models), so the new backbone predicts exactly what the old one did.
    """
    old = pipe.denoising_unet
    speed_dim = old.config.speed_dim
    if speed_dim is None:
        speed_dim = (
            pipe.speed_encoder.config.output_dim
            if pipe.speed_encoder is not None
            else inspect.signature(EmoUNet3DModel.__init__).parameters["speed_dim"].default
        )
    added: list[str] = []
    if old.config.speed_dim is None:
        new = EmoUNet3DModel.from_config(old.config, speed_dim=speed_dim)
        result = new.load_state_dict(old.state_dict(), strict=False)
        wrong = [k for k in result.missing_keys if not any(part in k for part in SPEED_LAYER)]
        if wrong or result.unexpected_keys:
            raise RuntimeError(
                f"adding speed layers: the old backbone's weights do not fit the new one (missing {wrong[:5]}, "
                f"unexpected {result.unexpected_keys[:5]})"
            )
        added = list(result.missing_keys)
        nn.Module.to(new, device=old.device, dtype=old.dtype)  # nn.Module's: no diffusers cast warning
        pipe.register_modules(denoising_unet=new)
        logger.info(
            "stage 3: the backbone had no speed layers; added %d tensors (%.3fM parameters) of speed "
            "cross-attention (speed_dim %d) to its temporal modules, zero output at the start",
            len(added),
            sum(new.state_dict()[k].numel() for k in added) / 1e6,
            speed_dim,
        )
    if pipe.speed_encoder is None:
        encoder = nn.Module.to(SpeedEncoder(output_dim=speed_dim), device=old.device, dtype=old.dtype)
        pipe.register_modules(speed_encoder=encoder)
        logger.info(
            "stage 3: added a SpeedEncoder (%.3fM parameters, %d buckets, window %d)",
            sum(p.numel() for p in encoder.parameters()) / 1e6,
            len(encoder.config.centers),
            encoder.config.window,
        )
    return added


def select_trainable(model: EmoTrainingModel, entries: list[str]) -> list[nn.Parameter]:
    """Set requires_grad by the config's patterns; return the trainable parameters (in a fixed order)."""
    matches = parameter_matcher(entries)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(matches(name))
        if param.requires_grad:
            params.append(param)
    if not params:
        raise ValueError(f"train.trainable {entries} matches no parameter")
    return params


def video_audio_features(pipe: EmoPipeline, waveform: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """A whole video's 16 kHz waveform -> (num_frames, layers + 1, hidden) float32 features, all hidden
    states, computed as the pipeline computes them for this model (`behaviour.audio_features`): EMO's
    resampled wav2vec2 states, or Hallo's (CNN features at the frame rate before the transformer)."""
    from pipeline.audio_features import hallo_frame_features

    from .prepare import audio_frame_features

    if pipe.behaviour.audio_features == "hallo":
        layers = pipe.audio_encoder.config.num_hidden_layers + 1
        features = hallo_frame_features(
            pipe.audio_encoder, pipe.feature_extractor, waveform, num_frames, num_frames, fps, layers
        )
        return features.cpu().numpy()
    return audio_frame_features(waveform, num_frames, fps, pipe.audio_encoder, pipe.feature_extractor)


def compute_audio_features(pipe: EmoPipeline, data_root: str, out_dir: Path, fps: float) -> None:
    """Audio features of every prepared video with the pipeline's own encoder, the pipeline's way
    (`video_audio_features`) -> out_dir/<video>.npy."""
    from pipeline.audio import load_audio

    out_dir.mkdir(parents=True, exist_ok=True)
    for video in sorted({c.video for c in read_clips(data_root)}):
        target = out_dir / f"{video}.npy"
        if target.is_file():
            continue
        folder = Path(data_root) / "videos" / video
        meta = json.loads((folder / "meta.json").read_text())
        waveform = load_audio(folder / meta["audio"]["file"], sampling_rate=16_000, mono=True).mono
        features = video_audio_features(pipe, waveform, meta["num_frames"], fps)
        np.save(out_dir / f".{video}.tmp.npy", features)
        os.replace(out_dir / f".{video}.tmp.npy", target)


def make_dataset(config: Config, pipe: EmoPipeline, audio_features_dir: Path | None) -> EmoDataset:
    data = config.data
    if config.stage > 1 and audio_features_dir is None and pipe.behaviour.audio_features != "emo":
        raise ValueError(
            f"this model computes its audio features its own way (behaviour.audio_features="
            f"{pipe.behaviour.audio_features!r}), not as `prepare --wav2vec` caches them: "
            "set data.audio_features: compute"
        )
    dataset = EmoDataset(
        data.root,
        data.resolution,
        num_frames=data.num_frames,
        num_motion_frames=data.num_motion_frames,
        with_audio=config.stage > 1,
        audio_layers=pipe.audio_projection.config.num_layers,
        audio_margin=pipe.audio_projection.config.window,
        speed_margin=pipe.speed_encoder.config.window if pipe.speed_encoder is not None else 0,
        mask_expand=data.mask_expand,
        samples_per_clip=data.samples_per_clip,
        audio_features_dir=audio_features_dir,
        seed=config.train.seed,
        posed_reference=bool(pipe.behaviour.posed_reference) and config.stage > 1,
    )
    if pipe.identity_projection is not None and not dataset.has_face_embeddings:
        logger.warning(
            "the model has identity tokens but the data has no face embeddings: every sample gets the null "
            "identity (a zero embedding); run `python -m training.face_embeddings` for per-video identities"
        )
    return dataset


def make_optimizer(
    config: Config, params: list[nn.Parameter], pipe: EmoPipeline | None = None
) -> torch.optim.Optimizer:
    """AdamW (8-bit with `use_8bit_adam`) over `params`; the backbone's mouth-drive conv of `pipe`, when it
    trains, at `mouth_drive_lr_scale` times the learning rate (a new zero-initialised path learns slowly)."""
    t = config.train
    kwargs = dict(
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    groups = params
    drive = getattr(pipe.denoising_unet, "mouth_drive_in", None) if pipe is not None else None
    if drive is not None and t.mouth_drive_lr_scale != 1:
        fast_ids = {id(p) for p in drive.parameters()}
        fast = [p for p in params if id(p) in fast_ids]
        if fast:
            rest = [p for p in params if id(p) not in fast_ids]
            groups = [{"params": rest}, {"params": fast, "lr": t.learning_rate * t.mouth_drive_lr_scale}]
    if t.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


# ------------------------------------------------------------------------------------------------ one step
def training_loss(
    model: nn.Module,
    pipe: EmoPipeline,
    noise_scheduler,
    batch: dict[str, torch.Tensor],
    config: Config,
    generator: torch.Generator,
    accelerator,
) -> torch.Tensor:
    """The v-prediction MSE of one batch; noise, timesteps and condition dropout drawn from `generator`."""
    n = config.data.num_motion_frames
    pixels = batch["pixel_values"]  # (b, n + f, 3, H, W)
    b = pixels.shape[0]
    with torch.no_grad(), accelerator.autocast():
        latents = pipe.encode_image(torch.cat([pixels.flatten(0, 1), batch["reference"]])).float()
    reference_latents = latents[-b:]
    latents = latents[:-b].unflatten(0, (b, n + config.data.num_frames))  # (b, n + f, 4, h, w)
    motion_latents = latents[:, :n] if config.stage > 1 else None
    target_latents = latents[:, n:].permute(0, 2, 1, 3, 4)  # (b, 4, f, h, w)

    # one random stream for the global batch (identical on every process), each process takes its rows
    world, rows = (
        accelerator.num_processes,
        slice(accelerator.process_index * b, (accelerator.process_index + 1) * b),
    )
    device = target_latents.device
    noise = torch.randn((world * b, *target_latents.shape[1:]), generator=generator)[rows].to(device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (world * b,), generator=generator
    )
    timesteps = timesteps[rows].to(device)
    noisy = noise_scheduler.add_noise(target_latents, noise, timesteps)
    target = noise_scheduler.get_velocity(target_latents, noise, timesteps)
    drop = config.train.condition_dropout
    keep = {
        name: (torch.rand(world * b, generator=generator)[rows] >= p).float().to(device)
        for name, p in (("reference", drop.reference), ("audio", drop.audio), ("motion", drop.motion))
    }

    conditions = {}
    if pipe.identity_projection is not None and "face_embedding" in batch:
        conditions["face_embedding"] = batch["face_embedding"].to(device)
    if pipe.has_region_audio:
        sizes = pipe.denoising_unet.token_grids(tuple(target_latents.shape[-2:]))
        masks = region_masks(batch["face_mask"], batch["mouth_mask"], sizes)
        conditions["region_masks"] = {size: mask.to(device) for size, mask in masks.items()}
    if pipe.behaviour.mask_reference_mouth:
        conditions["reference_mouth_mask"] = batch["reference_mouth_mask"].to(device)
    if pipe.denoising_unet.config.mouth_drive:
        conditions["mouth_mask"] = batch["mouth_mask"].to(device)
    if "posed_reference" in batch:  # (b, f, 3, H, W) -> (b, 4, f, h, w)
        posed = batch["posed_reference"]
        with torch.no_grad(), accelerator.autocast():
            posed_latents = pipe.encode_image(posed.flatten(0, 1)).float()
        conditions["posed_latents"] = posed_latents.unflatten(0, posed.shape[:2]).permute(0, 2, 1, 3, 4)
    pred = model(
        noisy,
        timesteps,
        reference_latents,
        motion_latents,
        batch["face_mask"],
        batch.get("audio_features") if config.stage > 1 else None,
        batch.get("speeds") if config.stage == 3 else None,
        keep,
        **conditions,
    )
    error = (pred.float() - target.float()) ** 2
    if config.train.mouth_weight and "mouth_mask" in batch:
        # the mouth region at latent size (area pooling), the same for every frame of the clip
        mouth = F.adaptive_avg_pool2d(batch["mouth_mask"].float(), error.shape[-2:]).to(error.device)
        weight = 1.0 + config.train.mouth_weight * mouth[:, :, None]  # (b, 1, 1, h, w)
        return (error * weight).mean() / weight.mean()
    return error.mean()


def region_masks(
    face_mask: torch.Tensor, mouth_mask: torch.Tensor, sizes: list[tuple[int, int]]
) -> dict[tuple[int, int], torch.Tensor]:
    """Region weights of the audio modules (Hallo) from a batch's face and mouth boxes.

    face_mask, mouth_mask: (b, 1, H, W) of 0/1 (the dataset's). Each box is made soft as Hallo's inference
    makes its landmark boxes (`pipeline.regions.blur_region`: 64 x 64, Gaussian blur, min-max stretch), then
    full = 1 - face, face = face - lip (clipped at 0), lip = the mouth (`split_regions`), and each is resized
    to every level (`level_masks`). Returns {(h, w): (b, h*w, 3)} float32, last axis full/face/lip.
    """
    from pipeline.regions import FACE_BLUR_KERNEL, LIP_BLUR_KERNEL, blur_region, level_masks, split_regions

    per_sample = []
    for face, mouth in zip(face_mask[:, 0].cpu().numpy(), mouth_mask[:, 0].cpu().numpy(), strict=True):
        soft_face = blur_region((face > 0.5).astype(np.uint8) * 255, FACE_BLUR_KERNEL)
        soft_lip = blur_region((mouth > 0.5).astype(np.uint8) * 255, LIP_BLUR_KERNEL)
        full, face_only, lip = split_regions(soft_face, soft_lip)
        per_sample.append(level_masks({"full": full, "face": face_only, "lip": lip}, sizes))
    return {size: torch.cat([levels[size] for levels in per_sample]) for size in sizes}


# ------------------------------------------------------------------------------------------------ checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    found = [
        p
        for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """`latest` -> the newest checkpoint of output_dir (None if there is none); a path -> that path."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """save_state into `.checkpoint-N.tmp`, rename it to `checkpoint-N`, delete all but the newest `keep`."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ outputs
def write_video(path: Path, frames: np.ndarray, fps: float, audio: np.ndarray, sampling_rate: int) -> Path:
    """(f, H, W, 3) float frames in [0, 1] + mono audio -> an H.264/AAC mp4 (imageio-ffmpeg)."""
    import tempfile

    import imageio_ffmpeg

    from pipeline.audio import write_wav

    with tempfile.TemporaryDirectory() as tmp:
        wav = write_wav(Path(tmp) / "audio.wav", audio, sampling_rate)
        height, width = frames.shape[1:3]
        writer = imageio_ffmpeg.write_frames(
            str(path), (width, height), fps=fps, macro_block_size=8, audio_path=str(wav), audio_codec="aac"
        )
        writer.send(None)
        for frame in (np.clip(frames, 0, 1) * 255).round().astype(np.uint8):
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path


@torch.no_grad()
def run_validation(pipe: EmoPipeline, config: Config, step: int, accelerator) -> Path:
    """Generate the validation video (fixed portrait, audio, seed) -> output_dir/validation/step-N.mp4."""
    from PIL import Image

    from pipeline.audio import load_audio

    v = config.validation
    audio = load_audio(v.audio, sampling_rate=16_000, mono=True).mono[: int(v.max_seconds * 16_000)]
    resolution = config.data.resolution
    image = Image.open(v.image).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    pipe.set_progress_bar_config(disable=True)
    clip_length = max(config.data.num_frames, 1) if config.stage > 1 else 12
    identity = {}
    if pipe.identity_projection is not None:  # no embedding given: the null identity, not insightface
        dim = pipe.identity_projection.config.embedding_dim
        identity["face_embedding"] = (
            np.load(v.face_embedding).astype(np.float32).reshape(-1)
            if v.face_embedding
            else np.zeros(dim, np.float32)
        )
    output = pipe(
        image,
        audio,
        sampling_rate=16_000,
        **identity,
        head_speed=v.head_speed,
        num_inference_steps=v.num_inference_steps,
        guidance_scale=v.guidance_scale,
        height=resolution,
        width=resolution,
        clip_length=clip_length,
        num_motion_frames=min(config.data.num_motion_frames or 4, clip_length),
        generator=torch.Generator().manual_seed(v.seed),
        output_type="np",
    )
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = write_video(
        folder / f"step-{step:07d}.mp4", output.frames, output.fps, output.audio, output.sampling_rate
    )
    tracker = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.trackers else None
    if tracker is not None:
        shown = output.frames[:: max(1, len(output.frames) // 8)][:8]
        tracker.add_images("validation", np.ascontiguousarray(shown), step, dataformats="NHWC")
    return path


def export_pipeline(pipe: EmoPipeline, config: Config) -> Path:
    """Save the trained pipeline to output_dir/pipeline (written aside, then renamed) with the config."""
    out = Path(config.output_dir)
    final, tmp = out / "pipeline", out / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "training_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ------------------------------------------------------------------------------------------------ loop
def build_training_model(config: Config, device) -> tuple[EmoPipeline, EmoTrainingModel, list[nn.Parameter]]:
    """The stage's initial pipeline on `device`, its trainable wrapper and the parameters that train."""
    pipe = load_initial_pipeline(config)
    if config.stage == 3 and not pipe.has_speed_layers:
        add_speed_layers(pipe)
    for name, component in pipe.components.items():  # e.g. a Hallo model converted in fp16
        if isinstance(component, nn.Module) and any(p.dtype != torch.float32 for p in component.parameters()):
            logger.info("%s: weights cast to float32 for training", name)
            nn.Module.to(component, torch.float32)
    pipe.vae.requires_grad_(False)
    pipe.audio_encoder.requires_grad_(False)
    pipe.to(device)
    model = EmoTrainingModel(pipe)
    params = select_trainable(model, config.train.trainable)
    if config.train.gradient_checkpointing:
        pipe.reference_net.enable_gradient_checkpointing()
        pipe.denoising_unet.enable_gradient_checkpointing()
    return pipe, model, params


def train(config: Config, resume: str | None = None) -> dict:
    """Run (or continue) a stage -> {"step", "loss" (last logged), "export" (folder or None)}."""
    from accelerate import Accelerator, skip_first_batches
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    t = config.train
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(t.seed)  # model initialisation (random weights, new layers)

    # 1. Model: init, trainable selection, gradient checkpointing
    pipe, model, params = build_training_model(config, accelerator.device)
    logger.info(
        "stage %d: %.2fM of %.2fM parameters train",
        config.stage,
        sum(p.numel() for p in params) / 1e6,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )

    # 2. Data (audio features computed once with this model's encoder if asked)
    audio_dir = None
    if config.stage > 1 and config.data.audio_features == "compute":
        audio_dir = output_dir / "audio_features"
        if accelerator.is_main_process:
            roots = config.data.root if isinstance(config.data.root, list) else [config.data.root]
            for root in roots:
                fps = json.loads((Path(root) / "manifest.json").read_text())["options"]["fps"]
                compute_audio_features(pipe, root, audio_dir, fps)
        accelerator.wait_for_everyone()
    dataset = make_dataset(config, pipe, audio_dir)
    sampler = EpochSampler(len(dataset), t.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(t.seed),
    )
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} samples is less than one batch of {t.batch_size}")

    # 3. Optimiser, schedule, EMA, state; accelerate wraps them
    optimizer = make_optimizer(config, params, pipe)
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    state = TrainState(t.seed)
    accelerator.register_for_checkpointing(state)
    ema = EMAModel(params, decay=t.ema_decay) if t.ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    checkpoint = resolve_resume(output_dir, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.init_trackers(f"emo_stage{config.stage}", config=_flat(config.to_dict()))

    # 4. Loop
    progress = tqdm(
        total=t.max_steps,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc=f"stage {config.stage}",
        unit="step",
    )
    last_loss = math.nan
    losses: list[float] = []
    tick, samples = time.perf_counter(), 0
    deadline = time.perf_counter() + 60 * t.max_minutes if t.max_minutes > 0 else math.inf
    out_of_time = False
    model.train()
    while state.step < t.max_steps and not out_of_time:
        sampler.start_epoch(state.epoch)
        epoch_loader = loader
        if state.batches_in_epoch:
            epoch_loader = skip_first_batches(loader, state.batches_in_epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss = training_loss(
                    model, pipe, noise_scheduler, batch, config, state.generator, accelerator
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            losses.append(loss.detach().item())
            samples += batch["pixel_values"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.step(params)
            last_loss = float(np.mean(losses))
            losses.clear()
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}")
            if state.step % config.log_every == 0 or state.step == t.max_steps:
                elapsed = time.perf_counter() - tick
                accelerator.log(
                    {
                        "loss": last_loss,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "samples_per_second": samples / max(elapsed, 1e-9),
                    },
                    step=state.step,
                )
                tick, samples = time.perf_counter(), 0
            out_of_time = time.perf_counter() >= deadline
            if t.max_minutes > 0 and accelerator.num_processes > 1:  # every process stops at the same step
                flag = torch.tensor(float(out_of_time), device=accelerator.device)
                out_of_time = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if out_of_time:
                logger.info(
                    "stage %d: max_minutes %.1f reached at step %d", config.stage, t.max_minutes, state.step
                )
            if state.step % config.checkpointing.every == 0 or state.step == t.max_steps or out_of_time:
                save_checkpoint(accelerator, output_dir, state.step, config.checkpointing.keep)
            if (
                config.validation.every
                and state.step % config.validation.every == 0
                and accelerator.is_main_process
            ):
                with _ema_weights(ema, params):
                    run_validation(pipe, config, state.step, accelerator)
            if state.step >= t.max_steps or out_of_time:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    # 5. Export the pipeline (EMA weights if used)
    accelerator.wait_for_everyone()
    export = None
    if accelerator.is_main_process:
        with _ema_weights(ema, params):
            export = export_pipeline(pipe, config)
        logger.info("exported %s", export)
    accelerator.end_training()
    return {"step": state.step, "loss": last_loss, "export": export}


class _ema_weights:
    """Context: the EMA weights in the trainable parameters (no-op without EMA), the training ones after."""

    def __init__(self, ema, params: list[nn.Parameter]):
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested config -> flat {"a.b": scalar} for TensorBoard's hparams (lists and None as strings)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns `train`'s result (step, last loss, export folder)."""
    parser = argparse.ArgumentParser(prog="python -m training.train", description="Train one EMO stage.")
    parser.add_argument("--config", required=True, help="stage YAML (training/configs/stage{1,2,3}.yaml)")
    parser.add_argument(
        "--resume", default=None, help="'latest' (newest checkpoint in output_dir) or a folder"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--output-dir", default=None, help="override output_dir")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.batch_size=8 (value read as YAML)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    result = train(load_config(args.config, overrides), resume=args.resume)
    logger.info(
        "stage done at step %d, loss %.4f, pipeline: %s", result["step"], result["loss"], result["export"]
    )
    return result


if __name__ == "__main__":
    main()

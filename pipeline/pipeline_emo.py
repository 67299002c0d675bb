"""EmoPipeline: a portrait and a vocal audio -> a talking or singing video (EMO, arXiv 2402.17485).

`__call__` reads top to bottom: check inputs -> audio features for the whole audio (once) -> speed
embeddings (once) -> reference image through VAE and ReferenceNet (once) and face-locator features ->
clip by clip: motion-frame features through ReferenceNet (once per clip), the DDIM denoising loop with
classifier-free guidance batched into one backbone pass, VAE decode -> output.

The same pipeline runs Hallo's network (converted by `pipeline.hallo`): identity tokens from a face
embedding (`identity_projection`), region masks for its audio modules, and the pipeline-level switches of
`pipeline.behaviour.Behaviour` saved in the model folder.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .audio_features import SAMPLING_RATE, hallo_frame_features, wav2vec_frame_features
from .behaviour import Behaviour
from .levels import Levels
from .models import (
    AudioProjection,
    EmoUNet3DModel,
    FaceLocator,
    IdentityProjection,
    MelAudioEncoder,
    ReferenceNet,
    SpeedEncoder,
)
from .models.attention import context_cache
from .models.backbone import hide_mouth, mouth_drive_map
from .presets import get_preset, make_scheduler

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "none")
# EMO's settings (paper and open peers); a model folder overrides them with its `generation_defaults`.
EMO_GENERATION_DEFAULTS = {
    "num_inference_steps": 40,
    "guidance_scale": 3.5,
    "reference_guidance_scale": 1.0,
    "fps": 25,
    "clip_length": 12,
    "num_motion_frames": 4,
    "head_speed": 1.0,
    "preset": None,  # a `pipeline.presets` name: sampler, steps and guided steps; None: the model's scheduler
}
GENERATION_DEFAULT_KEYS = tuple(EMO_GENERATION_DEFAULTS)


def resolve_settings(model_defaults: dict | None, **arguments) -> dict:
    """Generation settings: the arguments that are not None > a model's `generation_defaults` > EMO's.

    A preset in effect sets the number of steps unless `num_inference_steps` is given, with one exception: a
    model whose defaults name both a preset and a number of steps runs its preset at its own number (a small
    model tuned, say, to 8 steps of `fast`) as long as the caller names no preset."""
    model_defaults = model_defaults or {}
    given = {k: v for k, v in arguments.items() if v is not None}
    settings = {**EMO_GENERATION_DEFAULTS, **model_defaults, **given}
    model_steps = (
        "preset" not in given and "preset" in model_defaults and "num_inference_steps" in model_defaults
    )
    if settings["preset"] is not None and "num_inference_steps" not in given and not model_steps:
        settings["num_inference_steps"] = get_preset(settings["preset"]).num_inference_steps
    return settings


@dataclass
class ClipConditions:
    """Everything the backbone reads for one clip, before the guidance branches are formed."""

    # ReferenceNet tokens of the reference, key -> (1, s, c); with `reference_frames_alternate` (2, s, c): the
    # rows made with the null and with the conditional identity tokens
    reference: dict[str, torch.Tensor]
    motion: dict[str, torch.Tensor] | None  # motion-frame features, key -> (1, n, ...)
    motion_null: (
        dict[str, torch.Tensor] | None
    )  # the unconditional branch's own (Hallo's interleave), or None
    audio: torch.Tensor  # (1, f, k, d)
    speed: torch.Tensor | None  # (1, f, d)
    face: torch.Tensor  # (1, c, h, w) face-locator features
    identity: tuple[torch.Tensor, torch.Tensor] | None  # (null, conditional) identity tokens, (1, k, d) each
    region_masks: dict[tuple[int, int], torch.Tensor] | None  # (h, w) -> (1, h*w, 3)
    region_weights: tuple[float, float, float]
    # (1, c, h, w) the reference's latents for a backbone with `reference_latent_channels`, else None; with
    # `behaviour.posed_reference` (1, c, f, h, w), one per frame
    reference_latents: torch.Tensor | None = None
    # `behaviour.posed_reference`: (1, c, 1, h, w) the portrait with its mouth closed, the pose of a branch without
    # audio (the pose is drawn from the voice: audio guidance then also pushes the mouth to the voice's pose)
    closed_reference_latents: torch.Tensor | None = None
    # (1, f, h, w) the clip's mouth-opening maps for a backbone with `mouth_drive`, else None
    mouth_drive: torch.Tensor | None = None


@dataclass
class EmoPipelineOutput(BaseOutput):
    """frames: list of PIL images | (f, H, W, 3) float array in [0, 1] | (f, 3, H, W) tensor | None ("none").

    audio: the 16 kHz mono waveform the video was made from (float32), `sampling_rate` its rate.
    """

    frames: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    fps: float
    audio: np.ndarray
    sampling_rate: int


def num_video_frames(num_samples: int, sampling_rate: int, fps: float) -> int:
    """Frames of the video for an audio of `num_samples` at `sampling_rate` Hz: ceil(duration x fps)."""
    return math.ceil(num_samples / sampling_rate * fps - 1e-6)


def combine_guidance(
    preds: Sequence[torch.Tensor], guidance_scale: float, reference_guidance_scale: float, joint: bool = False
) -> torch.Tensor:
    """Classifier-free guidance over the branches made by `EmoPipeline._branches`, in that order.

    Branches: full (reference + audio), then no-audio if `guidance_scale != 1`, then no-condition if
    `reference_guidance_scale != 1`. eps = eps_none + s_ref (eps_ref - eps_none) + s_audio (eps_full - eps_ref).
    joint (Hallo): full, then no-condition if `guidance_scale != 1`; eps = eps_none + s (eps_full - eps_none).
    """
    if joint:
        return preds[0] if len(preds) == 1 else preds[1] + guidance_scale * (preds[0] - preds[1])
    full, rest = preds[0], list(preds[1:])
    no_audio = rest.pop(0) if guidance_scale != 1 else None
    no_cond = rest.pop(0) if reference_guidance_scale != 1 else None
    ref_only = no_audio if no_audio is not None else full
    out = ref_only if no_cond is None else no_cond + reference_guidance_scale * (ref_only - no_cond)
    if no_audio is not None:
        out = out + guidance_scale * (full - no_audio)
    return out


class EmoPipeline(DiffusionPipeline):
    r"""Audio-driven portrait video generation with EMO's ReferenceNet + backbone design.

    Components: `vae` (AutoencoderKL), `reference_net` (ReferenceNet), `denoising_unet` (EmoUNet3DModel),
    `face_locator`, `audio_encoder` (transformers Wav2Vec2Model, or the small `MelAudioEncoder`) with its `feature_extractor`,
    `audio_projection`, `speed_encoder` (None: no speed layers), `scheduler` (DDIM or any diffusers scheduler
    with `step`), `identity_projection` (face embedding -> identity tokens; Hallo's models, else None).
    """

    model_cpu_offload_seq = (
        "audio_encoder->audio_projection->speed_encoder->identity_projection->vae->reference_net->face_locator"
        "->denoising_unet"
    )
    _optional_components = ["speed_encoder", "identity_projection"]
    _callback_tensor_inputs = ["latents"]
    # set False to run the guidance branches one by one (same result, less memory per pass)
    batch_guidance: bool = True

    def __init__(
        self,
        vae: AutoencoderKL,
        reference_net: ReferenceNet,
        denoising_unet: EmoUNet3DModel,
        face_locator: FaceLocator,
        audio_encoder: Wav2Vec2Model | MelAudioEncoder,
        feature_extractor: Wav2Vec2FeatureExtractor,
        audio_projection: AudioProjection,
        speed_encoder: SpeedEncoder | None,
        scheduler: KarrasDiffusionSchedulers,
        identity_projection: IdentityProjection | None = None,
        generation_defaults: dict | None = None,
        behaviour: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            reference_net=reference_net,
            denoising_unet=denoising_unet,
            face_locator=face_locator,
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
            audio_projection=audio_projection,
            speed_encoder=speed_encoder,
            scheduler=scheduler,
            identity_projection=identity_projection,
        )
        self.register_generation_defaults(**(generation_defaults or {}))
        self.register_to_config(behaviour=Behaviour.from_config(behaviour).to_config())
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, resample=self.behaviour.image_resample
        )
        self._interrupt = False

    @classmethod
    def from_base_models(cls, **kwargs) -> EmoPipeline:
        """SD 1.5 UNet + VAE + AnimateDiff motion module + wav2vec2 -> an untrained EMO (see `loading`)."""
        from .loading import from_base_models

        return from_base_models(cls, **kwargs)

    # ------------------------------------------------------------------ per-model defaults
    def register_generation_defaults(self, **values) -> None:
        """Store this model's own settings (saved in model_index.json): e.g. `num_inference_steps=20`.

        Keys: `GENERATION_DEFAULT_KEYS`. A value of None removes the key (back to EMO's setting).
        """
        unknown = set(values) - set(GENERATION_DEFAULT_KEYS)
        if unknown:
            raise ValueError(
                f"unknown generation defaults {sorted(unknown)}; allowed: {list(GENERATION_DEFAULT_KEYS)}"
            )
        if values.get("preset") is not None:
            get_preset(values["preset"])  # raises on an unknown name
        current = dict(getattr(self.config, "generation_defaults", None) or {})
        current.update(values)
        self.register_to_config(generation_defaults={k: v for k, v in current.items() if v is not None})

    def resolved_defaults(self, **arguments) -> dict:
        """Settings of a call: the arguments that are not None > the model's defaults > EMO's; a preset in
        effect sets the number of steps unless it is given."""
        return resolve_settings(self.config.generation_defaults, **arguments)

    # ------------------------------------------------------------------ properties
    @property
    def behaviour(self) -> Behaviour:
        return Behaviour.from_config(self.config.behaviour)

    @property
    def has_region_audio(self) -> bool:
        """Hallo's audio modules: they read full/face/lip region masks and take pose/face/lip weights."""
        return self.denoising_unet.config.audio_attention_type != "cross"

    @property
    def has_speed_layers(self) -> bool:
        return self.speed_encoder is not None and self.denoising_unet.config.speed_dim is not None

    @property
    def default_size(self) -> int:
        return self.denoising_unet.config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels."""
        return self.vae_scale_factor * 2 ** (len(self.denoising_unet.config.block_out_channels) - 1)

    def interrupt(self) -> None:
        """Stop a running `__call__` after the current denoising step; frames of finished clips are kept."""
        self._interrupt = True

    # ------------------------------------------------------------------ inputs
    def check_inputs(
        self, reference_image, audio, sampling_rate, height, width, num_inference_steps, guidance_scale,
        reference_guidance_scale, fps, clip_length, num_motion_frames, head_speed, output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:  # fmt: skip
        if not isinstance(reference_image, PIL.Image.Image | np.ndarray | torch.Tensor):
            raise ValueError(
                f"`reference_image` must be a PIL image, numpy array or tensor, got {type(reference_image).__name__}"
            )
        if isinstance(audio, str | Path):
            if not Path(audio).is_file():
                raise ValueError(f"`audio` file not found: {str(audio)!r}")
        elif isinstance(audio, np.ndarray | torch.Tensor):
            if audio.ndim != 1:
                raise ValueError(f"`audio` array must be 1-D (mono samples), got shape {tuple(audio.shape)}")
            if sampling_rate is None or sampling_rate <= 0:
                raise ValueError(
                    f"`sampling_rate` must be a positive rate in Hz for array audio, got {sampling_rate}"
                )
            if len(audio) == 0:
                raise ValueError("`audio` is empty (0 samples): pass at least one video frame of sound")
        else:
            raise ValueError(f"`audio` must be a file path or a 1-D array, got {type(audio).__name__}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.size_multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {self.size_multiple}, got {value}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}")
        for name, value in (
            ("guidance_scale", guidance_scale),
            ("reference_guidance_scale", reference_guidance_scale),
        ):
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value}")
        if not isinstance(fps, int | float) or fps <= 0:
            raise ValueError(f"`fps` must be a positive number of frames per second, got {fps}")
        if not isinstance(clip_length, int) or clip_length < 1:
            raise ValueError(f"`clip_length` must be a positive integer, got {clip_length}")
        if not isinstance(num_motion_frames, int) or not 0 <= num_motion_frames <= clip_length:
            raise ValueError(
                f"`num_motion_frames` must be an integer in [0, clip_length={clip_length}], got {num_motion_frames}"
            )
        max_frames = self.denoising_unet.config.motion_max_seq_length
        if clip_length + num_motion_frames > max_frames:
            raise ValueError(
                f"`clip_length` + `num_motion_frames` must be <= {max_frames} (temporal modules' length), "
                f"got {clip_length} + {num_motion_frames}"
            )
        speeds = np.atleast_1d(np.asarray(head_speed, dtype=np.float64))
        if speeds.ndim != 1 or not np.all(np.isfinite(speeds)) or np.any(speeds < 0):
            raise ValueError(f"`head_speed` must be a number >= 0 or a sequence of them, got {head_speed}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only hold {self._callback_tensor_inputs}, got {sorted(unknown)}"
            )

    def prepare_audio(self, audio, sampling_rate: int | None) -> np.ndarray:
        """A path or a 1-D array at `sampling_rate` -> float32 mono waveform at 16 kHz."""
        from .audio import load_audio

        if isinstance(audio, torch.Tensor):
            audio = audio.detach().float().cpu().numpy()
        source = (
            audio if isinstance(audio, str | Path) else (np.asarray(audio, dtype=np.float32), sampling_rate)
        )
        return load_audio(source, sampling_rate=SAMPLING_RATE, mono=True).mono

    def encode_audio(self, waveform: np.ndarray, num_frames: int, fps: float, device) -> torch.Tensor:
        """Waveform -> audio tokens of every frame (1, num_frames, k, d), computed once for the whole audio.

        num_frames: the frames of whole clips (the audio is padded to them).
        """
        return self.audio_projection(self.audio_frame_features(waveform, num_frames, fps, device))

    def audio_frame_features(self, waveform: np.ndarray, num_frames: int, fps: float, device) -> torch.Tensor:
        """Waveform -> the audio encoder's features of every frame (1, num_frames, layers, dim)."""
        num_layers = self.audio_projection.config.num_layers
        if self.behaviour.audio_features == "hallo":
            features = hallo_frame_features(
                self.audio_encoder, self.feature_extractor, waveform,
                num_video_frames(len(waveform), SAMPLING_RATE, fps), num_frames, fps, num_layers,
            )  # fmt: skip
        else:
            features = wav2vec_frame_features(
                self.audio_encoder, self.feature_extractor, waveform, num_frames, fps, num_layers=num_layers
            )
        return features[None].to(device)

    def encode_speed(self, head_speed, num_frames: int, device) -> torch.Tensor | None:
        """One speed or one per frame (degrees/frame) -> speed embeddings (1, num_frames, d); None without
        speed layers."""
        if not self.has_speed_layers:
            return None
        speeds = torch.as_tensor(np.atleast_1d(np.asarray(head_speed, dtype=np.float32)))
        if speeds.numel() == 1:
            speeds = speeds.expand(num_frames)
        else:
            speeds = torch.cat([speeds, speeds[-1:].expand(max(0, num_frames - len(speeds)))])[:num_frames]
        return self.speed_encoder(speeds[None].to(device))

    def encode_identity(self, face_embedding, image: PIL.Image.Image, device):
        """(null, conditional) identity tokens (1, k, d) each, for models with an `identity_projection`.

        face_embedding: a 512-d face-recognition embedding (insightface's raw `embedding`, as Hallo uses);
        None computes it from the portrait with insightface (optional dependency).
        """
        if self.identity_projection is None:
            return None
        dim = self.identity_projection.config.embedding_dim
        if face_embedding is None:
            from .identity_embedding import face_embedding as compute_embedding

            face_embedding = compute_embedding(image, self.face_analysis_root)
        emb = torch.as_tensor(np.asarray(face_embedding, dtype=np.float32)).reshape(1, -1)
        if emb.shape[1] != dim:
            raise ValueError(f"`face_embedding` must have {dim} values, got {emb.shape[1]}")
        emb = emb.to(device)
        return self.identity_projection(torch.zeros_like(emb)), self.identity_projection(emb)

    @property
    def face_analysis_root(self) -> Path | None:
        """insightface's model folder: `face_analysis/` inside the model folder, when the converter copied it."""
        root = Path(self.name_or_path or "") / "face_analysis"
        return root if self.name_or_path and root.is_dir() else None

    def prepare_region_masks(
        self, region_masks, image: PIL.Image.Image, latent_size: tuple[int, int], device
    ):
        """Region masks of every resolution level, (h, w) -> (1, h*w, 3) full/face/lip weights in [0, 1].

        region_masks: {"full", "face", "lip"} 8-bit images of any size (resized to each level with PIL's
        bilinear filter, then / 255, as Hallo); None computes them from the portrait's face landmarks.
        """
        from .regions import hallo_region_masks, level_masks

        if region_masks is None:
            found = hallo_region_masks(image)
            region_masks = {"full": found.full, "face": found.face, "lip": found.lip}
        sizes = self.denoising_unet.token_grids(latent_size)
        return {size: mask.to(device) for size, mask in level_masks(region_masks, sizes).items()}

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> scaled latents (n, c, H/s, W/s) (the posterior's mode: deterministic)."""
        latents = self.vae.encode(image.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """(n, c, h, w) latents -> (n, H, W, 3) float32 frames in [0, 1]."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return self.image_processor.postprocess(images.float(), output_type="np")

    def prepare_face_mask(
        self, face_mask, image: PIL.Image.Image, height: int, width: int, device
    ) -> torch.Tensor:
        """The face-region mask (1, 1, H, W): given, or from the reference's face box (all ones if none found)."""
        if face_mask is None:
            from .face import NoFaceError, detect_face
            from .face import face_mask as box_mask

            try:
                mask = box_mask(detect_face(np.asarray(image), warn_multiple=False), (width, height))
            except NoFaceError:
                logger.warning(
                    "No face found in the reference image: the face may move anywhere (all-ones mask)."
                )
                mask = np.ones((height, width), np.float32)
        elif isinstance(face_mask, PIL.Image.Image):
            # Hallo's models: resized with the portrait's (bilinear) filter, soft edges kept
            resample = (
                PIL.Image.BILINEAR if self.behaviour.image_resample == "bilinear" else PIL.Image.NEAREST
            )
            mask = np.asarray(face_mask.convert("L").resize((width, height), resample), np.float32) / 255.0
        else:
            array = (
                face_mask.detach().cpu().numpy()
                if isinstance(face_mask, torch.Tensor)
                else np.asarray(face_mask)
            )
            if array.ndim != 2:
                raise ValueError(f"`face_mask` must be a 2-D (H, W) mask, got shape {tuple(array.shape)}")
            array = array / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
            if self.behaviour.image_resample == "bilinear" and array.shape != (height, width):
                # Hallo's models: as an 8-bit image, resized like the portrait (Hallo reads its mask PNG)
                image = PIL.Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8), "L")
                mask = np.asarray(image.resize((width, height), PIL.Image.BILINEAR), np.float32) / 255.0
            else:
                mask = torch.nn.functional.interpolate(
                    torch.as_tensor(array, dtype=torch.float32)[None, None],
                    size=(height, width),
                    mode="nearest",
                )[0, 0]
        return (
            torch.as_tensor(np.asarray(mask), dtype=torch.float32)
            .reshape(1, 1, height, width)
            .clamp(0, 1)
            .to(device)
        )

    def posed_reference_latents(self, image: PIL.Image.Image, opening: np.ndarray) -> torch.Tensor:
        """The portrait at model size with its mouth opened frame by frame (`opening`: the mouth head's values,
        0 closed .. 1 wide; `behaviour.posed_reference` of the face height at 1) -> latents (1, c, frames, h, w).
        Without a face found, the still portrait in every frame (a warning says so)."""
        from .face import face_landmarks
        from .mouth_pose import face_height, posed_frames

        portrait = np.asarray(image.convert("RGB"))
        landmarks = face_landmarks(portrait)
        if landmarks is None:
            logger.warning("No face found in the reference image: its mouth cannot follow the voice.")
            frames, index = portrait[None], np.zeros(len(opening), dtype=np.int64)
        else:
            fraction = np.clip(opening, 0.0, 1.2) * self.behaviour.posed_reference
            frames, index = posed_frames(
                portrait, landmarks, fraction * face_height(landmarks), close_first=True
            )
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = torch.cat([self.encode_image(chunk) for chunk in pixels.split(16)])
        return latents[torch.from_numpy(index).to(latents.device)].permute(1, 0, 2, 3)[None]

    def prepare_mouth_mask(
        self, image: PIL.Image.Image, device, purpose: str = "hidden from the model"
    ) -> torch.Tensor | None:
        """The portrait's mouth region (1, 1, H, W) of 0/1 (`face.mouth_mask` of its face box), for models with
        `behaviour.mask_reference_mouth` or a mouth drive; None when no face is found (a warning says what the
        mouth region was for: `purpose`)."""
        from .face import NoFaceError, detect_face, mouth_mask

        try:
            box = detect_face(np.asarray(image), warn_multiple=False)
        except NoFaceError:
            logger.warning("No face found in the reference image: its mouth cannot be %s.", purpose)
            return None
        return (
            torch.from_numpy(mouth_mask(box, image.size)).reshape(1, 1, image.height, image.width).to(device)
        )

    def _branches(self, guidance_scale: float, reference_guidance_scale: float) -> list[tuple[bool, bool]]:
        """(use reference, use audio) per classifier-free guidance branch, in `combine_guidance` order."""
        branches = [(True, True)]
        if self.behaviour.guidance == "joint":
            return branches + [(False, False)] if guidance_scale != 1 else branches
        if guidance_scale != 1:
            branches.append((True, False))
        if reference_guidance_scale != 1:
            branches.append((False, False))
        return branches

    def _branch_inputs(self, conds: ClipConditions, selected: tuple) -> dict:
        """The backbone's keyword arguments for a batch of guidance branches.

        A branch without reference has zero reference tokens ("cross" reference attention) or none at all
        ("concat": plain self-attention) and the null identity tokens; without audio, zero audio tokens. Under
        joint guidance it also loses the face-locator features (Hallo's unconditional branch).
        """
        concat = self.denoising_unet.config.reference_attention == "concat"
        behaviour = self.behaviour
        joint = behaviour.guidance == "joint"
        used = [use_ref for use_ref, _ in selected]
        # (Behaviour checks that the switch comes with the interleave, which makes the two reference rows)
        alternate = concat and behaviour.reference_frames_alternate and conds.identity is not None
        reference_index = None
        if alternate:  # frame i of each sample with a reference reads row i % 2 ([null, conditional])
            reference = conds.reference if any(used) else None
            frames = conds.audio.shape[1]
            reference_index = (torch.arange(frames) % 2).repeat(sum(used)).to(conds.audio.device)
        elif concat:
            reference = (
                {k: torch.cat([v] * sum(used)) for k, v in conds.reference.items()} if any(used) else None
            )
        else:
            reference = {
                k: torch.cat([v if use_ref else torch.zeros_like(v) for use_ref in used])
                for k, v in conds.reference.items()
            }
        motion = None
        if conds.motion is not None:
            motion = {
                k: torch.cat(
                    [
                        conds.motion_null[k] if (conds.motion_null is not None and not use_ref) else v
                        for use_ref in used
                    ]
                )
                for k, v in conds.motion.items()
            }
        audio = torch.cat(
            [conds.audio if use_audio else torch.zeros_like(conds.audio) for _, use_audio in selected]
        )
        face = torch.cat(
            [conds.face if use_ref or not joint else torch.zeros_like(conds.face) for use_ref in used]
        )
        inputs = dict(
            reference_tokens=reference,
            motion_features=motion,
            audio_tokens=audio,
            speed_tokens=conds.speed.repeat(len(selected), 1, 1) if conds.speed is not None else None,
            face_features=face,
            region_masks=conds.region_masks,
            region_weights=conds.region_weights,
        )
        if conds.identity is not None:
            null, cond = conds.identity
            inputs["identity_tokens"] = torch.cat([cond if use_ref else null for use_ref in used])
        if concat:
            inputs["reference_used"] = used
        if reference_index is not None:
            inputs["reference_index"] = reference_index
        if conds.mouth_drive is not None:  # a branch without audio gets zeros, as in training
            d = conds.mouth_drive
            inputs["mouth_drive"] = torch.cat(
                [d if use_audio else torch.zeros_like(d) for _, use_audio in selected]
            )
        if conds.reference_latents is not None:  # a branch without reference gets zeros, as in training
            r, closed = conds.reference_latents, conds.closed_reference_latents
            inputs["reference_latents"] = torch.cat(
                [
                    (r if use_audio or closed is None else closed.expand_as(r))
                    if use_ref
                    else torch.zeros_like(r)
                    for use_ref, use_audio in selected
                ]
            )
        return inputs

    def _predict(self, latents, t, conds: ClipConditions, built: dict, branches) -> list[torch.Tensor]:
        """Backbone predictions for every guidance branch: one batched pass, or one pass per branch.

        built: the branches' backbone inputs, filled on first use and kept by the caller for the whole clip,
        so the backbone sees the same reference tensors at every step (cached keys/values).
        """
        unet = self.denoising_unet

        def run(selected: tuple) -> list[torch.Tensor]:
            n = len(selected)
            if selected not in built:
                built[selected] = self._branch_inputs(conds, selected)
            out = unet(latents.to(unet.dtype).repeat(n, 1, 1, 1, 1), t, **built[selected]).sample
            return list(out.float().chunk(n))

        if self.batch_guidance:
            return run(tuple(branches))
        return [run((branch,))[0] for branch in branches]

    def _reference_features(
        self,
        reference_latents: torch.Tensor,
        motion_latents: torch.Tensor | None,
        identity,
        with_reference: bool,
        zero_motion: int = 0,
    ) -> tuple[dict | None, dict | None, dict | None]:
        """ReferenceNet, once per clip: (reference tokens, motion features, the unconditional branch's own
        motion features or None).

        Rows: the reference (if `with_reference`) and the n motion latents (`zero_motion`: n zero maps instead
        of motion rows). With Hallo's interleave switch the
        rows run twice, for the unconditional then the conditional branch, with identity tokens alternating
        [null, conditional] row by row, as Hallo's batch of [ref, motion..] x 2 gets them.
        """
        net, behaviour = self.reference_net, self.behaviour
        parts = ([reference_latents] if with_reference else []) + (
            [motion_latents] if motion_latents is not None else []
        )
        rows = torch.cat(parts).to(net.dtype)
        interleave = identity is not None and behaviour.reference_identity_interleave
        if interleave:
            context = torch.cat(identity).repeat(len(rows), 1, 1)
            out = net(torch.cat([rows, rows]), identity_tokens=context)
            halves = (slice(len(rows), None), slice(0, len(rows)))  # conditional, unconditional
        else:
            context = identity[1].expand(len(rows), -1, -1) if identity is not None else None
            out = net(rows, identity_tokens=context)
            halves = (slice(0, len(rows)),)

        def rounded(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.float16).to(t.dtype) if behaviour.reference_fp16 else t

        from_attention = self.denoising_unet.config.motion_frame_features == "attention"
        source = out.reference_tokens if from_attention else out.motion_features
        first = 1 if with_reference else 0
        # the conditional row; with `reference_frames_alternate` [unconditional, conditional] rows
        rows_of = (
            (halves[1], halves[0]) if interleave and behaviour.reference_frames_alternate else halves[:1]
        )
        reference = (
            {
                k: rounded(torch.cat([v[half][:1] for half in rows_of]))
                for k, v in out.reference_tokens.items()
            }
            if with_reference
            else None
        )
        if zero_motion:  # zero maps shaped like the reference's features (EMO's first clip)
            motions = [
                {
                    k: torch.zeros_like(v[half][:1])[:, None].expand(-1, zero_motion, *v.shape[1:])
                    for k, v in source.items()
                }
                for half in halves
            ]
        else:
            motions = [
                {k: rounded(v[half][first:])[None] for k, v in source.items()}
                if motion_latents is not None
                else None
                for half in halves
            ]
        return reference, motions[0], motions[1] if interleave else None

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        reference_image: PIL.Image.Image | np.ndarray | torch.Tensor,
        audio: str | Path | np.ndarray | torch.Tensor,
        sampling_rate: int | None = None,
        face_mask: PIL.Image.Image | np.ndarray | torch.Tensor | None = None,
        face_embedding: np.ndarray | torch.Tensor | None = None,
        region_masks: dict | None = None,
        pose_weight: float = 1.0,
        face_weight: float = 1.0,
        lip_weight: float = 1.0,
        head_speed: float | Sequence[float] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        reference_guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float | None = None,
        clip_length: int | None = None,
        num_motion_frames: int | None = None,
        preset: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_clip_end: Callable[[EmoPipeline, int, int, np.ndarray], None] | None = None,
    ) -> EmoPipelineOutput | tuple:
        r"""Generate a video as long as the audio: ceil(duration x fps) frames, made clip by clip.

        Settings left as None (head_speed, num_inference_steps, guidance_scale, reference_guidance_scale, fps,
        clip_length, num_motion_frames) take the model folder's `generation_defaults`, else EMO's values
        (`EMO_GENERATION_DEFAULTS`); `resolved_defaults()` shows the result.

        Args:
            reference_image: the portrait (a square face crop works best; resized to height x width): a PIL
                image, an (H, W, 3) array (uint8 0..255, or floats in [0, 1]) or a tensor.
            audio: a file path (any format ffmpeg reads), or a 1-D float array with `sampling_rate` (Hz).
            face_mask: (H, W) region the face may occupy (EMO's face locator); default: the reference's
                face box, widened (all ones if no face is found); Hallo's models: the silhouette box x 1.2.
            face_embedding: models with identity tokens (Hallo): the portrait's 512-d insightface embedding;
                default: computed with insightface (optional dependency).
            region_masks: models with region audio modules (Hallo): {"full", "face", "lip"} 8-bit masks (any
                size); default: from the portrait's face landmarks with Hallo's rules.
            pose_weight, face_weight, lip_weight: weights of the full/face/lip audio branches (Hallo's models).
            head_speed: head rotation speed in degrees per frame, one value or one per frame
                (speech 0.1-1.0, singing 1.0-1.3; above 1.5 motion becomes jittery).
            num_inference_steps: denoising steps per clip (EMO: 40; fewer than 20 give artifacts).
            guidance_scale: classifier-free guidance on the audio (1 disables it).
            reference_guidance_scale: classifier-free guidance on the reference image (1 disables it).
            latents: the initial noise of the whole video, (1, C, num_clips x clip_length, h, w); clip k uses
                frames k x clip_length ... (k + 1) x clip_length - 1 (default: drawn per clip from `generator`).
            preset: "quality", "balanced" or "fast" (`pipeline.presets`): the sampler, the number of steps
                (unless `num_inference_steps` is given) and on how many steps guidance runs.
            fps: video frame rate; clip_length: frames per clip (f = 12); num_motion_frames: n = 4 frames
                of the previous clip that condition the next (zero maps for the first clip).
            output_type: "pil", "np" ((f, H, W, 3) in [0, 1]), "pt" ((f, 3, H, W)), or "none" to keep no
                frames (they reach `callback_on_clip_end` only: streaming of long videos).
            callback_on_step_end: diffusers' per-step callback `(pipe, step, timestep, kwargs) -> kwargs`.
            callback_on_clip_end: `(pipe, clip_index, num_clips, frames)` with frames (f, H, W, 3) uint8,
                called as soon as a clip is decoded (the last clip is cut to the audio's length).
        """
        # 1. Check inputs (settings left as None come from the model folder, then from EMO's defaults)
        settings = self.resolved_defaults(
            head_speed=head_speed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            reference_guidance_scale=reference_guidance_scale, fps=fps, clip_length=clip_length,
            num_motion_frames=num_motion_frames, preset=preset,
        )  # fmt: skip
        head_speed, num_inference_steps, guidance_scale = (
            settings[k] for k in ("head_speed", "num_inference_steps", "guidance_scale")
        )
        reference_guidance_scale, fps = settings["reference_guidance_scale"], settings["fps"]
        clip_length, num_motion_frames = settings["clip_length"], settings["num_motion_frames"]
        chosen = get_preset(settings["preset"]) if settings["preset"] is not None else None
        scheduler = make_scheduler(chosen.sampler, self.scheduler.config) if chosen else self.scheduler
        # guidance on the first `guided_steps` steps; the others run the conditional branch alone
        guided_steps = (
            math.ceil(chosen.guidance_fraction * num_inference_steps) if chosen else num_inference_steps
        )
        height = height or self.default_size
        width = width or self.default_size
        self.check_inputs(
            reference_image, audio, sampling_rate, height, width, num_inference_steps, guidance_scale,
            reference_guidance_scale, fps, clip_length, num_motion_frames, head_speed, output_type,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._interrupt = False
        device = self._execution_device

        # 2. Audio -> number of frames and clips
        waveform = self.prepare_audio(audio, sampling_rate)
        if len(waveform) == 0:
            raise ValueError("`audio` is empty (0 samples): pass at least one video frame of sound")
        num_frames = num_video_frames(len(waveform), SAMPLING_RATE, fps)
        num_clips = math.ceil(num_frames / clip_length)
        padded_frames = num_clips * clip_length
        speeds = np.atleast_1d(np.asarray(head_speed))
        if speeds.size > 1 and speeds.size != num_frames:
            raise ValueError(f"`head_speed` has {speeds.size} values but the video has {num_frames} frames")

        # 3. Audio tokens and speed embeddings for every frame, once
        audio_features = self.audio_frame_features(waveform, padded_frames, fps, device)
        audio_tokens = self.audio_projection(audio_features)
        speed_tokens = self.encode_speed(head_speed, padded_frames, device)

        # 4. Reference image -> latents; identity tokens, face-locator features, region masks (once)
        if isinstance(reference_image, np.ndarray) and reference_image.dtype == np.uint8:
            # diffusers reads numpy images as floats in [0, 1]; a photo array is 0..255
            reference_image = PIL.Image.fromarray(reference_image).convert("RGB")
        image = self.image_processor.preprocess(reference_image, height=height, width=width)
        levels = Levels.of(image, self.behaviour.auto_levels) if self.behaviour.auto_levels else None
        if levels is not None:
            image = levels.stretch(image)
        reference_pil = self.image_processor.postprocess(image, output_type="pil")[0]
        original = reference_image if isinstance(reference_image, PIL.Image.Image) else reference_pil
        reference_latents = self.encode_image(image)
        latent_size = tuple(reference_latents.shape[-2:])
        if self.has_region_audio and face_mask is None and region_masks is None:
            from .regions import hallo_region_masks

            found = hallo_region_masks(original)  # Hallo's face box and region masks, one landmark pass
            face_mask = PIL.Image.fromarray(found.face_box)
            region_masks = {"full": found.full, "face": found.face, "lip": found.lip}
        mask = self.prepare_face_mask(face_mask, reference_pil, height, width, device)
        identity = self.encode_identity(face_embedding, original, device)
        # the reference's latents added to every frame (models with reference_latent_channels)
        injected = None
        if self.denoising_unet.config.reference_latent_channels:
            hide = self.behaviour.mask_reference_mouth
            mouth = self.prepare_mouth_mask(reference_pil, device) if hide else None
            injected = reference_latents if mouth is None else hide_mouth(reference_latents, mouth)
        posed = None  # (1, c, frames, h, w): the portrait with each frame's mouth opening, a posed reference
        if injected is not None and self.behaviour.posed_reference:
            opening = self.audio_projection.mouth_opening(audio_features)[0].float().cpu().numpy()
            posed = self.posed_reference_latents(reference_pil, np.concatenate([[0.0], opening]))
            closed, posed = posed.to(reference_latents.dtype).split([1, len(opening)], dim=2)
        mouth_drive = None
        if self.denoising_unet.config.mouth_drive:  # the voice's mouth opening drawn into the mouth region
            region = self.prepare_mouth_mask(reference_pil, device, purpose="drawn from the voice")
            opening = self.audio_projection.mouth_opening(audio_features).float()
            mouth_drive = mouth_drive_map(opening, region, latent_size)
        conditions = dict(
            face=self.face_locator(mask),
            identity=identity,
            region_masks=self.prepare_region_masks(region_masks, original, latent_size, device)
            if self.has_region_audio
            else None,
            region_weights=(float(pose_weight), float(face_weight), float(lip_weight)),
            reference_latents=injected,
        )
        branches = self._branches(guidance_scale, reference_guidance_scale)
        joint = self.behaviour.guidance == "joint"
        latent_shape = (1, self.denoising_unet.config.in_channels, clip_length, *latent_size)
        if latents is not None and tuple(latents.shape) != (*latent_shape[:2], padded_frames, *latent_size):
            raise ValueError(
                f"`latents` must have shape {(*latent_shape[:2], padded_frames, *latent_size)} (the noise of "
                f"{num_clips} clips of {clip_length} frames), got {tuple(latents.shape)}"
            )

        # 5. Clip loop: motion frames -> denoising loop -> decode
        behaviour = self.behaviour
        rerun_reference = identity is not None and behaviour.reference_identity_interleave
        motion_latents = None
        # the clip's ReferenceNet input: the reference's latents, or (renormalise_bright_batch) those of the
        # reference normalised twice, encoded once when first needed
        clip_reference_latents = reference_latents
        reference_normalised_twice = functools.cache(lambda: self.encode_image(image * 2.0 - 1.0))
        reference_tokens = None
        kept: list[np.ndarray] = []
        with (
            self.progress_bar(total=num_clips * num_inference_steps) as progress_bar,
            context_cache(self.denoising_unet),
        ):
            for clip in range(num_clips):
                progress_bar.set_description(f"clip {clip + 1}/{num_clips}")
                # 5a. ReferenceNet, once per clip: the reference (first clip) and the n motion frames
                if clip == 0 and num_motion_frames and behaviour.first_motion_frames == "reference":
                    if behaviour.renormalise_bright_batch and image.min() >= 0:
                        clip_reference_latents = reference_normalised_twice()
                    motion_latents = clip_reference_latents.expand(num_motion_frames, -1, -1, -1)
                motion_null = None
                if clip == 0 or rerun_reference:
                    zero_motion = num_motion_frames if motion_latents is None else 0  # EMO: zero maps
                    reference_tokens, motion, motion_null = self._reference_features(
                        clip_reference_latents, motion_latents if num_motion_frames else None, identity, True,
                        zero_motion=zero_motion,
                    )  # fmt: skip
                elif num_motion_frames:
                    motion, motion_null = self._reference_features(
                        reference_latents, motion_latents, identity, False
                    )[1:]
                else:
                    motion = None
                frames_slice = slice(clip * clip_length, (clip + 1) * clip_length)
                conds = ClipConditions(
                    reference=reference_tokens, motion=motion, motion_null=motion_null,
                    audio=audio_tokens[:, frames_slice],
                    speed=speed_tokens[:, frames_slice] if speed_tokens is not None else None,
                    mouth_drive=mouth_drive[:, frames_slice] if mouth_drive is not None else None,
                    **conditions,
                )  # fmt: skip
                if posed is not None:
                    conds.reference_latents = posed[:, :, frames_slice]
                    conds.closed_reference_latents = closed

                # 5b. Denoising loop (the branches' inputs are built once per clip)
                built: dict = {}
                scheduler.set_timesteps(num_inference_steps, device=device)
                if latents is None:
                    noise = randn_tensor(
                        latent_shape, generator=generator, device=device, dtype=torch.float32
                    )
                else:
                    noise = latents[:, :, frames_slice].to(device, torch.float32)
                clip_latents = noise * scheduler.init_noise_sigma
                extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
                for i, t in enumerate(scheduler.timesteps):
                    if self._interrupt:
                        break
                    model_input = scheduler.scale_model_input(clip_latents, t)
                    guided = i < guided_steps
                    preds = self._predict(model_input, t, conds, built, branches if guided else branches[:1])
                    noise_pred = (
                        combine_guidance(preds, guidance_scale, reference_guidance_scale, joint)
                        if guided
                        else preds[0]
                    )
                    clip_latents = scheduler.step(noise_pred, t, clip_latents, **extra, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        tensors = {"latents": clip_latents}
                        kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                        clip_latents = callback_on_step_end(
                            self, clip * num_inference_steps + i, t, kwargs
                        ).pop("latents", clip_latents)
                    progress_bar.update()
                if self._interrupt:
                    logger.info(
                        "Interrupted: keeping the %d frames of the finished clips.", sum(map(len, kept))
                    )
                    break

                # 5c. Decode; the last n frames condition the next clip (as latents, or decoded and re-encoded)
                frame_latents = clip_latents[0].permute(1, 0, 2, 3)  # (f, c, h, w)
                decoded = self.decode_latents(frame_latents)
                if num_motion_frames and behaviour.motion_frames == "decoded":
                    last = torch.from_numpy(decoded[clip_length - num_motion_frames :]).permute(0, 3, 1, 2)
                    motion_pixels = last * 2.0 - 1.0
                    clip_reference_latents = reference_latents
                    if behaviour.renormalise_bright_batch and min(image.min(), motion_pixels.min()) >= 0:
                        clip_reference_latents = reference_normalised_twice()
                        motion_pixels = motion_pixels * 2.0 - 1.0
                    motion_latents = self.encode_image(motion_pixels).to(reference_latents.dtype)
                else:
                    motion_latents = frame_latents[clip_length - num_motion_frames :]
                frames = decoded[: num_frames - clip * clip_length]
                if levels is not None:
                    frames = levels.restore(frames)
                if callback_on_clip_end is not None:
                    callback_on_clip_end(self, clip, num_clips, (frames * 255).round().astype(np.uint8))
                if output_type != "none":
                    kept.append(frames)

        # 6. Post-process and offload
        if output_type == "none":
            video = None
        else:
            video = np.concatenate(kept) if kept else np.zeros((0, height, width, 3), np.float32)
            if output_type == "pil":
                video = self.image_processor.numpy_to_pil(video)
            elif output_type == "pt":
                video = torch.from_numpy(video).permute(0, 3, 1, 2)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return EmoPipelineOutput(frames=video, fps=fps, audio=waveform, sampling_rate=SAMPLING_RATE)

"""EmoPipeline: a portrait and a vocal audio -> a talking or singing video (EMO, arXiv 2402.17485).

`__call__` reads top to bottom: check inputs -> audio features for the whole audio (once) -> speed
embeddings (once) -> reference image through VAE and ReferenceNet (once) and face-locator features ->
clip by clip: motion-frame features through ReferenceNet (once per clip), the DDIM denoising loop with
classifier-free guidance batched into one backbone pass, VAE decode -> output.
"""

from __future__ import annotations

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

from .audio_features import SAMPLING_RATE, wav2vec_frame_features
from .models import AudioProjection, EmoUNet3DModel, FaceLocator, MelAudioEncoder, ReferenceNet, SpeedEncoder
from .models.attention import context_cache
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
    """Generation settings: the arguments that are not None > a model's `generation_defaults` > EMO's; a
    preset in effect (given or the model's) sets the number of steps unless `num_inference_steps` is given."""
    given = {k: v for k, v in arguments.items() if v is not None}
    settings = {**EMO_GENERATION_DEFAULTS, **(model_defaults or {}), **given}
    if settings["preset"] is not None and "num_inference_steps" not in given:
        settings["num_inference_steps"] = get_preset(settings["preset"]).num_inference_steps
    return settings


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
    preds: Sequence[torch.Tensor], guidance_scale: float, reference_guidance_scale: float
) -> torch.Tensor:
    """Classifier-free guidance over the branches made by `EmoPipeline._branches`, in that order.

    Branches: full (reference + audio), then no-audio if `guidance_scale != 1`, then no-condition if
    `reference_guidance_scale != 1`. eps = eps_none + s_ref (eps_ref - eps_none) + s_audio (eps_full - eps_ref).
    """
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
    `audio_projection`, `speed_encoder`, `scheduler` (DDIM or any diffusers scheduler with `step`).
    """

    model_cpu_offload_seq = (
        "audio_encoder->audio_projection->speed_encoder->vae->reference_net->face_locator->denoising_unet"
    )
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
        speed_encoder: SpeedEncoder,
        scheduler: KarrasDiffusionSchedulers,
        generation_defaults: dict | None = None,
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
        )
        self.register_generation_defaults(**(generation_defaults or {}))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
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
        """Waveform -> audio tokens of every frame (1, num_frames, k, d), computed once for the whole audio."""
        features = wav2vec_frame_features(
            self.audio_encoder, self.feature_extractor, waveform, num_frames, fps,
            num_layers=self.audio_projection.config.num_layers,
        )  # fmt: skip
        return self.audio_projection(features[None].to(device))

    def encode_speed(self, head_speed, num_frames: int, device) -> torch.Tensor:
        """One speed or one per frame (degrees/frame) -> speed embeddings (1, num_frames, d)."""
        speeds = torch.as_tensor(np.atleast_1d(np.asarray(head_speed, dtype=np.float32)))
        if speeds.numel() == 1:
            speeds = speeds.expand(num_frames)
        else:
            speeds = torch.cat([speeds, speeds[-1:].expand(max(0, num_frames - len(speeds)))])[:num_frames]
        return self.speed_encoder(speeds[None].to(device))

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
            mask = (
                np.asarray(face_mask.convert("L").resize((width, height), PIL.Image.NEAREST), np.float32)
                / 255.0
            )
        else:
            mask = torch.as_tensor(
                np.asarray(face_mask) if not isinstance(face_mask, torch.Tensor) else face_mask
            )
            if mask.ndim != 2:
                raise ValueError(f"`face_mask` must be a 2-D (H, W) mask, got shape {tuple(mask.shape)}")
            mask = torch.nn.functional.interpolate(
                mask.float()[None, None], size=(height, width), mode="nearest"
            )[0, 0]
        return (
            torch.as_tensor(np.asarray(mask), dtype=torch.float32)
            .reshape(1, 1, height, width)
            .clamp(0, 1)
            .to(device)
        )

    def _branches(self, guidance_scale: float, reference_guidance_scale: float) -> list[tuple[bool, bool]]:
        """(use reference, use audio) per classifier-free guidance branch, in `combine_guidance` order."""
        branches = [(True, True)]
        if guidance_scale != 1:
            branches.append((True, False))
        if reference_guidance_scale != 1:
            branches.append((False, False))
        return branches

    @staticmethod
    def _branch_inputs(reference: dict, audio: torch.Tensor, selected: tuple) -> tuple[dict, torch.Tensor]:
        """Reference tokens and audio tokens of a batch of guidance branches (zeros where a branch drops them)."""
        ref = {
            k: torch.cat([v if use_ref else torch.zeros_like(v) for use_ref, _ in selected])
            for k, v in reference.items()
        }
        aud = torch.cat([audio if use_audio else torch.zeros_like(audio) for _, use_audio in selected])
        return ref, aud

    def _predict(
        self, latents, t, reference, audio, built, motion, speed, face, branches
    ) -> list[torch.Tensor]:
        """Backbone predictions for every guidance branch: one batched pass, or one pass per branch.

        built: the branches' (reference tokens, audio tokens), filled on first use and kept by the caller for
        the whole clip, so the backbone sees the same reference tensors at every step (cached keys/values).
        """
        unet = self.denoising_unet

        def run(selected: tuple) -> list[torch.Tensor]:
            n = len(selected)
            if selected not in built:
                built[selected] = self._branch_inputs(reference, audio, selected)
            ref, aud = built[selected]
            out = unet(
                latents.to(unet.dtype).repeat(n, 1, 1, 1, 1),
                t,
                reference_tokens=ref,
                motion_features={k: v.repeat(n, 1, 1, 1, 1) for k, v in motion.items()} if motion else None,
                audio_tokens=aud,
                speed_tokens=speed.repeat(n, 1, 1),
                face_features=face.repeat(n, 1, 1, 1),
            ).sample
            return list(out.float().chunk(n))

        if self.batch_guidance:
            return run(tuple(branches))
        return [run((branch,))[0] for branch in branches]

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        reference_image: PIL.Image.Image | np.ndarray | torch.Tensor,
        audio: str | Path | np.ndarray | torch.Tensor,
        sampling_rate: int | None = None,
        face_mask: PIL.Image.Image | np.ndarray | torch.Tensor | None = None,
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
                face box, widened (all ones if no face is found).
            head_speed: head rotation speed in degrees per frame, one value or one per frame
                (speech 0.1-1.0, singing 1.0-1.3; above 1.5 motion becomes jittery).
            num_inference_steps: denoising steps per clip (EMO: 40; fewer than 20 give artifacts).
            guidance_scale: classifier-free guidance on the audio (1 disables it).
            reference_guidance_scale: classifier-free guidance on the reference image (1 disables it).
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
        audio_tokens = self.encode_audio(waveform, padded_frames, fps, device)
        speed_tokens = self.encode_speed(head_speed, padded_frames, device)

        # 4. Reference image -> latents -> ReferenceNet tokens (once); face mask -> face-locator features
        if isinstance(reference_image, np.ndarray) and reference_image.dtype == np.uint8:
            # diffusers reads numpy images as floats in [0, 1]; a photo array is 0..255
            reference_image = PIL.Image.fromarray(reference_image).convert("RGB")
        image = self.image_processor.preprocess(reference_image, height=height, width=width)
        reference_pil = self.image_processor.postprocess(image, output_type="pil")[0]
        reference_latents = self.encode_image(image)
        mask = self.prepare_face_mask(face_mask, reference_pil, height, width, device)
        face_features = self.face_locator(mask)
        branches = self._branches(guidance_scale, reference_guidance_scale)

        # 5. Clip loop: motion frames -> denoising loop -> decode
        latent_shape = (1, self.denoising_unet.config.in_channels, clip_length, *reference_latents.shape[-2:])
        motion_latents = None
        reference_tokens = motion_features = None
        kept: list[np.ndarray] = []
        with (
            self.progress_bar(total=num_clips * num_inference_steps) as progress_bar,
            context_cache(self.denoising_unet),
        ):
            for clip in range(num_clips):
                progress_bar.set_description(f"clip {clip + 1}/{num_clips}")
                # 5a. ReferenceNet, once per clip: the reference (first clip) or the n motion frames
                if clip == 0:
                    out = self.reference_net(reference_latents.to(self.reference_net.dtype))
                    reference_tokens = out.reference_tokens
                    motion_features = {  # first clip: zero maps (EMO)
                        k: torch.zeros_like(v)[:, None].expand(-1, num_motion_frames, -1, -1, -1)
                        for k, v in out.motion_features.items()
                    } if num_motion_frames else None  # fmt: skip
                elif num_motion_frames:
                    out = self.reference_net(motion_latents.to(self.reference_net.dtype))
                    motion_features = {k: v[None] for k, v in out.motion_features.items()}
                frames_slice = slice(clip * clip_length, (clip + 1) * clip_length)

                # 5b. Denoising loop (the branches' conditions are built once per clip)
                clip_audio, built = audio_tokens[:, frames_slice], {}
                scheduler.set_timesteps(num_inference_steps, device=device)
                latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
                latents = latents * scheduler.init_noise_sigma
                extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
                for i, t in enumerate(scheduler.timesteps):
                    if self._interrupt:
                        break
                    model_input = scheduler.scale_model_input(latents, t)
                    guided = i < guided_steps
                    preds = self._predict(
                        model_input, t, reference_tokens, clip_audio, built, motion_features,
                        speed_tokens[:, frames_slice], face_features, branches if guided else branches[:1],
                    )  # fmt: skip
                    noise_pred = (
                        combine_guidance(preds, guidance_scale, reference_guidance_scale)
                        if guided
                        else preds[0]
                    )
                    latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        tensors = {"latents": latents}
                        kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                        latents = callback_on_step_end(self, clip * num_inference_steps + i, t, kwargs).pop(
                            "latents", latents
                        )
                    progress_bar.update()
                if self._interrupt:
                    logger.info(
                        "Interrupted: keeping the %d frames of the finished clips.", sum(map(len, kept))
                    )
                    break

                # 5c. Decode; the last n latents become the next clip's motion frames
                clip_latents = latents[0].permute(1, 0, 2, 3)  # (f, c, h, w)
                motion_latents = clip_latents[clip_length - num_motion_frames :]
                frames = self.decode_latents(clip_latents)[: num_frames - clip * clip_length]
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

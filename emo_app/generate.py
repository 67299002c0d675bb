"""Files in, mp4 out: the generation service shared by the CLI and the Gradio UI.

`generate(pipe, image, audio_path, output_path, settings)` does, in order:
1. read and check the portrait, crop the face (EMO's 512 x 512 head-and-shoulders framing) and make the
   face-locator mask from the detected box (models with Hallo's region audio modules: the pipeline makes
   Hallo's face box and region masks from the crop's landmarks instead);
2. read the audio (16 kHz mono for the model), refusing audio longer than `settings.max_duration`;
3. run the pipeline clip by clip with `output_type="none"`: every decoded clip goes straight into the
   mp4 encoder (pasted back into the photo if asked), so memory does not grow with the video's length;
4. mux the ORIGINAL audio file (not the 16 kHz copy) and move the mp4 onto `output_path` atomically.

Bad inputs raise `InputError` with a one-line message that names the problem and the fix. A cancelled or
failed run leaves no file at `output_path` (an existing file there is kept as it was).
`prepare_inputs` + `render` are the same two halves, for callers (the CLI) that check the inputs before
loading a model.
"""

from __future__ import annotations

import inspect
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from pipeline import EmoPipeline
from pipeline.audio import Audio, AudioLoadError, load_audio
from pipeline.face import FaceCrop, NoFaceError, PasteBack, crop_face, face_mask, to_rgb_array
from pipeline.pipeline_emo import num_video_frames, resolve_settings
from pipeline.presets import PRESETS

from .video import VideoWriter

MODEL_SAMPLING_RATE = 16_000  # Hz: wav2vec2's input rate
CROP_SIZE = 512  # pixels: side of the face crop (EMO's training crops); the pipeline resizes to its own size
MIN_IMAGE_SIDE = 64  # pixels: below this, a photo has too little face to animate

ProgressCallback = Callable[[int, int, int, int], None]
REGION_WEIGHTS = ("pose_weight", "face_weight", "lip_weight")  # settings read by region audio modules only


def _default(function: Callable, argument: str) -> float:
    """The default value of `function`'s keyword `argument` (so `pipeline.face` stays the one source)."""
    return inspect.signature(function).parameters[argument].default


class InputError(ValueError):
    """A bad input (portrait, audio, setting); the one-line message names the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class GenerationSettings:
    """How to generate.

    The model settings (steps, guidance_scale, head_speed, fps, clip_length) left as None take the model's own
    defaults (`with_model_defaults`: the model folder's `generation_defaults`, else EMO's values).

    Attributes:
        preset: "quality", "balanced" or "fast" (`pipeline.presets`: sampler, steps, guided steps); None: the
            model's own (its `generation_defaults`).
        steps: denoising steps per clip (EMO: 40 DDIM steps); None: the preset's or the model's.
        guidance_scale: classifier-free guidance on the audio (1 disables it; 3.5 as the open peers).
        head_speed: head rotation speed, degrees per frame (speech 0.1-1.0, singing 1.0-1.3, > 1.5 jittery).
        seed: random seed; None draws one, reported back in `GenerationResult.seed`.
        fps: frames per second of the video.
        clip_length: frames generated per clip (EMO's f = 12).
        paste_back: paste the generated face crop back into the full photo (video of the photo's size).
        max_duration: longest accepted audio, seconds.
        crop_margin: space around the face box on each side, as a fraction of the box side.
        mask_expand: scale of the face box that bounds where the face may move (face-locator mask); models with
            region audio modules (Hallo's) use Hallo's own face box instead.
        pose_weight, face_weight, lip_weight: how strongly the audio drives the head pose, the expression and the
            lips (the full/face/lip branches of Hallo's region audio modules; 0 = off, 1 = as trained); None: 1.
            Only models with region audio modules take them (`ignored_settings`).
    """

    preset: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    head_speed: float | None = None
    seed: int | None = None
    fps: float | None = None
    clip_length: int | None = None
    paste_back: bool = False
    max_duration: float = 60.0
    crop_margin: float = field(default_factory=lambda: _default(crop_face, "margin"))
    mask_expand: float = field(default_factory=lambda: _default(face_mask, "expand"))
    pose_weight: float | None = None
    face_weight: float | None = None
    lip_weight: float | None = None

    def __post_init__(self) -> None:
        weight = "a weight in [0, 10] (1 = as trained)"
        checks = (
            (
                "steps",
                self.steps is None or (isinstance(self.steps, int) and self.steps >= 1),
                "a whole number >= 1",
            ),
            ("guidance_scale", self.guidance_scale is None or self.guidance_scale >= 0, "a number >= 0"),
            (
                "head_speed",
                self.head_speed is None or 0 <= self.head_speed <= 10,
                "degrees per frame in [0, 10] (usually 0.1-1.3)",
            ),
            ("fps", self.fps is None or 0 < self.fps <= 120, "frames per second in (0, 120]"),
            (
                "clip_length",
                self.clip_length is None or (isinstance(self.clip_length, int) and self.clip_length >= 1),
                "a whole number of frames >= 1",
            ),
            ("max_duration", self.max_duration > 0, "seconds > 0"),
            ("crop_margin", self.crop_margin >= 0, "a fraction >= 0 of the face box"),
            ("mask_expand", self.mask_expand >= 1, "a box scale >= 1"),
            ("pose_weight", self.pose_weight is None or 0 <= self.pose_weight <= 10, weight),
            ("face_weight", self.face_weight is None or 0 <= self.face_weight <= 10, weight),
            ("lip_weight", self.lip_weight is None or 0 <= self.lip_weight <= 10, weight),
        )
        if self.preset is not None and self.preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}.")
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"{name} must be {expected}, got {getattr(self, name)!r}.")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be a whole number in [0, 2^63), got {self.seed!r}.")

    def with_model_defaults(self, defaults: dict) -> GenerationSettings:
        """These settings with every model setting left as None taken from `defaults`
        (`EmoPipeline.resolved_defaults()` or `emo_app.models.model_defaults(path)`)."""
        resolved = resolve_settings(
            defaults, preset=self.preset, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
            head_speed=self.head_speed, fps=self.fps, clip_length=self.clip_length,
        )  # fmt: skip
        return replace(
            self,
            preset=resolved["preset"],
            steps=resolved["num_inference_steps"],
            guidance_scale=resolved["guidance_scale"],
            head_speed=resolved["head_speed"],
            fps=resolved["fps"],
            clip_length=resolved["clip_length"],
        )

    def require_resolved(self) -> None:
        """Raise when a model setting is still None (call `with_model_defaults` first)."""
        missing = [
            k
            for k in ("steps", "guidance_scale", "head_speed", "fps", "clip_length")
            if getattr(self, k) is None
        ]
        if missing:
            raise ValueError(
                f"settings {missing} are not resolved: call with_model_defaults(pipe.resolved_defaults())"
            )


@dataclass
class PreparedInputs:
    """Checked inputs, ready for the model.

    Attributes:
        original: the photo as uint8 RGB (H, W, 3), EXIF rotation applied.
        crop: the square face crop (`crop.image` is CROP_SIZE x CROP_SIZE) and where it came from.
        mask: face-locator mask of the crop, float32 (CROP_SIZE, CROP_SIZE) of 0 and 1.
        speech: the audio as 16 kHz mono (what the model hears).
        audio_path: the original audio file (what the video plays).
        num_frames: video frames, ceil(duration x fps); num_clips: clips of `settings.clip_length` frames.
    """

    original: np.ndarray
    crop: FaceCrop
    mask: np.ndarray
    speech: Audio
    audio_path: Path
    num_frames: int
    num_clips: int

    @property
    def duration_s(self) -> float:
        """Length of the audio, seconds."""
        return self.speech.duration


@dataclass
class GenerationResult:
    """What `generate` made.

    Attributes:
        path: the output mp4 (absent when cancelled).
        num_frames: frames generated (before the cancel, if cancelled).
        duration_s: video length, num_frames / fps seconds.
        seed: the seed used (the drawn one when settings.seed was None).
        seconds: wall time of the model run and the encoding, seconds.
        cancelled: True when `cancel` stopped the run; then no file was written.
    """

    path: Path
    num_frames: int
    duration_s: float
    seed: int
    seconds: float
    cancelled: bool


def ignored_settings(pipe: EmoPipeline, settings: GenerationSettings) -> list[str]:
    """The settings given (not None) that `pipe` has no use for: head_speed without speed layers (Hallo's
    models), the pose/face/lip weights without region audio modules (EMO's). Call it before
    `with_model_defaults`, which fills head_speed in."""
    unused = [] if pipe.has_speed_layers else ["head_speed"]
    unused += [] if pipe.has_region_audio else list(REGION_WEIGHTS)
    return [name for name in unused if getattr(settings, name) is not None]


def model_arguments(pipe: EmoPipeline, settings: GenerationSettings, mask: np.ndarray) -> dict:
    """The pipeline arguments that depend on the model: EMO's models get the face-locator `mask`; models with
    region audio modules (Hallo's) get the pose/face/lip weights given, and no mask, so that the pipeline makes
    Hallo's face box and region masks from the portrait's landmarks (one pass)."""
    if not pipe.has_region_audio:
        return {"face_mask": mask}
    return {
        name: float(getattr(settings, name)) for name in REGION_WEIGHTS if getattr(settings, name) is not None
    }


def _frame_count(speech: Audio, settings: GenerationSettings) -> tuple[int, int]:
    """(frames, clips) of the video for `speech`, counted exactly as EmoPipeline counts them."""
    settings.require_resolved()
    num_frames = num_video_frames(speech.samples.shape[-1], speech.sampling_rate, settings.fps)
    return num_frames, math.ceil(num_frames / settings.clip_length)


def load_speech(
    audio_path: str | Path, settings: GenerationSettings, *, limit_hint: str = "max_duration"
) -> Audio:
    """The audio file as 16 kHz mono, checked: readable, not empty, at most `settings.max_duration` seconds.

    `limit_hint` names the option that raises the limit in the error message (e.g. "--max-duration").
    """
    try:
        return load_audio(
            audio_path,
            sampling_rate=MODEL_SAMPLING_RATE,
            mono=True,
            max_duration=settings.max_duration,
            limit_hint=limit_hint,
        )
    except AudioLoadError as error:
        raise InputError(str(error)) from error


def load_image(image: str | Path | PIL.Image.Image | np.ndarray) -> np.ndarray:
    """The portrait as uint8 RGB (H, W, 3), checked: an existing, readable image of at least MIN_IMAGE_SIDE px."""
    try:
        rgb = to_rgb_array(image)
    except FileNotFoundError as error:
        raise InputError(f"{error}: check the path.") from error
    except (ValueError, TypeError, PIL.Image.DecompressionBombError) as error:
        raise InputError(f"{error}. Use a JPEG or PNG photo.") from error
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InputError(
            f"The portrait is only {width}x{height} px: use a photo of at least {MIN_IMAGE_SIDE} px a side "
            "(512 px or more around the face is best)."
        )
    return rgb


def prepare_inputs(
    image: str | Path | PIL.Image.Image | np.ndarray,
    audio_path: str | Path,
    settings: GenerationSettings,
    *,
    limit_hint: str = "max_duration",
) -> PreparedInputs:
    """Read and check the portrait and the audio; crop the face. Raises InputError naming the problem.

    `settings` must be resolved (`GenerationSettings.with_model_defaults`): fps and clip length count the frames.
    """
    original = load_image(image)
    try:
        crop = crop_face(original, size=CROP_SIZE, margin=settings.crop_margin)
    except NoFaceError as error:
        raise InputError(str(error)) from error
    mask = face_mask(crop.face_box_in_crop, (CROP_SIZE, CROP_SIZE), expand=settings.mask_expand)
    speech = load_speech(audio_path, settings, limit_hint=limit_hint)
    num_frames, num_clips = _frame_count(speech, settings)
    return PreparedInputs(original, crop, mask, speech, Path(audio_path), num_frames, num_clips)


def estimate(
    pipe: EmoPipeline,
    audio_path: str | Path,
    settings: GenerationSettings,
    *,
    limit_hint: str = "max_duration",
) -> dict:
    """What a run will make, before making it: {"duration_s" (seconds of audio), "num_frames", "num_clips",
    "resolution" (frame side of the model, pixels)}. Raises InputError for unusable audio."""
    speech = load_speech(audio_path, settings, limit_hint=limit_hint)
    num_frames, num_clips = _frame_count(speech, settings.with_model_defaults(pipe.resolved_defaults()))
    return {
        "duration_s": speech.duration,
        "num_frames": num_frames,
        "num_clips": num_clips,
        "resolution": pipe.default_size,
    }


def render(
    pipe: EmoPipeline,
    inputs: PreparedInputs,
    output_path: str | Path,
    settings: GenerationSettings,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Generate the video of prepared inputs into `output_path` (see `generate`); `settings` resolved."""
    settings.require_resolved()
    start = time.perf_counter()
    output_path = Path(output_path)
    if output_path.is_dir() or output_path.suffix.lower() != ".mp4":
        raise InputError(f"The output '{output_path}' is not an .mp4 file name: give one like 'talking.mp4'.")
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
    paste = PasteBack(inputs.crop, inputs.original) if settings.paste_back else None

    def on_step(pipe: EmoPipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        clip, step_in_clip = divmod(step, settings.steps)
        if progress is not None:
            progress(clip, inputs.num_clips, step_in_clip + 1, settings.steps)
        if cancel is not None and cancel.is_set():
            pipe.interrupt()
        return tensors

    def on_clip(pipe: EmoPipeline, clip: int, num_clips: int, frames: np.ndarray) -> None:
        writer.write(np.stack([paste(frame) for frame in frames]) if paste is not None else frames)

    writer = VideoWriter(output_path, fps=settings.fps, audio=inputs.audio_path)
    try:
        if cancel is None or not cancel.is_set():
            pipe(
                reference_image=inputs.crop.image,
                audio=inputs.speech.mono,
                sampling_rate=inputs.speech.sampling_rate,
                head_speed=settings.head_speed,
                num_inference_steps=settings.steps,
                preset=settings.preset,
                guidance_scale=settings.guidance_scale,
                fps=settings.fps,
                clip_length=settings.clip_length,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="none",
                callback_on_step_end=on_step,
                callback_on_clip_end=on_clip,
                **model_arguments(pipe, settings, inputs.mask),
            )
        cancelled = cancel is not None and cancel.is_set()
        if cancelled:
            writer.abort()
        else:
            writer.close()
    except (NoFaceError, ImportError, FileNotFoundError) as error:
        writer.abort()
        if isinstance(error, NoFaceError) or pipe.identity_projection is not None:
            # Hallo's models: no face landmarks for the region masks, or no insightface (or its models) for the
            # face embedding; the message says what to do
            raise InputError(str(error)) from error
        raise
    except BaseException:
        writer.abort()
        raise
    return GenerationResult(
        path=output_path,
        num_frames=writer.num_frames,
        duration_s=writer.duration,
        seed=seed,
        seconds=time.perf_counter() - start,
        cancelled=cancelled,
    )


def generate(
    pipe: EmoPipeline,
    image: str | Path | PIL.Image.Image | np.ndarray,
    audio_path: str | Path,
    output_path: str | Path,
    settings: GenerationSettings | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """A portrait (path, PIL image or RGB array) and an audio file -> an mp4 at `output_path`.

    Args:
        progress: called after every denoising step as `progress(clip_index, num_clips, step_in_clip, steps)`,
            clip_index from 0, step_in_clip from 1 to steps.
        cancel: set it (from another thread) to stop after the current denoising step; the result then has
            cancelled=True and no file is written.

    Raises:
        InputError: no face, unreadable image or audio, audio too long, bad setting.
    """
    settings = (settings or GenerationSettings()).with_model_defaults(pipe.resolved_defaults())
    inputs = prepare_inputs(image, audio_path, settings)
    return render(pipe, inputs, output_path, settings, progress=progress, cancel=cancel)

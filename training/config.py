"""Training configuration: one YAML file per stage, read into dataclasses that reject unknown keys.

A stage config declares where the model starts (`init`), the data, what trains (`train.trainable`, groups
of parameter-name patterns from `PARAMETER_GROUPS` or raw `re:` patterns; everything else is frozen),
the optimisation, checkpointing and validation. `training/configs/stage{1,2,3}.yaml` hold the paper's
settings; `tiny_stage{1,2,3}.yaml` are the CPU-sized versions the tests run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# parameter-name patterns over "<component>.<parameter name>": (include, exclude or None)
PARAMETER_GROUPS: dict[str, tuple[str, str | None]] = {
    # the backbone's 2D layers (SD 1.5 structure + reference-attention), not its temporal or audio layers
    # (`audio_attention`: EMO's, inside the spatial transformers; `audio_modules`: Hallo's, after them)
    "backbone": (r"^denoising_unet\.", r"\.motion_modules\.|\.audio_attention\.|\.audio_modules\."),
    "reference_net": (r"^reference_net\.", None),
    "face_locator": (r"^face_locator\.", None),
    # AnimateDiff motion modules, without the speed cross-attention inside them
    "temporal": (r"^denoising_unet\..*\.motion_modules\.", r"\.(attn_speed|norm_speed)\."),
    # (the mouth head of a mouth-drive model is fitted before the stages, on the measured mouth, and stays)
    "audio": (
        r"^denoising_unet\..*\.(audio_attention|audio_modules)\.|^audio_projection\.",
        r"\.mouth_head\.",
    ),
    "speed": (r"^denoising_unet\..*\.(attn_speed|norm_speed)\.|^speed_encoder\.", None),
    # face embedding -> identity tokens (models with an identity projection: converted Hallo models)
    "identity": (r"^identity_projection\.", None),
}


def parameter_matcher(entries: list[str]):
    """Config `trainable` entries (group names or "re:<pattern>") -> predicate on "<component>.<param>"."""
    rules: list[tuple[re.Pattern, re.Pattern | None]] = []
    for entry in entries:
        if entry.startswith("re:"):
            rules.append((re.compile(entry[3:]), None))
        elif entry in PARAMETER_GROUPS:
            include, exclude = PARAMETER_GROUPS[entry]
            rules.append((re.compile(include), re.compile(exclude) if exclude else None))
        else:
            raise ValueError(
                f"train.trainable: unknown group {entry!r}; "
                f"use one of {sorted(PARAMETER_GROUPS)} or 're:<regex>'"
            )

    def matches(name: str) -> bool:
        return any(inc.search(name) and not (exc and exc.search(name)) for inc, exc in rules)

    return matches


@dataclass
class InitConfig:
    """Where the model starts; exactly one of `pipeline`, `base_models`, `model`.

    pipeline: an EmoPipeline folder (the previous stage's export).
    base_models: {unet, vae, audio_encoder} folders or hub ids for `EmoPipeline.from_base_models` (stage 1).
    model: a `build_pipeline` size name ("tiny", "sd15") or config dict: random weights (tests, small models).
    motion_module: AnimateDiff weights loaded into the temporal modules after the above (stage 2).
    """

    pipeline: str | None = None
    base_models: dict[str, str] | None = None
    model: str | dict | None = None
    motion_module: str | None = None


@dataclass
class DataConfig:
    """root: a `training.prepare` output folder, or a list of them (e.g. videos plus `training.photos`
    pseudo-clips for stage 1). resolution: training size in pixels (frames are resized).

    num_frames (f) and num_motion_frames (n): stage 1 uses 1 and 0. audio_features: "prepared" (the
    wav2vec2 features cached by `prepare --wav2vec`) or "compute" (computed once at start with the model's
    own audio encoder, under `output_dir/audio_features`). mask_expand: face box scale for the face mask.
    samples_per_clip: samples drawn from each clip per epoch (each with its own random window/reference).
    """

    root: str | list[str] = "data/prepared"
    resolution: int = 512
    num_frames: int = 12
    num_motion_frames: int = 4
    audio_features: str = "prepared"
    mask_expand: float = 1.2
    samples_per_clip: int = 1
    num_workers: int = 4


@dataclass
class ConditionDropout:
    """Probabilities (per sample) of replacing a condition by zeros, the 'null' condition of inference.

    reference and audio train the unconditional branches of classifier-free guidance; motion trains the
    first clip of a video, whose motion frames are zero maps.
    """

    reference: float = 0.05
    audio: float = 0.05
    motion: float = 0.1


@dataclass
class OptimConfig:
    """What trains and how. lr in 1/step units of the optimiser; batch_size per device per micro-step."""

    trainable: list[str] = field(default_factory=lambda: ["backbone", "reference_net", "face_locator"])
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 30_000
    # > 0: also stop (checkpoint, export) at the first step after this many minutes of this run
    max_minutes: float = 0.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    condition_dropout: ConditionDropout = field(default_factory=ConditionDropout)
    mouth_drive_lr_scale: float = 1.0  # the backbone's mouth-drive conv learns at this times learning_rate
    mouth_weight: float = 0.0  # extra loss weight on the mouth region (loss x (1 + w) there); 0: plain MSE
    ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 42


@dataclass
class CheckpointConfig:
    """A checkpoint every `every` optimiser steps (and at the last step); the newest `keep` are kept."""

    every: int = 500
    keep: int = 3


@dataclass
class ValidationConfig:
    """A validation video every `every` steps (0: never): fixed portrait, audio (first max_seconds), seed.

    face_embedding: models with identity tokens (converted Hallo models): a .npy file with the portrait's
    512-d face embedding; None gives the null identity (a zero embedding), as training without embeddings.
    """

    every: int = 0
    image: str | None = None
    audio: str | None = None
    face_embedding: str | None = None
    max_seconds: float = 2.0
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    head_speed: float = 1.0
    seed: int = 0


@dataclass
class Config:
    """stage: 1 (image), 2 (video + audio), 3 (speed). output_dir holds checkpoints, logs, the export."""

    stage: int
    output_dir: str
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        sources = [k for k in ("pipeline", "base_models", "model") if getattr(self.init, k) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"init: set exactly one of pipeline, base_models, model; got {sources or 'none'}"
            )
        if self.stage == 1 and (self.data.num_frames != 1 or self.data.num_motion_frames != 0):
            raise ValueError(
                "stage 1 trains on single frames: set data.num_frames: 1 and data.num_motion_frames: 0"
            )
        if self.stage > 1 and self.data.num_frames < 2:
            raise ValueError(
                f"stages 2-3 train on clips: data.num_frames must be >= 2, got {self.data.num_frames}"
            )
        if self.data.audio_features not in ("prepared", "compute"):
            raise ValueError(
                f"data.audio_features must be 'prepared' or 'compute', got {self.data.audio_features!r}"
            )
        if self.train.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"train.mixed_precision must be no, fp16 or bf16, got {self.train.mixed_precision!r}"
            )
        if self.validation.every and not (self.validation.image and self.validation.audio):
            raise ValueError("validation.every > 0 needs validation.image and validation.audio")
        parameter_matcher(self.train.trainable)  # raises on unknown groups

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: dict[str, Any], where: str):
    """Nested dict -> dataclass `cls`, recursing into dataclass-typed fields; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        nested = {
            "init": InitConfig,
            "data": DataConfig,
            "train": OptimConfig,
            "checkpointing": CheckpointConfig,
            "validation": ValidationConfig,
            "condition_dropout": ConditionDropout,
        }.get(name)
        if nested:
            value = _build(nested, value, f"{where}.{name}".strip("."))
        elif fields[name].type == "float" and isinstance(value, int | str) and not isinstance(value, bool):
            try:  # YAML reads 1e-6 (no dot) as a string and 2 as an int
                value = float(value)
            except ValueError:
                raise ValueError(f"{where}.{name}: expected a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def set_override(values: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` override (value parsed as YAML) to a nested config dict in place."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    *parents, last = key.strip().split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a stage YAML file, apply `key.path=value` overrides, validate."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    for assignment in overrides:
        set_override(values, assignment)
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")

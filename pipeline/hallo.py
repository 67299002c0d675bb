"""Hallo's trained weights in EmoPipeline: its network as configuration of our models, and the converter.

Hallo (Fudan, MIT; Hallo2 and JoyHallo share the network) is the open model closest to EMO's design. A
converted folder runs through the same `EmoPipeline`, CLI and app, and reproduces what Hallo's own
`scripts/inference.py` computes from the same inputs. This module is the one place that says how Hallo's
network differs from an EMO-native one: the config values below (each with its reason) and the key map of
`hallo/net.pth`.

`convert_hallo(release, output)` reads a folder laid out like Hallo's published `pretrained_models/`
(`hallo/net.pth`, `stable-diffusion-v1-5/unet/`, `sd-vae-ft-mse/`, `motion_module/mm_sd_v15_v2.ckpt`,
`wav2vec/wav2vec2-base-960h/`, optional `face_analysis/`) and writes an `EmoPipeline` folder in safetensors.
Every tensor of net.pth is mapped or listed as unused with its reason; an unknown key or a shape mismatch
is an error naming the key. net.pth overrides the base UNet and the motion module where both hold a tensor.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .behaviour import Behaviour

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ Hallo as configuration
# The ReferenceNet and the backbone: SD 1.5's structure (from the release's unet/config.json) plus these.
HALLO_UNET = dict(
    reference_attention="concat",  # reference tokens join attn1's keys/values; attn2 reads identity tokens
)
HALLO_BACKBONE = dict(
    audio_attention_type="region",  # audio modules after each spatial transformer, full/face/lip branches
    motion_num_attention_heads=8,  # AnimateDiff's motion modules: 8 heads
    motion_norm_num_groups=32,  # AnimateDiff's GroupNorm: 32 groups whatever the UNet's setting
    motion_norm_per_frame=True,  # AnimateDiff's original GroupNorm normalises each frame on its own
    motion_stored_positions=True,  # the position tables are saved buffers of net.pth (2 per module)
    motion_frame_features="attention",  # motion frames are the ReferenceNet's norm1 tokens of the same layer
    # Hallo's released inference runs its UNet in training mode with gradient checkpointing, a code path on
    # which blocks without attention (DownBlock3D, UpBlock3D) skip their motion modules: 5 modules never run
    motion_in_plain_blocks=False,
    speed_dim=None,  # no speed layers (stage 3 of `training` can add them)
)
HALLO_FACE_LOCATOR = dict(block_layout="pairs")  # a same-width conv before each strided one; RGB box mask
HALLO_BEHAVIOUR = Behaviour(
    audio_features="hallo",  # normalise whole, pad to whole clips, CNN features at 25 fps before the transformer
    guidance="joint",  # one unconditional branch: no reference, zero audio, null identity, no face locator
    first_motion_frames="reference",  # the first clip's 2 motion frames are copies of the portrait
    motion_frames="decoded",  # later: the previous clip's last 2 decoded frames, VAE-encoded again
    image_resample="bilinear",  # torchvision's Resize on the PIL portrait
    reference_identity_interleave=True,  # [ref, m1, m2] x 2 rows with identity tokens [u, c, u, c, u, c]
    reference_fp16=True,  # the reference bank is copied with .to(float16) whatever the weights' dtype
    reference_frames_alternate=True,  # frame i reads the bank row of the ref with null (even i) / cond identity
    renormalise_bright_batch=True,  # [ref, motion] pixels with no negative value: normalised twice (2x - 1)
)
HALLO_GENERATION_DEFAULTS = dict(
    num_inference_steps=40,
    guidance_scale=3.5,
    reference_guidance_scale=1.0,  # unused under joint guidance
    fps=25,
    clip_length=16,
    num_motion_frames=2,
)
HALLO_SCHEDULER = dict(  # DDIM, v-prediction, zero terminal SNR, trailing spacing, LINEAR betas
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)
PREFIXES = {  # net.pth prefix -> EmoPipeline component
    "reference_unet.": "reference_net",
    "denoising_unet.": "denoising_unet",
    "face_locator.": "face_locator",
    "imageproj.": "identity_projection",
    "audioproj.": "audio_projection",
}
RELEASE_PATHS = dict(
    net="hallo/net.pth",
    unet="stable-diffusion-v1-5/unet",
    vae="sd-vae-ft-mse",
    motion_module="motion_module/mm_sd_v15_v2.ckpt",
    wav2vec="wav2vec/wav2vec2-base-960h",
    face_analysis="face_analysis",
)
UNUSED_PLAIN_MOTION = (
    "motion module of a block without attention: Hallo's inference (training-mode checkpointing path) "
    "never runs it"
)
_ANIMATEDIFF_NAMES = (
    (".temporal_transformer.", "."),
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
)
_POSITION = re.compile(r"^(.*\.transformer_blocks\.\d+)\.attention_blocks\.([01])\.pos_encoder\.pe$")


class ConversionError(ValueError):
    """A release that cannot be converted: the message names the key or file and the fix."""


@dataclass
class ConversionReport:
    """What the converter did with every tensor of net.pth (and what came from the base files)."""

    mapped: dict[str, str] = field(default_factory=dict)  # net.pth key -> component.key
    unused: dict[str, str] = field(default_factory=dict)  # net.pth key -> why
    from_base: dict[str, str] = field(default_factory=dict)  # component.key -> base file it came from

    def summary(self) -> str:
        return (
            f"{len(self.mapped)} tensors of net.pth mapped, {len(self.unused)} unused "
            f"({len(set(self.unused.values()))} reasons), {len(self.from_base)} taken from the base files"
        )


def map_denoising_key(key: str) -> tuple[str, int | None]:
    """A denoising_unet key of net.pth (AnimateDiff motion-module names) -> our key, and for a position
    table the index (0 or 1) of the attention it belongs to."""
    found = _POSITION.match(key)
    if found:
        key = f"{found.group(1)}.pe"
        index = int(found.group(2))
    else:
        index = None
    if ".motion_modules." in key:
        for old, new in _ANIMATEDIFF_NAMES:
            key = key.replace(old, new)
    return key, index


def _plain_block_motion(key: str, down_types, up_types) -> bool:
    found = re.match(r"^(down|up)_blocks\.(\d+)\.motion_modules\.", key)
    if not found:
        return False
    kinds = down_types if found.group(1) == "down" else up_types
    return not kinds[int(found.group(2))].startswith("CrossAttn")


def read_net(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """net.pth -> {prefix: {key without prefix: tensor}}; an unknown prefix is an error naming the key."""
    if not path.is_file():
        raise ConversionError(
            f"net.pth not found at {path}: pass --release with Hallo's folder or --net FILE"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in PREFIXES}
    for key, value in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ConversionError(f"net.pth: unmapped key {key!r} (known prefixes: {', '.join(PREFIXES)})")
        groups[prefix][key[len(prefix) :]] = value
    for prefix, values in groups.items():
        if not values:
            raise ConversionError(f"net.pth has no {prefix}* tensors: is it Hallo's net.pth?")
    return groups


def model_configs(unet_config: dict, groups: dict[str, dict[str, torch.Tensor]], wav2vec_config) -> dict:
    """The configs of every converted component, from the SD config and net.pth's tensor shapes."""
    from .loading import _unet_config_from_sd

    unet = _unet_config_from_sd(unet_config) | HALLO_UNET
    den, image, audio, face = (
        groups[p] for p in ("denoising_unet.", "imageproj.", "audioproj.", "face_locator.")
    )
    identity_dim = image["norm.weight"].shape[0]
    unet["cross_attention_dim"] = identity_dim
    unet["in_channels"] = den["conv_in.weight"].shape[1]
    backbone = dict(HALLO_BACKBONE)
    backbone["out_channels"] = den["conv_out.weight"].shape[0]
    audio_dim = audio["norm.weight"].shape[0]
    backbone["audio_dim"] = audio_dim
    if not any(".attn2_1." in k for k in den):
        backbone["audio_attention_type"] = "region_shared"  # JoyHallo: one audio attention per module
    tables = [v for k, v in den.items() if k.endswith("pos_encoder.pe")]
    if tables:
        backbone["motion_max_seq_length"] = tables[0].shape[1]
    layers, hidden = wav2vec_config.num_hidden_layers, wav2vec_config.hidden_size
    window_values = audio["proj1.weight"].shape[1]
    if window_values % (layers * hidden) or (window_values // (layers * hidden)) % 2 == 0:
        raise ConversionError(
            f"audioproj.proj1.weight takes {window_values} values per frame, not a window of "
            f"{layers} layers x {hidden} features of the wav2vec2 model given: pass its --wav2vec"
        )
    intermediate = audio["proj1.weight"].shape[0]
    steps = [face["conv_in.weight"]] + [
        face[f"blocks.{i}.weight"] for i in range(1, 64, 2) if f"blocks.{i}.weight" in face
    ]
    return dict(
        reference_net=unet,
        denoising_unet=unet | backbone,
        face_locator=dict(
            conditioning_channels=face["conv_in.weight"].shape[1],
            block_out_channels=tuple(w.shape[0] for w in steps),
            embedding_channels=face["conv_out.weight"].shape[0],
            **HALLO_FACE_LOCATOR,
        ),
        audio_projection=dict(
            window=(window_values // (layers * hidden) - 1) // 2,
            num_layers=layers,
            feature_dim=hidden,
            intermediate_dim=intermediate,
            output_dim=audio_dim,
            context_tokens=audio["proj3.weight"].shape[0] // audio_dim,
        ),
        identity_projection=dict(
            embedding_dim=image["proj.weight"].shape[1],
            cross_attention_dim=identity_dim,
            num_tokens=image["proj.weight"].shape[0] // identity_dim,
        ),
    )


def _read_base(unet_dir: Path | None, motion_path: Path | None) -> tuple[dict, dict]:
    """The base SD UNet and AnimateDiff tensors (either may be absent: net.pth usually holds everything)."""
    unet, motion = {}, {}
    if unet_dir is not None:
        weights = [
            unet_dir / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        ]
        found = next((w for w in weights if w.is_file()), None)
        if found is not None and found.suffix == ".safetensors":
            from safetensors.torch import load_file

            unet = load_file(found)
        elif found is not None:
            unet = torch.load(found, map_location="cpu", weights_only=True)
    if motion_path is not None and motion_path.is_file():
        motion = torch.load(motion_path, map_location="cpu", weights_only=True)
        motion = motion.get("state_dict", motion)
    return unet, motion


def load_component(
    name: str,
    model: torch.nn.Module,
    source: dict[str, torch.Tensor],
    report: ConversionReport,
    prefix: str,
    base: dict[str, tuple[str, torch.Tensor]] | None = None,
    unused: dict[str, str] | None = None,
    key_map=None,
) -> None:
    """Copy `source` (net.pth keys without prefix) into `model` by name and shape; strict both ways.

    base: our key -> (file, tensor) for keys net.pth lacks; unused: net.pth keys to skip -> why.
    key_map: net.pth key -> (our key, index into our tensor's first axis or None).
    """
    target = model.state_dict()
    filled: set[str] = set()
    for key, value in source.items():
        if unused and key in unused:
            report.unused[prefix + key] = unused[key]
            continue
        ours, index = key_map(key) if key_map else (key, None)
        if ours not in target:
            raise ConversionError(
                f"net.pth: unmapped key {prefix + key!r} (no {name}.{ours} in the converted model)"
            )
        want = target[ours].shape[1:] if index is not None else target[ours].shape
        if tuple(value.shape[1:] if index is not None else value.shape) != tuple(want):
            raise ConversionError(
                f"net.pth: {prefix + key!r} has shape {tuple(value.shape)}, {name}.{ours} needs {tuple(want)}"
            )
        with torch.no_grad():
            if index is None:
                target[ours].copy_(value)
            else:
                target[ours][index].copy_(value[0])
        filled.add(ours)
        report.mapped[prefix + key] = f"{name}.{ours}"
    for ours in sorted(set(target) - filled):
        if base and ours in base and tuple(base[ours][1].shape) == tuple(target[ours].shape):
            with torch.no_grad():
                target[ours].copy_(base[ours][1])
            report.from_base[f"{name}.{ours}"] = base[ours][0]
        else:
            raise ConversionError(
                f"{name}.{ours} is in neither net.pth ({prefix}...) nor the base files: is the release complete?"
            )
    model.load_state_dict(target)


def hallo_pipeline(models: dict, vae, audio_encoder, feature_extractor):
    """An `EmoPipeline` of Hallo's networks (`models`: reference_net, denoising_unet, face_locator,
    identity_projection, audio_projection) with Hallo's scheduler, generation defaults and behaviour."""
    from diffusers import DDIMScheduler

    from .pipeline_emo import EmoPipeline

    return EmoPipeline(
        vae=vae,
        audio_encoder=audio_encoder,
        feature_extractor=feature_extractor,
        speed_encoder=None,
        scheduler=DDIMScheduler(**HALLO_SCHEDULER),
        generation_defaults=HALLO_GENERATION_DEFAULTS,
        behaviour=HALLO_BEHAVIOUR.to_config(),
        **models,
    )


def convert_hallo(
    release: str | Path | None,
    output: str | Path,
    *,
    net: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    motion_module: str | Path | None = None,
    wav2vec: str | Path | None = None,
    face_analysis: str | Path | None = None,
    dtype: str = "fp16",
) -> ConversionReport:
    """Convert Hallo's released files (offline) into an `EmoPipeline` folder at `output`.

    release: a folder laid out like Hallo's `pretrained_models/`; the keyword paths override single files
    (e.g. `net=` Hallo2's or JoyHallo's net.pth, `wav2vec=` JoyHallo's Chinese wav2vec2).
    """
    from diffusers import AutoencoderKL
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from .models import AudioProjection, EmoUNet3DModel, FaceLocator, IdentityProjection, ReferenceNet

    if dtype not in ("fp16", "fp32", "bf16"):
        raise ConversionError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    root = Path(release) if release is not None else None
    given = dict(
        net=net, unet=unet, vae=vae, motion_module=motion_module, wav2vec=wav2vec, face_analysis=face_analysis
    )
    paths = {
        name: Path(given[name]) if given[name] is not None else (root / rel if root is not None else None)
        for name, rel in RELEASE_PATHS.items()
    }
    for name in ("net", "unet", "vae", "wav2vec"):
        if paths[name] is None or not paths[name].exists():
            raise ConversionError(
                f"{name}: {paths[name]} not found; pass --release with Hallo's pretrained_models folder "
                f"(it holds {RELEASE_PATHS[name]}) or --{name.replace('_', '-')} PATH"
            )
    unet_config_file = paths["unet"] / "config.json"
    if not unet_config_file.is_file():
        raise ConversionError(f"unet: {unet_config_file} not found (SD 1.5's unet/config.json)")
    unet_config = json.loads(unet_config_file.read_text())

    groups = read_net(paths["net"])
    try:
        encoder = Wav2Vec2Model.from_pretrained(paths["wav2vec"])
    except OSError as error:
        raise ConversionError(
            f"wav2vec: cannot load a Wav2Vec2Model from {paths['wav2vec']}: {error}"
        ) from error
    try:
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(paths["wav2vec"])
    except OSError:
        feature_extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    configs = model_configs(unet_config, groups, encoder.config)

    report = ConversionReport()
    base_unet, base_motion = _read_base(paths["unet"], paths["motion_module"])
    unet_file = str(paths["unet"])
    motion_file = str(paths["motion_module"])

    reference_net = ReferenceNet(**configs["reference_net"])
    load_component(
        "reference_net", reference_net, groups["reference_unet."], report, "reference_unet.",
        base={k: (unet_file, v) for k, v in base_unet.items()},
    )  # fmt: skip

    denoising_unet = EmoUNet3DModel(**configs["denoising_unet"])
    down_types, up_types = (
        configs["denoising_unet"]["down_block_types"],
        configs["denoising_unet"]["up_block_types"],
    )
    den = groups["denoising_unet."]
    skipped = {k: UNUSED_PLAIN_MOTION for k in den if _plain_block_motion(k, down_types, up_types)}
    base = {k: (unet_file, v) for k, v in base_unet.items()}
    for key, value in base_motion.items():  # AnimateDiff's tables: one per attention, like net.pth's
        ours, index = map_denoising_key(key)
        if index is None:
            base[ours] = (motion_file, value)
    load_component(
        "denoising_unet", denoising_unet, den, report, "denoising_unet.",
        base=base, unused=skipped, key_map=map_denoising_key,
    )  # fmt: skip

    face_locator = FaceLocator(**configs["face_locator"])
    load_component("face_locator", face_locator, groups["face_locator."], report, "face_locator.")
    identity = IdentityProjection(**configs["identity_projection"])
    load_component("identity_projection", identity, groups["imageproj."], report, "imageproj.")
    audio_projection = AudioProjection(**configs["audio_projection"])
    load_component("audio_projection", audio_projection, groups["audioproj."], report, "audioproj.")

    try:
        vae_model = AutoencoderKL.from_pretrained(paths["vae"])
    except OSError as error:
        raise ConversionError(f"vae: cannot load an AutoencoderKL from {paths['vae']}: {error}") from error
    pipe = hallo_pipeline(
        dict(
            reference_net=reference_net,
            denoising_unet=denoising_unet,
            face_locator=face_locator,
            identity_projection=identity,
            audio_projection=audio_projection,
        ),
        vae_model,
        encoder,
        feature_extractor,
    )
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    # the audio encoder stays in float32, as Hallo runs it; nn.Module.to skips diffusers' cast warning
    for name in (
        "vae",
        "reference_net",
        "denoising_unet",
        "face_locator",
        "audio_projection",
        "identity_projection",
    ):
        if torch_dtype != torch.float32:
            torch.nn.Module.to(getattr(pipe, name), torch_dtype)
    out = Path(output)
    pipe.save_pretrained(out, safe_serialization=True)
    if paths["face_analysis"] is not None and paths["face_analysis"].is_dir():
        shutil.copytree(paths["face_analysis"], out / "face_analysis", dirs_exist_ok=True)
    (out / "conversion_report.json").write_text(
        json.dumps(
            {
                "summary": report.summary(),
                "mapped": report.mapped,
                "unused": report.unused,
                "from_base": report.from_base,
            },
            indent=1,
        )
    )
    logger.info("Hallo -> %s: %s", out, report.summary())
    return report

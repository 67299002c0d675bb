"""Building an EmoPipeline: from size configs (random weights) or from the open base models (untrained EMO).

`build_pipeline("tiny" | "sd15" | dict)` makes every component from a config: the tests use "tiny", the
trainer can start a small model from scratch. `from_base_models` fills the SD 1.5-shaped networks from real
weight files, offline: an SD 1.5 UNet (into ReferenceNet and backbone), a VAE, an AnimateDiff motion module
(original `mm_sd_v15_v2.ckpt` keys or a diffusers `MotionAdapter` folder) and a wav2vec2 folder.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .models import AudioProjection, EmoUNet3DModel, FaceLocator, MelAudioEncoder, ReferenceNet, SpeedEncoder

logger = logging.getLogger(__name__)

# DDIM with v-prediction on a zero-terminal-SNR schedule (as the open peers Animate Anyone / Hallo train).
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)

CONFIGS: dict[str, dict] = {
    # a few MB: the whole pipeline runs on a CPU in seconds at 32x32 (tests)
    "tiny": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        "backbone": dict(audio_dim=32, motion_num_attention_heads=4, motion_norm_num_groups=8, speed_dim=32),
        "vae": dict(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        "audio_encoder": dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        "audio_projection": dict(intermediate_dim=64, output_dim=32, context_tokens=4),
        "speed_encoder": dict(hidden_dim=32, output_dim=32),
        "face_locator": dict(block_out_channels=(8, 16)),
    },
    # EMO's size: SD 1.5 UNets, SD VAE, wav2vec2-base
    "sd15": {
        "unet": {},
        "backbone": {},
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        ),
        "audio_encoder": {},
        "audio_projection": {},
        "speed_encoder": {},
        "face_locator": {},
    },
}


def _derived_configs(cfg: dict, vae_scale: int, unet_channels: int, audio_cfg) -> dict:
    """Fill in the sizes that follow from other components (so a config names each size once)."""
    cfg = copy.deepcopy(cfg)
    audio_dim = cfg["backbone"].get("audio_dim", 768)
    cfg["audio_projection"] = (
        dict(
            num_layers=audio_cfg.num_hidden_layers + 1,
            feature_dim=audio_cfg.hidden_size,
            output_dim=audio_dim,
        )
        | cfg["audio_projection"]
    )
    cfg["speed_encoder"] = dict(output_dim=cfg["backbone"].get("speed_dim", 256)) | cfg["speed_encoder"]
    steps = int(math.log2(vae_scale))
    cfg["face_locator"] = (
        dict(block_out_channels=tuple(16 * 2**i for i in range(steps + 1)), embedding_channels=unet_channels)
        | cfg["face_locator"]
    )
    return cfg


def build_pipeline(config: str | dict = "tiny", pipeline_cls=None):
    """A pipeline with randomly initialised components of the named size ("tiny", "sd15") or a config dict."""
    from .pipeline_emo import EmoPipeline

    pipeline_cls = pipeline_cls or EmoPipeline
    cfg = copy.deepcopy(CONFIGS[config] if isinstance(config, str) else config)
    vae = AutoencoderKL(**cfg["vae"])
    # audio_encoder: wav2vec2 sizes, or {"type": "mel", ...} for the small log-mel encoder
    audio_kwargs = dict(cfg["audio_encoder"])
    if audio_kwargs.pop("type", "wav2vec2") == "mel":
        audio_encoder = MelAudioEncoder(**audio_kwargs)
    else:
        audio_encoder = Wav2Vec2Model(Wav2Vec2Config(**audio_kwargs))
    audio_cfg = audio_encoder.config
    unet_cfg = cfg["unet"]
    reference_net = ReferenceNet(**unet_cfg)
    denoising_unet = EmoUNet3DModel(**unet_cfg, **cfg["backbone"])
    cfg = _derived_configs(cfg, 2 ** (len(vae.config.block_out_channels) - 1),
                           denoising_unet.config.block_out_channels[0], audio_cfg)  # fmt: skip
    pipe = pipeline_cls(
        vae=vae,
        reference_net=reference_net,
        denoising_unet=denoising_unet,
        face_locator=FaceLocator(**cfg["face_locator"]),
        audio_encoder=audio_encoder,
        feature_extractor=Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False),
        audio_projection=AudioProjection(**cfg["audio_projection"]),
        speed_encoder=SpeedEncoder(**cfg["speed_encoder"]),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )
    return _eval(pipe)


def _eval(pipe):
    """Inference mode for every network, as `from_pretrained` leaves them (training turns on what it trains)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


# ---------------------------------------------------------------------------------------------- base weights
@dataclass
class LoadReport:
    """What `from_base_models` did with every tensor, per target component."""

    loaded: dict[str, list[str]] = field(default_factory=dict)  # component -> keys copied with their values
    initialised: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> key -> how
    new: dict[str, list[str]] = field(default_factory=dict)  # component -> keys with fresh initialisation
    unused: dict[str, list[str]] = field(default_factory=dict)  # source -> keys not used

    def summary(self) -> str:
        lines = []
        for name in sorted(set(self.loaded) | set(self.new) | set(self.initialised)):
            lines.append(
                f"{name}: {len(self.loaded.get(name, []))} tensors loaded, "
                f"{len(self.initialised.get(name, {}))} initialised from other loaded tensors, "
                f"{len(self.new.get(name, []))} new"
            )
        for source, keys in sorted(self.unused.items()):
            lines.append(
                f"{source}: {len(keys)} tensors unused ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})"
            )
        return "\n".join(lines)


def _resolve(path_or_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local file/folder as is; otherwise a hub id, downloaded first (custom classes load from folders)."""
    path = Path(path_or_id)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id), allow_patterns=allow_patterns))


def _subfolder(path: Path, name: str) -> Path:
    """A whole SD 1.5 folder or the component's own folder."""
    return path / name if (path / name / "config.json").is_file() else path


def _unet_config_from_sd(config) -> dict:
    if (
        config.get("use_linear_projection")
        or config.get("addition_embed_type")
        or config.get("class_embed_type")
    ):
        raise ValueError("unet: only SD 1.x-style UNets (conv projections, no added embeddings) can seed EMO")
    tlpb = config.get("transformer_layers_per_block", 1)
    if not isinstance(tlpb, int):
        raise ValueError(f"unet: transformer_layers_per_block must be one int, got {tlpb}")
    return dict(
        sample_size=config["sample_size"],
        in_channels=config["in_channels"],
        down_block_types=tuple(config["down_block_types"]),
        up_block_types=tuple(config["up_block_types"]),
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        attention_head_dim=config.get("num_attention_heads") or config["attention_head_dim"],
        norm_num_groups=config["norm_num_groups"],
        norm_eps=config["norm_eps"],
        transformer_layers_per_block=tlpb,
        flip_sin_to_cos=config["flip_sin_to_cos"],
        freq_shift=config["freq_shift"],
    )


def load_2d_weights(
    model: torch.nn.Module, source: dict[str, torch.Tensor], name: str, report: LoadReport
) -> None:
    """Copy SD 1.5 UNet tensors into an EMO UNet by name and shape.

    Reference-attention keys/values (`attn2.to_k/to_v`) take the place of text cross-attention, whose
    input size (768, CLIP text) no longer fits: they start as copies of the same block's self-attention
    keys/values, so reference-attention first behaves like attention over the reference's features.
    """
    target = model.state_dict()
    update, loaded, initialised = {}, [], {}
    for key, value in target.items():
        if key in source and source[key].shape == value.shape:
            update[key] = source[key]
            loaded.append(key)
        elif ".attn2.to_k." in key or ".attn2.to_v." in key:
            twin = key.replace(".attn2.", ".attn1.")
            if twin in source and source[twin].shape == value.shape:
                update[key] = source[twin]
                initialised[key] = (
                    f"copy of {twin} (text cross-attention {tuple(source[key].shape)} does not fit)"
                )
    model.load_state_dict(update, strict=False)
    report.loaded.setdefault(name, []).extend(loaded)
    report.initialised.setdefault(name, {}).update(initialised)
    report.new[name] = sorted(set(target) - set(update))
    report.unused[f"unet->{name}"] = sorted(k for k in source if k not in target)


def convert_animatediff_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AnimateDiff's original motion-module keys (mm_sd_v15_v2.ckpt) -> diffusers `MotionAdapter` keys."""
    converted = {}
    for key, value in state_dict.items():
        if "pos_encoder" in key:
            continue  # the sinusoidal table is recomputed
        new = (
            key.replace(".temporal_transformer", "")
            .replace(".attention_blocks.0", ".attn1")
            .replace(".attention_blocks.1", ".attn2")
            .replace(".norms.0", ".norm1")
            .replace(".norms.1", ".norm2")
            .replace(".ff_norm", ".norm3")
        )
        converted[new] = value
    return converted


def read_motion_module(path_or_id: str | Path) -> dict[str, torch.Tensor]:
    """A motion module in either layout -> diffusers `MotionAdapter` keys (without position tables)."""
    path = _resolve(path_or_id)
    if path.is_dir():
        adapter = MotionAdapter.from_pretrained(path)
        return {k: v for k, v in adapter.state_dict().items() if not k.endswith("pos_embed.pe")}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("state_dict", state_dict)
    return convert_animatediff_keys(state_dict)


def load_motion_module(
    backbone: EmoUNet3DModel, path_or_id: str | Path, report: LoadReport | None = None
) -> LoadReport:
    """Load AnimateDiff temporal weights into the backbone's motion modules (speed layers stay new)."""
    report = report or LoadReport()
    source = read_motion_module(path_or_id)
    target = backbone.state_dict()
    mismatched = [k for k in source if k in target and source[k].shape != target[k].shape]
    if mismatched:
        raise ValueError(
            f"motion_module: {len(mismatched)} tensors have other shapes than the backbone's, e.g. {mismatched[0]}"
        )
    update = {k: v for k, v in source.items() if k in target}
    backbone.load_state_dict(update, strict=False)
    report.loaded.setdefault("denoising_unet", []).extend(sorted(update))
    if "denoising_unet" in report.new:  # after load_2d_weights: these are no longer new
        report.new["denoising_unet"] = sorted(set(report.new["denoising_unet"]) - set(update))
    report.unused["motion_module"] = sorted(k for k in source if k not in target)
    return report


def from_base_models(
    pipeline_cls,
    *,
    unet: str | Path,
    vae: str | Path,
    audio_encoder: str | Path,
    motion_module: str | Path | None = None,
    backbone_config: dict | None = None,
    dtype: torch.dtype | None = None,
    return_report: bool = False,
):
    """Build an untrained EMO from base weights (local folders/files, or hub ids downloaded first).

    unet: an SD 1.5 folder (with `unet/`) or its `unet` folder -> ReferenceNet and backbone;
    vae: an `AutoencoderKL` folder (e.g. sd-vae-ft-mse, or an SD folder with `vae/`);
    motion_module: AnimateDiff `mm_sd_v15_v2.ckpt` (original keys) or a diffusers `MotionAdapter` folder;
    audio_encoder: a wav2vec2 folder (`Wav2Vec2Model` + its preprocessor config).
    New layers (audio-attention, speed layers, face locator, audio projection) start with zero output or
    random weights; `return_report=True` also returns the `LoadReport` of what loaded and what is new.
    """
    report = LoadReport()
    unet_path = _subfolder(_resolve(unet, ["unet/*", "*.json", "*.safetensors"]), "unet")
    sd_unet = UNet2DConditionModel.from_pretrained(unet_path)
    source = sd_unet.state_dict()
    unet_cfg = _unet_config_from_sd(sd_unet.config)
    del sd_unet

    audio_path = _resolve(audio_encoder)
    encoder = Wav2Vec2Model.from_pretrained(audio_path)
    try:
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(audio_path)
    except OSError:
        logger.warning("audio_encoder: no preprocessor_config.json, using wav2vec2's default normalisation")
        feature_extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)

    reference_net = ReferenceNet(**unet_cfg)
    backbone_cfg = dict(audio_dim=768) | (backbone_config or {})
    denoising_unet = EmoUNet3DModel(**unet_cfg, **backbone_cfg)
    load_2d_weights(reference_net, source, "reference_net", report)
    load_2d_weights(denoising_unet, source, "denoising_unet", report)
    del source
    if motion_module is not None:
        load_motion_module(denoising_unet, motion_module, report)

    vae_model = AutoencoderKL.from_pretrained(_subfolder(_resolve(vae), "vae"))
    cfg = _derived_configs(
        {"backbone": backbone_cfg, "audio_projection": {}, "speed_encoder": {}, "face_locator": {}},
        2 ** (len(vae_model.config.block_out_channels) - 1),
        unet_cfg["block_out_channels"][0],
        encoder.config,
    )
    pipe = pipeline_cls(
        vae=vae_model,
        reference_net=reference_net,
        denoising_unet=denoising_unet,
        face_locator=FaceLocator(**cfg["face_locator"]),
        audio_encoder=encoder,
        feature_extractor=feature_extractor,
        audio_projection=AudioProjection(**cfg["audio_projection"]),
        speed_encoder=SpeedEncoder(**cfg["speed_encoder"]),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )
    _eval(pipe)
    if dtype is not None:
        pipe.to(dtype=dtype)
    logger.info("EMO from base models:\n%s", report.summary())
    return (pipe, report) if return_report else pipe

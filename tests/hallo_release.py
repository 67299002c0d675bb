"""A tiny random release in the on-disk layout of Hallo's `pretrained_models/`, for the converter's tests.

Key names and shapes of `hallo/net.pth` follow Hallo's network as published (see docs/hallo_port.md): the
2-D parts are diffusers' SD UNet names, the motion modules AnimateDiff's original names with their position
tables, the audio modules Hallo's (with its width rule), and its face locator / image / audio projections.
Nothing here imports the project's models, so the converter is checked against the layout, not itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=16,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
TINY_WAV2VEC = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
TINY_SIZES = dict(
    audio_dim=16, audio_tokens=4, intermediate=32, identity_tokens=4, face_channels=(8, 16, 16, 16)
)


def _motion_module(prefix: str, c: int, table: int) -> dict[str, tuple]:
    t = f"{prefix}.temporal_transformer"
    b = f"{t}.transformer_blocks.0"
    shapes = {
        f"{t}.norm.weight": (c,),
        f"{t}.norm.bias": (c,),
        f"{t}.proj_in.weight": (c, c),
        f"{t}.proj_in.bias": (c,),
    }
    for a in (0, 1):
        for m in ("to_q", "to_k", "to_v"):
            shapes[f"{b}.attention_blocks.{a}.{m}.weight"] = (c, c)
        shapes[f"{b}.attention_blocks.{a}.to_out.0.weight"] = (c, c)
        shapes[f"{b}.attention_blocks.{a}.to_out.0.bias"] = (c,)
        shapes[f"{b}.attention_blocks.{a}.pos_encoder.pe"] = (1, table, c)
        shapes[f"{b}.norms.{a}.weight"] = shapes[f"{b}.norms.{a}.bias"] = (c,)
    shapes |= {
        f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
        f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,),
        f"{b}.ff_norm.weight": (c,), f"{b}.ff_norm.bias": (c,),
        f"{t}.proj_out.weight": (c, c), f"{t}.proj_out.bias": (c,),
    }  # fmt: skip
    return shapes


def _audio_module(prefix: str, c: int, d: int, audio_dim: int, branches: int) -> dict[str, tuple]:
    b = f"{prefix}.transformer_blocks.0"
    shapes = {
        f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
        f"{prefix}.proj_in.weight": (d, c, 1, 1), f"{prefix}.proj_in.bias": (d,),
        f"{prefix}.proj_out.weight": (c, d, 1, 1), f"{prefix}.proj_out.bias": (c,),
        f"{b}.attn1.to_q.weight": (d, d), f"{b}.attn1.to_k.weight": (d, d), f"{b}.attn1.to_v.weight": (d, d),
        f"{b}.attn1.to_out.0.weight": (d, d), f"{b}.attn1.to_out.0.bias": (d,),
        f"{b}.ff.net.0.proj.weight": (8 * d, d), f"{b}.ff.net.0.proj.bias": (8 * d,),
        f"{b}.ff.net.2.weight": (d, 4 * d), f"{b}.ff.net.2.bias": (d,),
    }  # fmt: skip
    for n in ("norm1", "norm2", "norm3"):
        shapes[f"{b}.{n}.weight"] = shapes[f"{b}.{n}.bias"] = (d,)
    for k in range(branches):
        shapes |= {
            f"{b}.attn2_{k}.to_q.weight": (d, d), f"{b}.attn2_{k}.to_k.weight": (d, audio_dim),
            f"{b}.attn2_{k}.to_v.weight": (d, audio_dim), f"{b}.attn2_{k}.to_out.0.weight": (d, d),
            f"{b}.attn2_{k}.to_out.0.bias": (d,),
        }  # fmt: skip
    for region in ("full", "face", "lip"):
        shapes[f"{b}.zero_conv_{region}.weight"] = (d, d, 1, 1)
        shapes[f"{b}.zero_conv_{region}.bias"] = (d,)
    return shapes


def hallo_net_shapes(
    unet_config: dict,
    *,
    wav2vec_layers: int,
    wav2vec_hidden: int,
    audio_dim: int = 768,
    audio_tokens: int = 32,
    intermediate: int = 512,
    identity_tokens: int = 4,
    embedding_dim: int = 512,
    face_channels: tuple[int, ...] = (16, 32, 64, 128),
    table: int = 32,
    joyhallo: bool = False,
) -> dict[str, tuple]:
    """Every key of Hallo's net.pth with its shape, for an SD-1.5-shaped `unet_config`."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    shapes: dict[str, tuple] = {}
    for key, value in unet.state_dict().items():
        shapes[f"denoising_unet.{key}"] = tuple(value.shape)
        if not key.startswith(("conv_norm_out.", "conv_out.")):  # the reference UNet has no output head
            shapes[f"reference_unet.{key}"] = tuple(value.shape)
    channels = unet_config["block_out_channels"]
    n, layers = len(channels), unet_config["layers_per_block"]
    down, up = unet_config["down_block_types"], unet_config["up_block_types"]
    reverse = list(reversed(channels))
    branches = 1 if joyhallo else 3
    den = {}
    for i in range(n):  # motion modules at every resolution (Hallo's motion_module_resolutions [1, 2, 4, 8])
        for j in range(layers):
            den |= _motion_module(f"down_blocks.{i}.motion_modules.{j}", channels[i], table)
        for j in range(layers + 1):
            den |= _motion_module(f"up_blocks.{i}.motion_modules.{j}", reverse[i], table)
    den |= _motion_module("mid_block.motion_modules.0", channels[-1], table)
    for i in range(n):  # audio modules where there is attention; inner width = the layer's input width
        if down[i].startswith("CrossAttn"):
            for j in range(layers):
                width = channels[max(i - 1, 0)] if j == 0 else channels[i]
                den |= _audio_module(
                    f"down_blocks.{i}.audio_modules.{j}", channels[i], width, audio_dim, branches
                )
        if up[i].startswith("CrossAttn"):
            for j in range(layers + 1):
                den |= _audio_module(
                    f"up_blocks.{i}.audio_modules.{j}",
                    reverse[i],
                    reverse[min(i + 1, n - 1)],
                    audio_dim,
                    branches,
                )
    den |= _audio_module("mid_block.audio_modules.0", channels[-1], channels[-1], audio_dim, branches)
    shapes |= {f"denoising_unet.{k}": v for k, v in den.items()}
    fl = face_channels
    shapes |= {"face_locator.conv_in.weight": (fl[0], 3, 3, 3), "face_locator.conv_in.bias": (fl[0],)}
    for s, (cin, cout) in enumerate(zip(fl[:-1], fl[1:], strict=True)):
        shapes[f"face_locator.blocks.{2 * s}.weight"] = (cin, cin, 3, 3)
        shapes[f"face_locator.blocks.{2 * s}.bias"] = (cin,)
        shapes[f"face_locator.blocks.{2 * s + 1}.weight"] = (cout, cin, 3, 3)
        shapes[f"face_locator.blocks.{2 * s + 1}.bias"] = (cout,)
    shapes |= {
        "face_locator.conv_out.weight": (channels[0], fl[-1], 3, 3),
        "face_locator.conv_out.bias": (channels[0],),
    }
    identity_dim = unet_config["cross_attention_dim"]
    shapes |= {
        "imageproj.proj.weight": (identity_tokens * identity_dim, embedding_dim),
        "imageproj.proj.bias": (identity_tokens * identity_dim,),
        "imageproj.norm.weight": (identity_dim,), "imageproj.norm.bias": (identity_dim,),
        "audioproj.proj1.weight": (intermediate, 5 * wav2vec_layers * wav2vec_hidden),
        "audioproj.proj1.bias": (intermediate,),
        "audioproj.proj2.weight": (intermediate, intermediate), "audioproj.proj2.bias": (intermediate,),
        "audioproj.proj3.weight": (audio_tokens * audio_dim, intermediate),
        "audioproj.proj3.bias": (audio_tokens * audio_dim,),
        "audioproj.norm.weight": (audio_dim,), "audioproj.norm.bias": (audio_dim,),
    }  # fmt: skip
    return shapes


def random_tensors(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Values that keep activations sane: fan-in scaled weights, norms near 1, small biases, jittered tables."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("pos_encoder.pe"):
            length, dim = shape[1], shape[2]
            position = torch.arange(length)[:, None]
            div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
            pe = torch.zeros(1, length, dim)
            pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(position * div), torch.cos(position * div)
            out[key] = pe + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1 and ("norm" in key.rsplit(".", 2)[-2]) and key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            out[key] = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=gen) * (0.8 / math.sqrt(fan_in))
    return out


def write_tiny_release(root: Path, *, seed: int = 0, joyhallo: bool = False) -> Path:
    """`root` laid out like Hallo's pretrained_models/, all tiny and random. Returns root."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet_dir = root / "stable-diffusion-v1-5" / "unet"
    UNet2DConditionModel(**TINY_UNET).save_pretrained(unet_dir, safe_serialization=True)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.save_pretrained(root / "sd-vae-ft-mse", safe_serialization=True)
    wav_dir = root / "wav2vec" / "wav2vec2-base-960h"
    Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC)).save_pretrained(wav_dir, safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(wav_dir)
    shapes = hallo_net_shapes(
        TINY_UNET,
        wav2vec_layers=TINY_WAV2VEC["num_hidden_layers"],
        wav2vec_hidden=TINY_WAV2VEC["hidden_size"],
        audio_dim=TINY_SIZES["audio_dim"],
        audio_tokens=TINY_SIZES["audio_tokens"],
        intermediate=TINY_SIZES["intermediate"],
        identity_tokens=TINY_SIZES["identity_tokens"],
        face_channels=TINY_SIZES["face_channels"],
        joyhallo=joyhallo,
    )
    net = random_tensors(shapes, seed)
    (root / "hallo").mkdir(exist_ok=True)
    torch.save(net, root / "hallo" / "net.pth")
    motion = {
        k[len("denoising_unet.") :]: torch.zeros_like(v) for k, v in net.items() if ".motion_modules." in k
    }
    (root / "motion_module").mkdir(exist_ok=True)
    torch.save(motion, root / "motion_module" / "mm_sd_v15_v2.ckpt")
    (root / "README.md").write_text(json.dumps({"tiny": True, "seed": seed}))
    return root

"""The UNet skeleton that ReferenceNet and the backbone share (SD 1.5 structure, diffusers parameter names).

Hidden states flow as (n, c, h, w) with n = batch x frames. Every resolution level is a block of
`layers_per_block` (resnet [+ spatial transformer] [+ audio module] [+ motion module]) layers; the backbone
has motion modules (and, for Hallo's design, audio modules of their own), the ReferenceNet records the
features the backbone reads (see `Conditions`).

Motion-frame features reach a motion module from one of two places (`motion_frame_features`):
"layer" (EMO-native): the ReferenceNet's hidden state at the same motion-module site;
"attention" (Hallo): the ReferenceNet's `norm1` tokens of the same layer's spatial transformer block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from einops import rearrange
from torch import nn

from .attention import Conditions, SpatialTransformer, SpatialTransformerBlock

ATTENTION_BLOCKS = {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"}

# builders for the optional layers: channels -> module
MakeLayer = Callable[[int], nn.Module] | None
# builder of a per-layer audio module: (channels, inner width) -> module
MakeAudioModule = Callable[[int, int], nn.Module] | None


class _Level(nn.Module):
    """Shared layer logic of the down, mid and up blocks."""

    def __init__(self):
        super().__init__()
        self.key = ""  # module path, set by the UNet
        self.gradient_checkpointing = False
        self.motion_modules: nn.ModuleList | None = None
        self.audio_modules: nn.ModuleList | None = None
        self.motion_frame_features = "layer"  # or "attention" (see the module docstring)

    def _run(self, fn, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def _motion(self, j: int, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        key = f"{self.key}.motion_modules.{j}"
        if cond.record is not None:
            cond.record[key] = x
        if self.motion_modules is None:
            return x
        motion = None
        if cond.motion is not None and self.motion_frame_features == "attention":
            tokens = cond.motion[f"{self.key}.attentions.{j}.transformer_blocks.0"]  # (b, n, h*w, c)
            motion = rearrange(tokens, "b n (h w) c -> b n c h w", h=x.shape[-2])
        elif cond.motion is not None:
            motion = cond.motion[key]  # (b, n, c, h, w)
        return self._run(self.motion_modules[j], x, cond.num_frames, motion, cond.speed)

    def _layer(self, j: int, x: torch.Tensor, temb: torch.Tensor, cond: Conditions) -> torch.Tensor:
        x = self._run(self.resnets[j], x, temb)
        if self.attentions is not None:
            x = self._run(self.attentions[j], x, cond)
        if self.audio_modules is not None:
            x = self._run(self.audio_modules[j], x, cond)
        return self._motion(j, x, cond)


def _resnet(cin: int, cout: int, temb: int, groups: int, eps: float) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=groups, eps=eps)


class DownBlock(_Level):
    def __init__(
        self,
        cin,
        cout,
        temb,
        layers,
        groups,
        eps,
        downsample,
        make_attn: MakeLayer,
        make_motion: MakeLayer,
        make_audio: MakeAudioModule = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(cin if j == 0 else cout, cout, temb, groups, eps) for j in range(layers)]
        )
        self.attentions = nn.ModuleList([make_attn(cout) for _ in range(layers)]) if make_attn else None
        # Hallo's width rule: the inner width of layer j's audio module is that layer's input width
        self.audio_modules = (
            nn.ModuleList([make_audio(cout, cin if j == 0 else cout) for j in range(layers)])
            if make_audio
            else None
        )
        self.motion_modules = (
            nn.ModuleList([make_motion(cout) for _ in range(layers)]) if make_motion else None
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(cout, use_conv=True, out_channels=cout, padding=1, name="op")])
            if downsample
            else None
        )

    def forward(self, x, temb, cond):
        skips = []
        for j in range(len(self.resnets)):
            x = self._layer(j, x, temb, cond)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(_Level):
    """resnet -> spatial transformer -> motion module -> resnet (diffusers' mid-block order)."""

    def __init__(
        self, channels, temb, groups, eps, make_attn: MakeLayer, make_motion: MakeLayer,
        make_audio: MakeAudioModule = None,
    ):  # fmt: skip
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, temb, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([make_attn(channels)])
        self.audio_modules = nn.ModuleList([make_audio(channels, channels)]) if make_audio else None
        self.motion_modules = nn.ModuleList([make_motion(channels)]) if make_motion else None

    def forward(self, x, temb, cond):
        x = self._run(self.resnets[0], x, temb)
        x = self._run(self.attentions[0], x, cond)
        if self.audio_modules is not None:
            x = self._run(self.audio_modules[0], x, cond)
        x = self._motion(0, x, cond)
        return self._run(self.resnets[1], x, temb)


class UpBlock(_Level):
    def __init__(
        self,
        cin,
        cout,
        prev,
        temb,
        layers,
        groups,
        eps,
        upsample,
        make_attn: MakeLayer,
        make_motion: MakeLayer,
        make_audio: MakeAudioModule = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _resnet(
                    (prev if j == 0 else cout) + (cin if j == layers - 1 else cout), cout, temb, groups, eps
                )
                for j in range(layers)
            ]
        )
        self.attentions = nn.ModuleList([make_attn(cout) for _ in range(layers)]) if make_attn else None
        # Hallo's width rule: an up block's audio modules are as wide as the block's `cin` (its skip input)
        self.audio_modules = (
            nn.ModuleList([make_audio(cout, cin) for _ in range(layers)]) if make_audio else None
        )
        self.motion_modules = (
            nn.ModuleList([make_motion(cout) for _ in range(layers)]) if make_motion else None
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)]) if upsample else None
        )

    def forward(self, x, skips, temb, cond, upsample_size=None):
        for j in range(len(self.resnets)):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self._layer(j, x, temb, cond)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


UNET_ARGS = (
    "in_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "attention_head_dim", "norm_num_groups", "norm_eps", "transformer_layers_per_block", "flip_sin_to_cos",
    "freq_shift", "reference_attention", "cross_attention_dim",
)  # fmt: skip


def unet_args(config) -> dict:
    """The SD 1.5 structure arguments of `build_unet` from a model's registered config."""
    args = {name: config[name] for name in UNET_ARGS}
    return args | {k: tuple(args[k]) for k in ("down_block_types", "up_block_types", "block_out_channels")}


def build_unet(
    model: nn.Module,
    *,
    in_channels: int,
    out_channels: int | None,
    down_block_types: tuple[str, ...],
    up_block_types: tuple[str, ...],
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    attention_head_dim: int,
    norm_num_groups: int,
    norm_eps: float,
    transformer_layers_per_block: int,
    flip_sin_to_cos: bool,
    freq_shift: int,
    make_audio_attention: MakeLayer = None,
    make_motion: MakeLayer = None,
    make_audio_module: MakeAudioModule = None,
    motion_in_plain_blocks: bool = True,
    motion_frame_features: str = "layer",
    reference_attention: str = "cross",
    cross_attention_dim: int | None = None,
) -> None:
    """Attach the SD 1.5-shaped UNet layers to `model` (`out_channels=None`: no output head, as ReferenceNet).

    `attention_head_dim` is diffusers' legacy name for the NUMBER of heads of SD 1.5 (8).
    make_audio_attention: audio attention inside each spatial transformer block (EMO);
    make_audio_module: an audio module after each spatial transformer, (channels, width) -> module (Hallo);
    motion_in_plain_blocks: False builds motion modules only in blocks with spatial transformers;
    reference_attention / cross_attention_dim: see `attention.SpatialTransformerBlock`.
    """
    if motion_frame_features not in ("layer", "attention"):
        raise ValueError(
            f"motion_frame_features must be 'layer' or 'attention', got {motion_frame_features!r}"
        )
    channels = block_out_channels
    temb = channels[0] * 4
    heads = attention_head_dim

    def make_attn(c: int) -> SpatialTransformer:
        return SpatialTransformer(
            c, heads, transformer_layers_per_block, norm_num_groups, make_audio_attention,
            reference_attention, cross_attention_dim,
        )  # fmt: skip

    def motion_for(kind: str) -> MakeLayer:
        return make_motion if motion_in_plain_blocks or kind in ATTENTION_BLOCKS else None

    def audio_for(kind: str) -> MakeAudioModule:
        return make_audio_module if kind in ATTENTION_BLOCKS else None

    model.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
    model.time_proj = Timesteps(channels[0], flip_sin_to_cos, freq_shift)
    model.time_embedding = TimestepEmbedding(channels[0], temb)
    model.down_blocks = nn.ModuleList(
        [
            DownBlock(
                channels[max(i - 1, 0)], channels[i], temb, layers_per_block, norm_num_groups, norm_eps,
                downsample=i < len(channels) - 1,
                make_attn=make_attn if kind in ATTENTION_BLOCKS else None,
                make_motion=motion_for(kind),
                make_audio=audio_for(kind),
            )
            for i, kind in enumerate(down_block_types)
        ]
    )  # fmt: skip
    model.mid_block = MidBlock(
        channels[-1], temb, norm_num_groups, norm_eps, make_attn, make_motion, make_audio_module
    )
    reversed_channels = list(reversed(channels))
    model.up_blocks = nn.ModuleList(
        [
            UpBlock(
                reversed_channels[min(i + 1, len(channels) - 1)], reversed_channels[i],
                reversed_channels[max(i - 1, 0)], temb, layers_per_block + 1, norm_num_groups, norm_eps,
                upsample=i < len(channels) - 1,
                make_attn=make_attn if kind in ATTENTION_BLOCKS else None,
                make_motion=motion_for(kind),
                make_audio=audio_for(kind),
            )
            for i, kind in enumerate(up_block_types)
        ]
    )  # fmt: skip
    if out_channels is not None:
        model.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps)
        model.conv_act = nn.SiLU()
        model.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)
    for name, module in model.named_modules():
        if isinstance(module, _Level | SpatialTransformerBlock):
            module.key = name
        if isinstance(module, _Level):
            module.motion_frame_features = motion_frame_features


def run_unet(
    model: nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditions,
    added_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, c, h, w) latents at (n,) timesteps -> (n, c_out, h, w); `added_features` are added after `conv_in`."""
    emb = model.time_embedding(model.time_proj(timesteps).to(sample.dtype))
    x = model.conv_in(sample)
    if added_features is not None:
        x = x + added_features
    skips = [x]
    for block in model.down_blocks:
        x, block_skips = block(x, emb, cond)
        skips.extend(block_skips)
    x = model.mid_block(x, emb, cond)
    for block in model.up_blocks:
        n = len(block.resnets)
        block_skips, skips = skips[-n:], skips[:-n]
        x = block(x, block_skips, emb, cond, skips[-1].shape[-2:] if skips else None)
    if not hasattr(model, "conv_out"):
        return x
    return model.conv_out(model.conv_act(model.conv_norm_out(x)))

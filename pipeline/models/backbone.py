"""The backbone (denoising UNet): SD 1.5 structure + reference-attention, audio-attention, temporal modules.

Input latents are (b, c, f, h, w), like diffusers' `UNetMotionModel`. Per block: resnet -> spatial
transformer (self-attention, reference-attention on ReferenceNet tokens, audio-attention on the frame's
audio tokens, feed-forward) -> motion module (temporal attention over the n motion frames + f clip frames,
with the speed cross-attention). The face locator's features are added after `conv_in`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange

from .attention import AttentionSlicingMixin, Conditions
from .audio_attention import AUDIO_ATTENTION_TYPES
from .reference_net import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS
from .temporal import TemporalTransformer
from .unet import build_unet, run_unet, unet_args


@dataclass
class EmoUNetOutput(BaseOutput):
    sample: torch.Tensor  # (b, c, f, h, w)


class EmoUNet3DModel(ModelMixin, ConfigMixin, AttentionSlicingMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = SD15_DOWN_BLOCKS,
        up_block_types: tuple[str, ...] = SD15_UP_BLOCKS,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        transformer_layers_per_block: int = 1,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        audio_dim: int = 768,
        audio_attention_type: str = "cross",
        motion_num_attention_heads: int = 8,
        motion_norm_num_groups: int = 32,
        motion_max_seq_length: int = 32,
        speed_dim: int | None = 256,
    ):
        super().__init__()
        if audio_attention_type not in AUDIO_ATTENTION_TYPES:
            raise ValueError(
                f"audio_attention_type must be one of {sorted(AUDIO_ATTENTION_TYPES)}, got {audio_attention_type!r}"
            )
        audio_cls = AUDIO_ATTENTION_TYPES[audio_attention_type]
        build_unet(
            self,
            **unet_args(self.config),
            out_channels=out_channels,
            make_audio_attention=lambda c: audio_cls(c, audio_dim, attention_head_dim),
            make_motion=lambda c: TemporalTransformer(
                c, motion_num_attention_heads, motion_norm_num_groups, motion_max_seq_length, speed_dim
            ),
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
        reference_tokens: dict[str, torch.Tensor],
        motion_features: dict[str, torch.Tensor] | None = None,
        audio_tokens: torch.Tensor | None = None,
        speed_tokens: torch.Tensor | None = None,
        face_features: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> EmoUNetOutput | tuple[torch.Tensor]:
        """Predict the noise (or v) of a clip.

        sample: (b, c, f, h, w) noisy latents; timestep: scalar or (b,);
        reference_tokens: ReferenceNet tokens of the reference image, key -> (b, s, c);
        motion_features: ReferenceNet features of the n motion frames, key -> (b, n, c, h, w), or None;
        audio_tokens: (b, f, k, audio_dim); speed_tokens: (b, f, speed_dim);
        face_features: (b, block_out_channels[0], h, w) from the face locator, added to every frame.
        """
        b, _, f, h, w = sample.shape
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        cond = Conditions(
            num_frames=f,
            reference=reference_tokens,
            motion=motion_features,
            audio=rearrange(audio_tokens, "b f k d -> (b f) k d") if audio_tokens is not None else None,
            speed=speed_tokens,
        )
        added = None
        if face_features is not None:
            added = face_features.to(sample.dtype).repeat_interleave(f, dim=0)
        out = run_unet(
            self,
            rearrange(sample, "b c f h w -> (b f) c h w"),
            timesteps.repeat_interleave(f),
            cond,
            added,
        )
        out = rearrange(out, "(b f) c h w -> b c f h w", f=f)
        return EmoUNetOutput(sample=out) if return_dict else (out,)

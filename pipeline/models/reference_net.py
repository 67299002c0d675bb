"""ReferenceNet: an SD 1.5-shaped 2D UNet that encodes the reference image and the motion frames.

It runs once per clip (never per denoising step) at timestep 0 and returns, for the backbone:
- `reference_tokens`: at every spatial transformer block, the tokens entering its self-attention
  (n, h*w, c) -> the keys/values of the backbone's reference-attention at the same block;
- `motion_features`: at every motion-module site (after each resnet [+ transformer] layer) the hidden
  state (n, c, h, w) -> put in front of the clip's frames by the backbone's temporal modules.
It has no output head (`conv_norm_out`/`conv_out`), since nothing reads its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .attention import AttentionSlicingMixin, Conditions
from .unet import build_unet, run_unet, unet_args

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class ReferenceNetOutput(BaseOutput):
    reference_tokens: dict[str, torch.Tensor]  # key -> (n, h*w, c)
    motion_features: dict[str, torch.Tensor]  # key -> (n, c, h, w)


class ReferenceNet(ModelMixin, ConfigMixin, AttentionSlicingMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
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
        reference_attention: str = "cross",
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        build_unet(self, **unet_args(self.config), out_channels=None)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor = 0,
        identity_tokens: torch.Tensor | None = None,
    ) -> ReferenceNetOutput:
        """sample: (n, c, h, w) latents of reference image(s) or motion frames; identity_tokens: (n, k, d),
        the cross-attention context of each row (models with `reference_attention="concat"`)."""
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        cond = Conditions(record={}, identity=identity_tokens)
        run_unet(self, sample, timesteps, cond)
        tokens = {k: v for k, v in cond.record.items() if v.ndim == 3}
        motion = {k: v for k, v in cond.record.items() if v.ndim == 4}
        return ReferenceNetOutput(reference_tokens=tokens, motion_features=motion)

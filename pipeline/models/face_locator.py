"""Face locator: a light conv encoder of the face-region mask, added to the backbone after `conv_in`.

The mask (1 inside the union of the clip's face boxes, 0 outside) is at image resolution; each entry of
`block_out_channels` after the first halves the resolution, so there are log2(VAE scale) of them.
`block_layout="pairs"` (Hallo's layout): each step is a same-width conv followed by the strided one
(`blocks.0, blocks.1, ...` alternate). Every conv but the last is followed by SiLU.
The last conv starts at zero, so an untrained locator leaves the backbone unchanged.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FaceLocator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        conditioning_channels: int = 1,
        block_out_channels: tuple[int, ...] = (16, 32, 64, 128),
        embedding_channels: int = 320,
        block_layout: str = "strided",
    ):
        super().__init__()
        if block_layout not in ("strided", "pairs"):
            raise ValueError(f"block_layout must be 'strided' or 'pairs', got {block_layout!r}")
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            if block_layout == "pairs":
                blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (b, 1 or conditioning_channels, H, W) in [0, 1] at image size -> (b, embedding_channels,
        H / 2^k, W / 2^k); a one-channel mask is repeated over the conditioning channels."""
        if mask.shape[1] == 1 and self.config.conditioning_channels > 1:
            mask = mask.expand(-1, self.config.conditioning_channels, -1, -1)
        x = nn.functional.silu(self.conv_in(mask.to(self.dtype)))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)

"""Face locator: a light conv encoder of the face-region mask, added to the backbone after `conv_in`.

The mask (1 inside the union of the clip's face boxes, 0 outside) is at image resolution; each entry of
`block_out_channels` after the first halves the resolution, so there are log2(VAE scale) of them.
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
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1, stride=2)
            for cin, cout in zip(block_out_channels[:-1], block_out_channels[1:], strict=True)
        )
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (b, 1, H, W) in [0, 1] at image size -> (b, embedding_channels, H / 2^k, W / 2^k)."""
        x = nn.functional.silu(self.conv_in(mask.to(self.dtype)))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)

"""Speed encoder: head rotation speed (degrees per frame) -> one speed embedding per frame (EMO's speed layers).

Each speed w is encoded against d buckets with centres c_i and radii r_i as s_i = tanh(3 (w - c_i) / r_i);
the window of frames f-m..f+m (m = 2) is concatenated and an MLP makes the embedding that the temporal
modules' speed cross-attention reads. The paper does not publish d, c_i, r_i. Ours: 9 buckets centred on
0.0, 0.3, ..., 2.4 degrees/frame with radius 0.3, which covers the speeds measured on talking-head video at
25 fps (mostly 0.1-1.5) and the paper's inference range (0.1-1.9).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from .audio_projection import frame_windows

DEFAULT_CENTERS = tuple(round(0.3 * i, 2) for i in range(9))


class SpeedEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        centers: tuple[float, ...] = DEFAULT_CENTERS,
        radii: float | tuple[float, ...] = 0.3,
        window: int = 2,
        hidden_dim: int = 256,
        output_dim: int = 256,
    ):
        super().__init__()
        radii = (radii,) * len(centers) if isinstance(radii, int | float) else tuple(radii)
        if len(radii) != len(centers):
            raise ValueError(f"radii must be one value or one per centre ({len(centers)}), got {len(radii)}")
        self.register_buffer("bucket_centers", torch.tensor(centers, dtype=torch.float32), persistent=False)
        self.register_buffer("bucket_radii", torch.tensor(radii, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear((2 * window + 1) * len(centers), hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def buckets(self, speed: torch.Tensor) -> torch.Tensor:
        """(b, f) degrees/frame -> (b, f, d) bucket activations in (-1, 1)."""
        return torch.tanh(3.0 * (speed.float()[..., None] - self.bucket_centers) / self.bucket_radii)

    def forward(self, speed: torch.Tensor) -> torch.Tensor:
        """(b, f) per-frame head speed in degrees per frame -> (b, f, output_dim)."""
        windows = frame_windows(self.buckets(speed), self.config.window)  # (b, f, 2m+1, d)
        return self.mlp(rearrange(windows, "b f w d -> b f (w d)").to(self.dtype))

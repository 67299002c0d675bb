"""Audio-attention: each frame's latent tokens attend to that frame's audio tokens (EMO, after reference-attention).

The backbone's config value `audio_attention_type` picks the design:
- "cross" (EMO): `AudioCrossAttention` inside each spatial transformer block, after reference-attention;
- "region" (Hallo) / "region_shared" (JoyHallo): a separate `RegionAudioModule` after each layer's spatial
  transformer (`audio_modules.N` of the block), with full/face/lip region-masked branches.
New layers start with zero output, so an SD 1.5 / ReferenceNet initialisation is not disturbed.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from einops import rearrange
from torch import nn

from .attention import Attention


class AudioCrossAttention(nn.Module):
    """LayerNorm + cross-attention from (b*f, h*w, c) frame tokens to (b*f, k, d) audio tokens."""

    def __init__(self, dim: int, audio_dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim // heads, context_dim=audio_dim, zero_init_out=True)

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(x), audio_tokens)


class RegionAudioBlock(nn.Module):
    """Self-attention -> audio cross-attention per face region -> feed-forward, on (n, h*w, d) tokens.

    Each region branch (full image / face / lip) attends to the frame's audio tokens, is weighted per token by
    its region mask, goes through its own 1x1 conv (`zero_conv_*`, zero at initialisation) and is added with
    its weight (pose/full, face, lip). `shared_attention`: one cross-attention feeds all three branches
    (JoyHallo's layout, only `attn2_0`).
    """

    REGIONS = ("full", "face", "lip")

    def __init__(self, dim: int, heads: int, audio_dim: int, shared_attention: bool = False):
        super().__init__()
        dim_head = dim // heads
        self.shared_attention = shared_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        for k in range(1 if shared_attention else 3):
            setattr(self, f"attn2_{k}", Attention(dim, heads, dim_head, context_dim=audio_dim))
        for region in self.REGIONS:
            conv = nn.Conv2d(dim, dim, 1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            setattr(self, f"zero_conv_{region}", conv)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x, audio, masks, weights, size: tuple[int, int]) -> torch.Tensor:
        """x: (n, h*w, d); audio: (n, k, audio_dim); masks: (n, h*w, 3); weights: 3 floats."""
        x = self.attn1(self.norm1(x)) + x
        tokens = self.norm2(x)
        shared = self.attn2_0(tokens, audio) if self.shared_attention else None
        branches = []
        for k, region in enumerate(self.REGIONS):
            attended = shared if shared is not None else getattr(self, f"attn2_{k}")(tokens, audio)
            maps = rearrange(attended * masks[..., k : k + 1], "n (h w) d -> n d h w", h=size[0], w=size[1])
            branches.append(rearrange(getattr(self, f"zero_conv_{region}")(maps), "n d h w -> n (h w) d"))
        x = weights[0] * branches[0] + weights[1] * branches[1] + weights[2] * branches[2] + x
        return self.ff(self.norm3(x)) + x


class RegionAudioModule(nn.Module):
    """Hallo's audio module, run after a layer's spatial transformer: (n, C, h, w) -> (n, C, h, w).

    GroupNorm -> 1x1 conv to the inner width -> `RegionAudioBlock` -> 1x1 conv back, plus the input. The
    region masks come from `Conditions.region_masks` at this level's (h, w), the same for every frame.
    """

    def __init__(
        self, channels: int, width: int, audio_dim: int, heads: int, norm_groups: int, shared_attention: bool
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, width, 1)
        self.transformer_blocks = nn.ModuleList([RegionAudioBlock(width, heads, audio_dim, shared_attention)])
        self.proj_out = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor, cond) -> torch.Tensor:
        if cond.audio is None:
            return x
        h, w = x.shape[-2:]
        if cond.region_masks is None or (h, w) not in cond.region_masks:
            raise ValueError(f"region-masked audio attention needs `region_masks` at {h}x{w} tokens")
        masks = cond.region_masks[(h, w)]
        masks = masks.to(x.dtype).repeat_interleave(x.shape[0] // masks.shape[0], dim=0)
        # training only: torch 2.13's CPU backward of GroupNorm crashes on a channels-last input that needs no
        # gradient (audio modules training after frozen layers); inference keeps the input as it is
        y = rearrange(
            self.proj_in(self.norm(x.contiguous() if torch.is_grad_enabled() else x)), "n c h w -> n (h w) c"
        )
        for block in self.transformer_blocks:
            y = block(y, cond.audio.to(x.dtype), masks, cond.region_weights, (h, w))
        return self.proj_out(rearrange(y, "n (h w) c -> n c h w", h=h, w=w)) + x


# "cross" lives inside the spatial transformer blocks; the region types are modules of their own per layer
AUDIO_ATTENTION_TYPES: dict[str, type[nn.Module]] = {
    "cross": AudioCrossAttention,
    "region": RegionAudioModule,
    "region_shared": RegionAudioModule,
}

"""Temporal modules (AnimateDiff motion modules) with EMO's motion frames and speed layers.

Parameter names follow diffusers' `AnimateDiffTransformer3D` (the `MotionAdapter` layout:
`norm`, `proj_in`, `transformer_blocks.0.{norm1,attn1,norm2,attn2,norm3,ff}`, `proj_out`), so AnimateDiff
weights load by name. The sinusoidal position encoding is recomputed, not stored (AnimateDiff's `pe`
buffers are dropped on load, unless `stored_positions`: then the table is a saved buffer, as in AnimateDiff's
own checkpoints and Hallo's). `norm_per_frame`: the GroupNorm before the temporal attention normalises each
frame on its own (AnimateDiff's original code and Hallo) instead of the whole clip at once (diffusers'
`AnimateDiffTransformer3D`, EMO-native models). EMO additions, both zero-output at initialisation:
- motion frames: the ReferenceNet features of the previous clip's last n frames are put in front of the
  clip's frames, so temporal attention runs over n + f frames; only the f clip frames are returned;
- speed layer (`norm_speed`, `attn_speed`): cross-attention from the frame tokens to the clip's per-frame
  head-speed embeddings.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from einops import rearrange
from torch import nn

from .attention import Attention


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """AnimateDiff's position encoding: (1, length, dim), sin on even and cos on odd channels."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions, the speed cross-attention, a feed-forward; tokens (b*h*w, t, c)."""

    def __init__(
        self, dim: int, heads: int, max_frames: int, speed_dim: int | None, stored_positions: bool = False
    ):
        super().__init__()
        dim_head = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head)
        if speed_dim is not None:
            self.norm_speed = nn.LayerNorm(dim)
            self.attn_speed = Attention(dim, heads, dim_head, context_dim=speed_dim, zero_init_out=True)
        else:
            self.norm_speed = self.attn_speed = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        # one table for both attentions, or (stored) one per attention as AnimateDiff's checkpoints hold them
        table = sinusoidal_positions(max_frames, dim)
        self.register_buffer(
            "pe", table.repeat(2, 1, 1) if stored_positions else table, persistent=stored_positions
        )

    def forward(self, x: torch.Tensor, speed: torch.Tensor | None) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(
                f"temporal sequence of {x.shape[1]} frames exceeds max_frames={self.pe.shape[1]}"
            )
        pe1, pe2 = (self.pe[i][None, : x.shape[1]].to(x.dtype) for i in (0, -1))
        x = self.attn1(self.norm1(x) + pe1) + x
        x = self.attn2(self.norm2(x) + pe2) + x
        if self.attn_speed is not None and speed is not None:
            # every spatial position of a sample shares the speed context: (b*hw, t, c) -> (b, hw*t, c)
            b = speed.shape[0]
            t = x.shape[1]
            q = rearrange(self.norm_speed(x), "(b n) t c -> b (n t) c", b=b)
            x = rearrange(self.attn_speed(q, speed), "b (n t) c -> (b n) t c", t=t) + x
        return self.ff(self.norm3(x)) + x


class TemporalTransformer(nn.Module):
    """A motion module: (b*f, c, h, w) clip frames (+ (b, n, c, h, w) motion frames) -> (b*f, c, h, w)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        norm_groups: int,
        max_frames: int,
        speed_dim: int | None,
        layers: int = 1,
        norm_per_frame: bool = False,
        stored_positions: bool = False,
    ):
        super().__init__()
        self.norm_per_frame = norm_per_frame
        self.norm = nn.GroupNorm(norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                TemporalTransformerBlock(dim, heads, max_frames, speed_dim, stored_positions)
                for _ in range(layers)
            ]
        )
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        num_frames: int,
        motion: torch.Tensor | None = None,
        speed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        if motion is not None:
            y = torch.cat([rearrange(motion.to(y.dtype), "b n c h w -> b c n h w"), y], dim=2)
        # contiguous: a permuted (channels-last-like) input crashes GroupNorm's CPU backward in torch 2.13
        # when the norm trains but its input needs no gradient (stage 3: temporal layers after frozen ones)
        if self.norm_per_frame:
            t = y.shape[2]
            frames = rearrange(y, "b c t h w -> (b t) c h w")
            if torch.is_grad_enabled():  # the same crash (training only: inference keeps its kernel)
                frames = frames.contiguous()
            normed = rearrange(self.norm(frames), "(b t) c h w -> b c t h w", t=t)
        else:
            normed = self.norm(y.contiguous())
        y = self.proj_in(rearrange(normed, "b c t h w -> (b h w) t c"))
        for block in self.transformer_blocks:
            y = block(y, speed)
        y = self.proj_out(y)[:, -num_frames:]  # keep the clip's frames, drop the motion frames
        return rearrange(y, "(b h w) f c -> (b f) c h w", h=h, w=w) + x

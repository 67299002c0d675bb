"""Audio-attention: each frame's latent tokens attend to that frame's audio tokens (EMO, after reference-attention).

Pluggable: the backbone builds the layer named by its config value `audio_attention_type` from
`AUDIO_ATTENTION_TYPES`, so another design (e.g. Hallo's audio modules) can be registered beside it.
New layers start with zero output, so an SD 1.5 / ReferenceNet initialisation is not disturbed.
"""

from __future__ import annotations

import torch
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


AUDIO_ATTENTION_TYPES: dict[str, type[nn.Module]] = {"cross": AudioCrossAttention}

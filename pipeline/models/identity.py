"""Identity tokens: a face-recognition embedding of the portrait -> a few tokens for cross-attention.

Hallo conditions both UNets' cross-attention (`attn2`) on 4 tokens projected from the 512-d embedding
insightface computes for the portrait's largest face (IP-Adapter's image projection: one linear layer, then
LayerNorm per token). Parameter names (`proj`, `norm`) follow Hallo's `imageproj`, so its weights load by name.
The unconditional branch of guidance uses the projection of a zero embedding (not zero tokens).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class IdentityProjection(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, embedding_dim: int = 512, cross_attention_dim: int = 768, num_tokens: int = 4):
        super().__init__()
        self.proj = nn.Linear(embedding_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(b, embedding_dim) face embeddings -> (b, num_tokens, cross_attention_dim) identity tokens."""
        tokens = self.proj(embedding.to(self.dtype))
        return self.norm(tokens.unflatten(-1, (self.config.num_tokens, self.config.cross_attention_dim)))

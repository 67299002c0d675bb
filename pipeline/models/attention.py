"""Attention as EMO's UNets use it: spatial self-attention, reference-attention, the block that holds them.

Parameter names follow diffusers' `Transformer2DModel` / `BasicTransformerBlock` (`norm`, `proj_in`,
`transformer_blocks.0.{norm1,attn1,norm2,attn2,norm3,ff}`, `proj_out`), so SD 1.5 weights load by name.

Two ways to read the ReferenceNet, a config value of both UNets (`reference_attention`):
- "cross" (EMO-native): reference-attention lives in `attn2` (SD's text cross-attention): its queries are
  the frame's tokens, its keys/values the ReferenceNet tokens recorded at the same block (the input of that
  block's self-attention, `norm1(x)`). In the ReferenceNet itself `attn2` attends to its own `norm1(x)`, so
  both UNets have one structure. A "null" reference (guidance, condition dropout) is a zero tensor.
- "concat" (Animate Anyone, Hallo): the reference tokens are appended to the frame's own tokens as the
  keys/values of the self-attention `attn1`; `attn2` cross-attends to identity tokens (`Conditions.identity`,
  e.g. 4 tokens projected from a face-recognition embedding). A sample without reference
  (`Conditions.reference_used` False) runs plain self-attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention on PyTorch SDPA with optional slicing over (batch x heads).

    Same parameter names as diffusers' `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`). It is our own class
    so that diffusers' processor switches (`set_default_attn_processor`, xformers) cannot silently replace
    EMO's reference/audio attention; slicing is set by `set_attention_slice` on the owning model.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        zero_init_out: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        self.slice_size: int | None = None
        # inference only: keys/values of the last context, reused while the same tensor comes back (the
        # reference tokens of a clip are the same object at every denoising step; see `context_cache`)
        self.cache_context = False
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if zero_init_out:
            nn.init.zeros_(self.to_out[0].weight)
            nn.init.zeros_(self.to_out[0].bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        extra_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (b, l, c); context: (b, s, c_ctx) -> (b, l, c).

        extra: (m, s, c) tokens appended to the keys/values of self-attention; their keys/values are cached
        like a context's. Row i of x reads row `extra_index[i]` of them; without an index each row of extra
        is shared by a group of b / m consecutive rows of x (the frames of a sample).
        """
        q = rearrange(self.to_q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = self._keys_values(x if context is None else context, shared=context is not None)
        if extra is not None:
            k_extra, v_extra = self._keys_values(extra, shared=True)
            if extra_index is None:
                g = x.shape[0] // extra.shape[0]
                k_extra, v_extra = (t.repeat_interleave(g, dim=0) for t in (k_extra, v_extra))
            else:
                k_extra, v_extra = k_extra[extra_index], v_extra[extra_index]
            k, v = torch.cat([k, k_extra], dim=2), torch.cat([v, v_extra], dim=2)
        # 4-D inputs: SDPA's fused CPU/GPU kernels need them (3-D falls back to the slow math path)
        if self.slice_size is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # chunks of `slice_size` (batch x head) pairs, each as a (1, s, l, d) batch
            b = q.shape[0]
            q, k, v = (t.flatten(0, 1)[None] for t in (q, k, v))
            s = self.slice_size
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, i : i + s], k[:, i : i + s], v[:, i : i + s])
                    for i in range(0, q.shape[1], s)
                ],
                dim=1,
            ).unflatten(1, (b, self.heads))[0]
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.to_out[1](self.to_out[0](out))

    def _keys_values(self, context: torch.Tensor, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cached
        if shared and self.cache_context and cached is not None and cached[0] is context:
            return cached[1], cached[2]
        k, v = (
            rearrange(t, "b l (h d) -> b h l d", h=self.heads)
            for t in (self.to_k(context), self.to_v(context))
        )
        if shared and self.cache_context and not torch.is_grad_enabled():
            self._cached = (context, k, v)
        return k, v


@contextmanager
def context_cache(model: nn.Module):
    """Within the block, `Attention` modules of `model` compute the keys/values of an external context
    (reference tokens, audio tokens) once and reuse them while the same tensor object is passed again."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in modules:
        module.cache_context = True
    try:
        yield
    finally:
        for module in modules:
            module.cache_context, module._cached = False, None


def grouped_attention(attn: Attention, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Attend `query` (b*g, l, c) to one shared `context` (b, s, c) per group of g items (g frames).

    Folding the g items into the sequence axis gives the same result as repeating the context g times,
    without the copy: (b*g, l, c) -> (b, g*l, c).
    """
    b = context.shape[0]
    g = query.shape[0] // b
    out = attn(rearrange(query, "(b g) l c -> b (g l) c", b=b), context)
    return rearrange(out, "b (g l) c -> (b g) l c", g=g)


@dataclass
class Conditions:
    """What the UNet blocks read (and, for the ReferenceNet, write) besides the hidden states.

    Keys are module paths of the block that uses a feature, e.g. `down_blocks.0.attentions.0.transformer_blocks.0`
    for reference tokens and `down_blocks.0.motion_modules.0` for motion-frame features.
    """

    num_frames: int = 1
    reference: dict[str, torch.Tensor] | None = None  # key -> (b, s, c) reference tokens
    motion: dict[str, torch.Tensor] | None = None  # key -> (b, n, c, h, w) motion-frame features
    audio: torch.Tensor | None = None  # (b*f, k, d) audio tokens of each frame
    speed: torch.Tensor | None = None  # (b, f, d_speed) speed embedding of each frame
    record: dict[str, torch.Tensor] | None = None  # ReferenceNet writes its features here
    # "concat" reference attention only:
    identity: torch.Tensor | None = None  # (b, k, d) identity tokens of each sample (attn2's context)
    # per sample: False = no reference tokens (then `reference` holds rows of the other samples only)
    reference_used: list[bool] | None = None
    # per frame of the samples that use a reference: the row of `reference` it reads (None: one row a sample)
    reference_index: torch.Tensor | None = None
    # region-masked audio modules (Hallo): (h, w) of a level -> (b, h*w, 3) full/face/lip weights per token
    region_masks: dict[tuple[int, int], torch.Tensor] | None = None
    region_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # pose/full, face, lip branch weights


REFERENCE_ATTENTION = ("cross", "concat")


class SpatialTransformerBlock(nn.Module):
    """Self-attention -> reference-attention -> (audio-attention) -> feed-forward, on (n, h*w, c) tokens.

    With `reference_attention="concat"`: self-attention over [own tokens; reference tokens] -> cross-attention
    to the identity tokens (`cross_attention_dim` wide) -> feed-forward.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        audio_attention: nn.Module | None = None,
        reference_attention: str = "cross",
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        if reference_attention not in REFERENCE_ATTENTION:
            raise ValueError(
                f"reference_attention must be one of {REFERENCE_ATTENTION}, got {reference_attention!r}"
            )
        dim_head = dim // heads
        self.key = ""  # set by the owning UNet to this block's module path
        self.reference_attention = reference_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        context_dim = cross_attention_dim if reference_attention == "concat" else None
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.audio_attention = audio_attention
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def _reference_context(self, own_tokens: torch.Tensor, cond: Conditions) -> torch.Tensor:
        if cond.reference is None:  # ReferenceNet: the reference is the image itself
            return own_tokens
        return cond.reference[self.key]

    def _self_attention(self, tokens: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """attn1; in "concat" mode the samples with a reference also attend to its tokens."""
        if self.reference_attention == "cross" or cond.reference is None:
            return self.attn1(tokens)
        reference = cond.reference[self.key]  # one row per sample that uses it, or rows reference_index picks
        used, index = cond.reference_used, cond.reference_index
        if used is None or all(used):
            return self.attn1(tokens, extra=reference, extra_index=index)
        rows = tokens.unflatten(0, (len(used), -1))  # (b, f, l, c): rows are sample-major
        with_ref = [i for i, use in enumerate(used) if use]
        plain = [i for i, use in enumerate(used) if not use]
        out = torch.empty_like(rows)
        if with_ref:
            out[with_ref] = self.attn1(
                rows[with_ref].flatten(0, 1), extra=reference, extra_index=index
            ).unflatten(0, (len(with_ref), -1))
        out[plain] = self.attn1(rows[plain].flatten(0, 1)).unflatten(0, (len(plain), -1))
        return out.flatten(0, 1)

    def forward(self, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        tokens = self.norm1(x)
        if cond.record is not None:
            cond.record[self.key] = tokens
        x = self._self_attention(tokens, cond) + x
        if self.reference_attention == "concat":
            if cond.identity is None:
                raise ValueError("this model's cross-attention needs identity tokens (`Conditions.identity`)")
            x = grouped_attention(self.attn2, self.norm2(x), cond.identity.to(x.dtype)) + x
        else:
            x = grouped_attention(self.attn2, self.norm2(x), self._reference_context(tokens, cond)) + x
        if self.audio_attention is not None and cond.audio is not None:
            x = self.audio_attention(x, cond.audio) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers `Transformer2DModel` layout (conv projections, as SD 1.5): (n, c, h, w) -> (n, c, h, w)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        num_layers: int,
        norm_groups: int,
        make_audio_attention=None,
        reference_attention: str = "cross",
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                SpatialTransformerBlock(
                    dim,
                    heads,
                    make_audio_attention(dim) if make_audio_attention else None,
                    reference_attention,
                    cross_attention_dim,
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(self.proj_in(self.norm(x)), "n c h w -> n (h w) c")
        for block in self.transformer_blocks:
            y = block(y, cond)
        return self.proj_out(rearrange(y, "n (h w) c -> n c h w", h=h, w=w)) + x


class AttentionSlicingMixin:
    """`set_attention_slice` for models built from `Attention`; diffusers' `enable_attention_slicing` calls it."""

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                if slice_size == "auto":
                    module.slice_size = max(module.heads // 2, 1)
                elif slice_size == "max":
                    module.slice_size = 1
                else:
                    module.slice_size = slice_size

"""Reference attention by concatenation (Hallo's layout): extra keys/values, per-frame reference rows."""

from __future__ import annotations

import pytest
import torch

from pipeline.behaviour import Behaviour
from pipeline.models.attention import Attention, Conditions, SpatialTransformerBlock


def _by_hand(attn: Attention, x: torch.Tensor, extra_rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each row of x over [its own tokens; its extra tokens], written out."""
    out = []
    for row, extra in zip(x, extra_rows, strict=True):
        kv = torch.cat([row, extra])
        q, k, v = attn.to_q(row), attn.to_k(kv), attn.to_v(kv)
        d = q.shape[-1] // attn.heads
        heads = []
        for h in range(attn.heads):
            qh, kh, vh = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
            heads.append(torch.softmax(qh @ kh.T / d**0.5, dim=-1) @ vh)
        out.append(attn.to_out[0](torch.cat(heads, dim=-1)))
    return torch.stack(out)


def test_extra_tokens_join_self_attention_shared_by_group_or_by_index():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(6, 5, 8)  # 2 samples x 3 frames
    extra = torch.randn(2, 3, 8)
    shared = attn(x, extra=extra)  # frames of sample i read extra row i
    expected = _by_hand(attn, x, extra.repeat_interleave(3, dim=0))
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    index = torch.tensor([0, 1, 0, 1, 0, 1])  # alternating rows, as Hallo's bank over frames
    alternating = attn(x, extra=extra, extra_index=index)
    torch.testing.assert_close(alternating, _by_hand(attn, x, extra[index]), atol=1e-5, rtol=1e-5)
    assert (alternating - shared).abs().max() > 1e-3
    torch.testing.assert_close(attn(x, extra=extra, extra_index=torch.arange(6) // 3), shared)


def test_concat_block_rows_without_reference_run_plain_self_attention():
    torch.manual_seed(1)
    block = SpatialTransformerBlock(
        dim=8, heads=2, reference_attention="concat", cross_attention_dim=6
    ).eval()
    block.key = "k"
    f = 4
    x = torch.randn(2 * f, 5, 8)
    identity = torch.randn(2, 3, 6)
    reference = {"k": torch.randn(2, 5, 8)}  # [null-identity row, conditional row]
    index = torch.arange(f) % 2
    cond = Conditions(num_frames=f, reference=reference, identity=identity, reference_used=[False, True],
                      reference_index=index)  # fmt: skip
    out = block(x, cond)
    # sample 0 alone without any reference equals its rows in the mixed batch
    alone = block(x[:f], Conditions(num_frames=f, reference={"k": reference["k"][:0]}, identity=identity[:1],
                                    reference_used=[False]))  # fmt: skip
    torch.testing.assert_close(out[:f], alone, atol=1e-5, rtol=1e-5)
    # sample 1's even frames read row 0, odd frames row 1
    both = Conditions(num_frames=f, reference=reference, identity=identity[1:], reference_used=[True],
                      reference_index=index)  # fmt: skip
    torch.testing.assert_close(out[f:], block(x[f:], both), atol=1e-5, rtol=1e-5)
    one_row = Conditions(num_frames=f, reference={"k": reference["k"][1:]}, identity=identity[1:],
                         reference_used=[True])  # fmt: skip
    differs = (block(x[f:], one_row) - out[f:]).abs().amax(dim=(1, 2))
    assert (differs[1::2] < 1e-5).all() and (differs[0::2] > 1e-4).all()


def test_behaviour_switches_are_checked():
    with pytest.raises(ValueError, match="reference_frames_alternate needs reference_identity_interleave"):
        Behaviour(reference_frames_alternate=True)
    with pytest.raises(ValueError, match=r"behaviour.guidance must be one of \('separate', 'joint'\)"):
        Behaviour(guidance="both")
    with pytest.raises(ValueError, match="unknown behaviour switches"):
        Behaviour.from_config({"reference_fp32": True})

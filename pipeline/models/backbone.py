"""The backbone (denoising UNet): SD 1.5 structure + reference-attention, audio-attention, temporal modules.

Input latents are (b, c, f, h, w), like diffusers' `UNetMotionModel`. Per block: resnet -> spatial
transformer (self-attention, reference-attention on ReferenceNet tokens, audio-attention on the frame's
audio tokens, feed-forward) -> motion module (temporal attention over the n motion frames + f clip frames,
with the speed cross-attention). The face locator's features are added after `conv_in`.

`reference_latent_channels > 0` (the small embedded model, not EMO's full-size layout): the reference image's
VAE latents also go through a zero-initialised conv and are added after `conv_in` to every frame, as image-to-
video models such as Stable Video Diffusion give their conditioning frame to every frame; at small scale this
keeps the portrait's identity far better than reference-attention alone. `hide_mouth` fades the mouth out of
those latents (`behaviour.mask_reference_mouth`): a mouth added to every frame is otherwise copied.

Hallo's network is this model with other config values (set by `pipeline.hallo`): reference tokens joined
to self-attention and identity tokens in cross-attention (`reference_attention="concat"`,
`cross_attention_dim`), region-masked audio modules after the spatial transformers
(`audio_attention_type="region"`), motion modules only in blocks with attention, reading the ReferenceNet's
attention tokens as motion frames, normalising each frame, with stored position tables, no speed layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange

from .attention import AttentionSlicingMixin, Conditions
from .audio_attention import AUDIO_ATTENTION_TYPES
from .reference_net import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS
from .temporal import TemporalTransformer
from .unet import build_unet, run_unet, unet_args


def mouth_drive_map(
    opening: torch.Tensor, mouth_mask: torch.Tensor | None, latent_size: tuple[int, int]
) -> torch.Tensor:
    """The backbone's `mouth_drive` input: each frame's predicted mouth opening `opening` (b, f) drawn into the
    mouth region `mouth_mask` (b, 1, H, W) of 0/1 at image size, area-pooled to `latent_size` -> (b, f, h, w).
    No mask (no face found): zeros, the map of a sample without audio."""
    if mouth_mask is None:
        return opening.new_zeros(*opening.shape, *latent_size)
    region = F.adaptive_avg_pool2d(mouth_mask.to(opening.device, opening.dtype), latent_size)  # (b, 1, h, w)
    return opening[:, :, None, None] * region


def hide_mouth(reference_latents: torch.Tensor, mouth_mask: torch.Tensor) -> torch.Tensor:
    """`reference_latents` (b, c, h, w) with each latent cell scaled by the fraction of it outside the mouth
    region `mouth_mask` (b, 1, H, W) of 0/1 at image size (area pooling)."""
    inside = torch.nn.functional.adaptive_avg_pool2d(
        mouth_mask.to(reference_latents.device, reference_latents.dtype), reference_latents.shape[-2:]
    )
    return reference_latents * (1 - inside)


@dataclass
class EmoUNetOutput(BaseOutput):
    sample: torch.Tensor  # (b, c, f, h, w)


class EmoUNet3DModel(ModelMixin, ConfigMixin, AttentionSlicingMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
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
        audio_dim: int = 768,
        audio_attention_type: str = "cross",
        motion_num_attention_heads: int = 8,
        motion_norm_num_groups: int = 32,
        motion_max_seq_length: int = 32,
        speed_dim: int | None = 256,
        reference_attention: str = "cross",
        cross_attention_dim: int | None = None,
        motion_in_plain_blocks: bool = True,
        motion_frame_features: str = "layer",
        motion_norm_per_frame: bool = False,
        motion_stored_positions: bool = False,
        reference_latent_channels: int = 0,
        mouth_drive: bool = False,
    ):
        super().__init__()
        if audio_attention_type not in AUDIO_ATTENTION_TYPES:
            raise ValueError(
                f"audio_attention_type must be one of {sorted(AUDIO_ATTENTION_TYPES)}, got {audio_attention_type!r}"
            )
        audio_cls = AUDIO_ATTENTION_TYPES[audio_attention_type]
        per_block = audio_attention_type == "cross"
        build_unet(
            self,
            **unet_args(self.config),
            out_channels=out_channels,
            make_audio_attention=(lambda c: audio_cls(c, audio_dim, attention_head_dim))
            if per_block
            else None,
            make_audio_module=None
            if per_block
            else lambda c, width: audio_cls(
                c,
                width,
                audio_dim,
                attention_head_dim,
                norm_num_groups,
                shared_attention=audio_attention_type == "region_shared",
            ),  # fmt: skip
            make_motion=lambda c: TemporalTransformer(
                c,
                motion_num_attention_heads,
                motion_norm_num_groups,
                motion_max_seq_length,
                speed_dim,
                norm_per_frame=motion_norm_per_frame,
                stored_positions=motion_stored_positions,
            ),  # fmt: skip
            motion_in_plain_blocks=motion_in_plain_blocks,
            motion_frame_features=motion_frame_features,
        )
        self.reference_latent_in = None
        if reference_latent_channels:
            self.reference_latent_in = torch.nn.Conv2d(
                reference_latent_channels, block_out_channels[0], 3, padding=1
            )
            # zero at the start: a new injection leaves the backbone's output as it was
            torch.nn.init.zeros_(self.reference_latent_in.weight)
            torch.nn.init.zeros_(self.reference_latent_in.bias)
        self.mouth_drive_in = None
        if mouth_drive:
            # per frame: the predicted mouth opening drawn into the mouth region (`mouth_drive_map`); zero at
            # the start, as the reference-latent injection
            self.mouth_drive_in = torch.nn.Conv2d(1, block_out_channels[0], 3, padding=1)
            torch.nn.init.zeros_(self.mouth_drive_in.weight)
            torch.nn.init.zeros_(self.mouth_drive_in.bias)

    def token_grids(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The (h, w) token grid of each resolution level for latents of `latent_size`, finest first (the keys
        of `region_masks`)."""
        h, w = latent_size
        return [(h // 2**i, w // 2**i) for i in range(len(self.config.block_out_channels))]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
        reference_tokens: dict[str, torch.Tensor],
        motion_features: dict[str, torch.Tensor] | None = None,
        audio_tokens: torch.Tensor | None = None,
        speed_tokens: torch.Tensor | None = None,
        face_features: torch.Tensor | None = None,
        identity_tokens: torch.Tensor | None = None,
        reference_used: list[bool] | None = None,
        reference_index: torch.Tensor | None = None,
        region_masks: dict[tuple[int, int], torch.Tensor] | None = None,
        region_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        reference_latents: torch.Tensor | None = None,
        mouth_drive: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> EmoUNetOutput | tuple[torch.Tensor]:
        """Predict the noise (or v) of a clip.

        sample: (b, c, f, h, w) noisy latents; timestep: scalar or (b,);
        reference_tokens: ReferenceNet tokens of the reference image, key -> (b, s, c);
        motion_features: ReferenceNet features of the n motion frames, key -> (b, n, c, h, w), or None;
        audio_tokens: (b, f, k, audio_dim); speed_tokens: (b, f, speed_dim);
        face_features: (b, block_out_channels[0], h, w) from the face locator, added to every frame;
        "concat" reference attention: identity_tokens (b, k, cross_attention_dim), reference_used (per sample,
        False: no reference; `reference_tokens` then holds the other samples' rows only), reference_index (per
        frame of the samples with a reference, the row of `reference_tokens` it reads; default one row each);
        region audio modules: region_masks {(h, w): (b, h*w, 3)} full/face/lip weights of each level's tokens,
        region_weights the (pose, face, lip) weights of the three branches.
        reference_latents: (b, reference_latent_channels, h, w) the reference's latents (zeros for a sample
        without reference), or (b, reference_latent_channels, f, h, w) one per frame (a posed reference), required
        when the model has `reference_latent_channels`, else not accepted.
        motion_features with `motion_frame_features="attention"`: key -> (b, n, h*w, c) attention tokens.
        mouth_drive: (b, f, h, w) each frame's mouth-opening map (`mouth_drive_map`; zeros for a sample without
        audio), required when the model has `mouth_drive`, else not accepted.
        """
        b, _, f, h, w = sample.shape
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        cond = Conditions(
            num_frames=f,
            reference=reference_tokens,
            motion=motion_features,
            audio=rearrange(audio_tokens, "b f k d -> (b f) k d") if audio_tokens is not None else None,
            speed=speed_tokens,
            identity=identity_tokens,
            reference_used=reference_used,
            reference_index=reference_index,
            region_masks=region_masks,
            region_weights=tuple(region_weights),
        )
        added = None
        if face_features is not None:
            added = face_features.to(sample.dtype).repeat_interleave(f, dim=0)
        if (reference_latents is None) != (self.reference_latent_in is None):
            raise ValueError(
                "`reference_latents` must be given exactly when the backbone has `reference_latent_channels` "
                f"({self.config.reference_latent_channels})"
            )
        if reference_latents is not None:
            r = reference_latents.to(sample.dtype)
            if r.ndim == 5:  # one per frame (a posed reference)
                if r.shape[2] != f:
                    raise ValueError(
                        f"`reference_latents` has {r.shape[2]} frames, the sample {f}: give one per frame"
                    )
                injected = self.reference_latent_in(rearrange(r, "b c f h w -> (b f) c h w"))
            else:
                injected = self.reference_latent_in(r).repeat_interleave(f, dim=0)
            added = injected if added is None else added + injected
        if (mouth_drive is None) != (self.mouth_drive_in is None):
            raise ValueError("`mouth_drive` must be given exactly when the backbone has `mouth_drive`")
        if mouth_drive is not None:
            drawn = self.mouth_drive_in(rearrange(mouth_drive.to(sample.dtype), "b f h w -> (b f) 1 h w"))
            added = drawn if added is None else added + drawn
        out = run_unet(
            self,
            rearrange(sample, "b c f h w -> (b f) c h w"),
            timesteps.repeat_interleave(f),
            cond,
            added,
        )
        out = rearrange(out, "(b f) c h w -> b c f h w", f=f)
        return EmoUNetOutput(sample=out) if return_dict else (out,)

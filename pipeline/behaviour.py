"""How a pipeline conditions its networks: the switches that differ between EMO-native and Hallo models.

The networks' own structure is in each model's config (see `pipeline.hallo` for Hallo's values); these are the
pipeline-level choices, saved in the model folder's `model_index.json` as `behaviour`, so that
`EmoPipeline.from_pretrained(folder)(image, audio)` does the right thing for either kind of model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Behaviour:
    # audio features: "emo" = all wav2vec2 hidden states at 50 Hz resampled to the frame rate;
    # "hallo" = the waveform normalised whole, padded with zeros to whole clips, the CNN features
    # interpolated to the frame rate BEFORE the transformer, the outputs of its layers
    audio_features: str = "emo"
    # classifier-free guidance: "separate" = audio and reference scales (`combine_guidance`);
    # "joint" = one unconditional branch without reference, audio, identity or face-locator features
    guidance: str = "separate"
    # motion frames of the first clip: "zeros" (EMO) or copies of the reference image ("reference")
    first_motion_frames: str = "zeros"
    # motion frames of later clips: the last latents of the previous clip ("latents"), or its last decoded
    # frames encoded again by the VAE ("decoded")
    motion_frames: str = "latents"
    # resampling of the portrait to the model size (PIL filter name)
    image_resample: str = "lanczos"
    # models with `reference_latent_channels` (the small embedded model): the portrait's latents added to every
    # frame have its mouth region (`face.mouth_mask` of its face box) faded out, so that the mouth is drawn from
    # the voice rather than copied from the photo (training hides it the same way)
    mask_reference_mouth: bool = False
    # models with `reference_latent_channels` and a mouth head (`AudioProjection.mouth_opening`, the small
    # embedded model): > 0 makes the injected latents a posed reference, the portrait once per frame with its mouth
    # opened (`pipeline.mouth_pose`) by the voice's predicted opening (0 closed .. 1 wide, the 5th and 95th
    # percentiles of a real speaker's) times this fraction of the face height, counted from the portrait with its
    # lips brought together (`mouth_pose.close_mouth`: a smile with teeth showing is closed first); a guidance
    # branch without audio gets the closed mouth in every frame. Training opens the reference (one of the clip's
    # most closed mouths) by the target frame's measured mouth. 0: the one still portrait
    posed_reference: float = 0.0
    # > 0: the portrait's levels are stretched (one map for the three channels), this percentile of its pixels
    # clipped at either end, before any network sees it, and the decoded frames mapped back (`pipeline.levels`):
    # a model trained at small scale draws a dim, low-contrast portrait as it draws a well-exposed one. 0: the
    # portrait as given
    auto_levels: float = 0.0
    # --- Hallo's inference as it really runs (each looks accidental, each shapes its published output) ---
    # the ReferenceNet batch is [reference, motion frames...] for the unconditional then the conditional
    # branch, and its cross-attention context [uncond, cond] identity tokens is tiled over it row by row
    reference_identity_interleave: bool = False
    # the ReferenceNet features the backbone reads are rounded to float16, whatever the weights' dtype
    reference_fp16: bool = False
    # (with the interleave) the clip's frames read the reference features of the unconditional and the
    # conditional ReferenceNet rows in turn, even frames the former: Hallo's feature bank tiled over frames
    reference_frames_alternate: bool = False
    # the [reference, motion frames] pixels of a clip are normalised to [-1, 1] a second time when none of them
    # is negative (an all-bright portrait): Hallo's VaeImageProcessor skips normalising only on negative input
    renormalise_bright_batch: bool = False

    CHOICES = {
        "audio_features": ("emo", "hallo"),
        "guidance": ("separate", "joint"),
        "first_motion_frames": ("zeros", "reference"),
        "motion_frames": ("latents", "decoded"),
        "image_resample": ("lanczos", "bilinear", "bicubic", "nearest"),
    }

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"behaviour.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.posed_reference < 0 or (self.posed_reference and self.mask_reference_mouth):
            raise ValueError("behaviour.posed_reference must be >= 0 and excludes mask_reference_mouth")
        if not 0 <= self.auto_levels < 50:
            raise ValueError(f"behaviour.auto_levels must be a percentile in [0, 50), got {self.auto_levels}")
        if self.reference_frames_alternate and not self.reference_identity_interleave:
            raise ValueError("behaviour.reference_frames_alternate needs reference_identity_interleave")

    @classmethod
    def from_config(cls, values: dict | None) -> Behaviour:
        known = {f.name for f in fields(cls)}
        unknown = set(values or {}) - known
        if unknown:
            raise ValueError(f"unknown behaviour switches {sorted(unknown)}; known: {sorted(known)}")
        return cls(**(values or {}))

    def to_config(self) -> dict:
        return asdict(self)


EMO = Behaviour()

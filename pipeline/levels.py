"""Auto levels: a portrait's exposure stretched to the full range before the networks see it, undone on the frames.

A model trained at small scale on a few dozen clips draws what lies far from their exposure badly: the small
embedded model turns a dim, low-contrast portrait (a dark studio shot) into blocky patches, and the same portrait
with its levels stretched into a clean face (`benchmarks/RESULTS.md`, "Auto levels"). The stretch is one affine
map for the three channels (the hue stays), from the portrait's low and high percentiles (the darkest channel's
low one, the brightest channel's high one) to 0 and 1; the decoded frames get its inverse, so the video keeps the
photo's own exposure. Stretching each channel on its own was measured too: it also lifts the dim portraits, but
it shifts the colours of well-exposed portraits with a colour cast, and the video's colours move away from theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# the most a portrait is stretched: a near-flat one (a face in fog) is not blown up into noise
MIN_SPAN = 0.25


@dataclass(frozen=True)
class Levels:
    """`low` and `span` in [0, 1], the same for every channel: stretched = (x - low) / span, clipped to [0, 1]."""

    low: float
    span: float

    @classmethod
    def of(cls, image: torch.Tensor, percentile: float) -> Levels:
        """The levels of a (1, 3, H, W) image in [-1, 1] that map the lowest channel's `percentile`th percentile to
        0 and the highest channel's (100 - `percentile`)th percentile to 1 (a span of at least `MIN_SPAN`)."""
        if not 0 < percentile < 50:
            raise ValueError(f"the auto-levels percentile must be in (0, 50), got {percentile}")
        pixels = ((image[0].float().flatten(1) + 1) / 2).clamp(0, 1)  # (3, H*W)
        bounds = torch.quantile(pixels, torch.tensor([percentile, 100 - percentile]) / 100, dim=1)
        low, high = float(bounds[0].min()), float(bounds[1].max())
        span = max(high - low, MIN_SPAN)
        # a bright near-flat image: the stretched range stays inside [0, 1]
        return cls(low=min(low, 1 - span), span=span)

    def stretch(self, image: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> the same with these levels stretched to [0, 1], in [-1, 1]."""
        return (((image + 1) / 2 - self.low) / self.span).clamp(0, 1) * 2 - 1

    def restore(self, frames: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) float frames in [0, 1], drawn from the stretched portrait -> the portrait's own levels."""
        return (frames * self.span + self.low).clip(0, 1).astype(frames.dtype)

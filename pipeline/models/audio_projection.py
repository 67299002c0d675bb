"""Audio projection: the wav2vec2 features of a window of 2m+1 frames -> audio tokens of one video frame.

EMO concatenates the features of frames f-m .. f+m (m = 2) from all wav2vec2 layers. Parameter names follow
Hallo's `AudioProjModel` (`proj1`, `proj2`, `proj3`, `norm`), so its trained weights can be mapped later.

`mouth_drive=True` (the small embedded model) adds `mouth_head`: the same window -> the mouth opening of the
frame, in per-video standard deviations (`training.mouth.fit_mouth_head` fits it to the lip gap MediaPipe
measured on real clips). The backbone draws it into the mouth region of every frame (its `mouth_drive`), a
direct, local path from the voice to the lips next to the audio attention. `mouth_head_hidden`: the head's
hidden width (GELU MLP), or 0 for a single linear map.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn


def frame_windows(features: torch.Tensor, m: int) -> torch.Tensor:
    """(b, f, ...) per-frame features -> (b, f, 2m+1, ...) windows f-m..f+m, edges repeated."""
    padded = torch.cat([features[:, :1].expand(-1, m, *features.shape[2:]), features,
                        features[:, -1:].expand(-1, m, *features.shape[2:])], dim=1)  # fmt: skip
    return torch.stack([padded[:, i : i + features.shape[1]] for i in range(2 * m + 1)], dim=2)


class AudioProjection(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        window: int = 2,
        num_layers: int = 13,
        feature_dim: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
        mouth_drive: bool = False,
        mouth_head_hidden: int = 64,
    ):
        super().__init__()
        self.proj1 = nn.Linear((2 * window + 1) * num_layers * feature_dim, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)
        self.mouth_head = None
        if mouth_drive:
            inputs = (2 * window + 1) * num_layers * feature_dim
            if mouth_head_hidden:
                layers = [nn.Linear(inputs, mouth_head_hidden), nn.GELU(), nn.Linear(mouth_head_hidden, 1)]
            else:  # linear: fitted on the clips alone, it followed voices unlike the training speakers' better
                layers = [nn.Linear(inputs, 1)]
            self.mouth_head = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (b, f, layers, dim) per video frame -> audio tokens (b, f, context_tokens, output_dim)."""
        x = rearrange(frame_windows(features.to(self.dtype), self.config.window), "b f w l d -> b f (w l d)")
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        x = rearrange(self.proj3(x), "b f (k d) -> b f k d", k=self.config.context_tokens)
        return self.norm(x)

    def mouth_opening(self, features: torch.Tensor) -> torch.Tensor:
        """features: (b, f, layers, dim) per video frame -> the predicted mouth opening of each frame (b, f)
        (models with `mouth_drive`), in the units its head was fitted to (`training.mouth.fit_mouth_head`): standard
        deviations of a video's opening around its mean for a mouth drive, 0 closed .. 1 wide (a video's 5th and
        95th percentile) for a posed reference (`behaviour.posed_reference`)."""
        if self.mouth_head is None:
            raise ValueError("this audio projection has no mouth head (`mouth_drive=False`)")
        x = rearrange(frame_windows(features.to(self.dtype), self.config.window), "b f w l d -> b f (w l d)")
        return self.mouth_head(x).squeeze(-1)

"""A small log-mel audio encoder: the stand-in for wav2vec2 in models trained where no wav2vec2 can be fetched.

It speaks wav2vec2's interface (`forward(input_values, output_hidden_states=True)` -> an output with
`hidden_states`, one per layer, at 50 Hz), so `pipeline.audio_features.wav2vec_frame_features`, the audio
projection and training treat both encoders alike. The waveform (16 kHz, normalised by the feature
extractor) becomes a log-mel spectrogram with a 20 ms hop (50 frames per second, as wav2vec2) and goes
through residual dilated 1-D convolutions; hidden state 0 is the projected spectrogram, state i the output
of block i. The mel filters are transformers' `mel_filter_bank` (Slaney scale, as Whisper's front end).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers.audio_utils import mel_filter_bank
from transformers.modeling_outputs import BaseModelOutput


class _Block(nn.Module):
    """Residual block: dilated conv, GroupNorm, GELU, pointwise conv."""

    def __init__(self, dim: int, dilation: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(
            dim, dim, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation
        )
        self.norm = nn.GroupNorm(1, dim)
        self.point = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.point(nn.functional.gelu(self.norm(self.conv(x))))


class MelAudioEncoder(ModelMixin, ConfigMixin):
    """16 kHz waveform (b, samples) -> hidden states (b, t, hidden_size) at 50 Hz, `num_hidden_layers` + 1 of them.

    The config keeps wav2vec2's names (`hidden_size`, `num_hidden_layers`) that the pipeline builder reads.
    The receptive field of block i grows with dilation 2**i (kernel 3): 4 blocks see about +-0.3 s.
    """

    @register_to_config
    def __init__(
        self,
        sampling_rate: int = 16_000,
        n_fft: int = 512,
        hop_length: int = 320,
        num_mel_bins: int = 64,
        hidden_size: int = 64,
        num_hidden_layers: int = 4,
        kernel_size: int = 3,
    ):
        super().__init__()
        filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=num_mel_bins,
            min_frequency=0.0,
            max_frequency=sampling_rate / 2,
            sampling_rate=sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mel_filters", torch.tensor(filters, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.input_proj = nn.Conv1d(num_mel_bins, hidden_size, 1)
        self.blocks = nn.ModuleList(_Block(hidden_size, 2**i, kernel_size) for i in range(num_hidden_layers))

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(b, samples) -> (b, mel, t) log-mel, t = samples // hop_length (50 Hz at 16 kHz)."""
        cfg = self.config
        frames = waveform.shape[-1] // cfg.hop_length
        spec = torch.stft(
            waveform.float(), cfg.n_fft, cfg.hop_length, window=self.window, center=True, return_complex=True
        )[..., :frames]
        mel = self.mel_filters.T @ spec.abs().pow(2)
        return torch.log10(mel.clamp(min=1e-5))

    def forward(self, input_values: torch.Tensor, output_hidden_states: bool = True, **_) -> BaseModelOutput:
        x = self.input_proj(self.log_mel(input_values).to(self.dtype))
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        states = tuple(s.transpose(1, 2) for s in states)  # (b, t, hidden) like wav2vec2
        return BaseModelOutput(
            last_hidden_state=states[-1], hidden_states=states if output_hidden_states else None
        )

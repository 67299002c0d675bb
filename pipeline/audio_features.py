"""wav2vec2 features per video frame: the audio half of EMO's conditioning, computed once per audio.

All hidden states of the encoder (50 Hz) are stacked and linearly resampled to the video frame rate; the
m = 2 window around each frame is taken later by `AudioProjection`. Training data preparation calls the
same function to cache features, so training and inference see identical inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

SAMPLING_RATE = 16_000


@torch.no_grad()
def wav2vec_frame_features(
    audio_encoder,
    feature_extractor,
    waveform: np.ndarray,
    num_frames: int,
    fps: float,
    num_layers: int,
    chunk_seconds: float = 30.0,
) -> torch.Tensor:
    """16 kHz mono waveform -> (num_frames, num_layers, hidden) features, frame i covering [i/fps, (i+1)/fps).

    The waveform is zero-padded (or cut) to exactly num_frames / fps seconds, normalised by the feature
    extractor once, and encoded in chunks of `chunk_seconds` so that minutes of audio fit in memory.
    The last `num_layers` hidden states are kept (all of them for `num_layers = layers + 1`).
    """
    target = round(num_frames / fps * SAMPLING_RATE)
    waveform = np.pad(waveform[:target], (0, max(0, target - len(waveform))))
    values = feature_extractor(waveform, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_values
    device, dtype = audio_encoder.device, audio_encoder.dtype
    chunk = int(chunk_seconds * SAMPLING_RATE)
    starts = list(range(0, values.shape[1], chunk))
    if len(starts) > 1 and values.shape[1] - starts[-1] < SAMPLING_RATE:  # no sub-second tail chunk
        starts.pop()
    bounds = [*starts[1:], values.shape[1]]
    hidden = []
    for start, end in zip(starts, bounds, strict=True):
        out = audio_encoder(values[:, start:end].to(device, dtype), output_hidden_states=True)
        hidden.append(torch.stack(out.hidden_states[-num_layers:], dim=1))  # (1, layers, t, d)
    return resample_states(torch.cat(hidden, dim=2).float(), num_frames)[0]


def resample_states(states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b, layers, t, d) encoder states at 50 Hz -> (b, num_frames, layers, d), linear interpolation."""
    layers = states.shape[1]
    states = F.interpolate(rearrange(states, "b l t d -> b (l d) t"), size=num_frames, mode="linear")
    return rearrange(states, "b (l d) f -> b f l d", l=layers)


def frame_features(
    audio_encoder, input_values: torch.Tensor, num_frames: int, num_layers: int
) -> torch.Tensor:
    """Differentiable version for training an audio encoder: normalised waveforms (b, samples) covering
    exactly `num_frames` video frames -> (b, num_frames, num_layers, hidden)."""
    out = audio_encoder(input_values, output_hidden_states=True)
    return resample_states(torch.stack(out.hidden_states[-num_layers:], dim=1).float(), num_frames)


@torch.no_grad()
def hallo_frame_features(
    audio_encoder,
    feature_extractor,
    waveform: np.ndarray,
    num_frames: int,
    padded_frames: int,
    fps: float,
    num_layers: int,
) -> torch.Tensor:
    """Hallo's audio features: 16 kHz waveform -> (padded_frames, num_layers, hidden).

    The waveform is normalised as a whole, then padded with zeros by `padded_frames - num_frames` frames of
    `16000 // fps` samples; wav2vec2's convolutional features are linearly interpolated (align_corners) to
    `padded_frames` steps before the feature projection and the transformer, whose last `num_layers` hidden
    states (the layer outputs) are kept. One pass, no chunks.
    """
    values = feature_extractor(waveform, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_values
    values = F.pad(values, (0, (padded_frames - num_frames) * (SAMPLING_RATE // int(fps))))

    def to_frame_rate(module, inputs, output):  # (b, c, t) at ~50 Hz -> (b, c, padded_frames)
        return F.interpolate(output, size=padded_frames, mode="linear", align_corners=True)

    hook = audio_encoder.feature_extractor.register_forward_hook(to_frame_rate)
    try:
        out = audio_encoder(values.to(audio_encoder.device, audio_encoder.dtype), output_hidden_states=True)
    finally:
        hook.remove()
    return torch.stack(out.hidden_states[-num_layers:], dim=1)[0].transpose(0, 1).float()

"""Teaching the audio encoder what a mouth does: pretraining on the mouth opening measured in the clips.

A wav2vec2 learns speech from 960 h of audio; ours, trained from nothing on a CPU, needs a direct signal.
The prepared clips give one: the lip gap measured with MediaPipe on every frame (`pipeline.metrics`),
normalised per video. `pretrain_audio_encoder` fits the encoder plus a small head (`MouthHead`) to predict
it from the sound of a window of frames; the head is dropped afterwards, and the encoder's features carry
what the backbone's audio attention needs to open and close the mouth. The stages then keep the encoder
frozen (its features are cached once per video, like wav2vec2's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.audio import load_audio
from pipeline.audio_features import SAMPLING_RATE, frame_features
from pipeline.metrics import correlation, mouth_opening

from .data import read_clips

logger = logging.getLogger("training.mouth")


def measure_clips(data_root: str | Path) -> dict[str, Path]:
    """Mouth opening of every frame of every prepared video -> `videos/NAME/mouth.npy` (video_frames,),
    NaN outside the clips and where no face was found. Existing files are kept. Returns name -> file."""
    data_root = Path(data_root)
    clips_by_video: dict[str, list] = {}
    for clip in read_clips(data_root):
        clips_by_video.setdefault(clip.video, []).append(clip)
    files = {}
    for video, clips in sorted(clips_by_video.items()):
        target = data_root / "videos" / video / "mouth.npy"
        if not target.is_file():
            values = np.full(clips[0].video_frames, np.nan)
            for clip in clips:
                frames = [
                    np.asarray(Image.open(clip.folder / f"{t:05d}.{clip.image_format}").convert("RGB"))
                    for t in range(clip.num_frames)
                ]
                values[clip.start : clip.start + clip.num_frames] = mouth_opening(frames)
            np.save(target, values)
        files[video] = target
    return files


class MouthHead(nn.Module):
    """Per-frame features (b, f, layers, d) -> predicted normalised mouth opening (b, f)."""

    def __init__(self, num_layers: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_layers * dim, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.flatten(2)).squeeze(-1)


def _load_videos(
    data_root: Path, feature_extractor, videos: list[str]
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(normalised waveform, per-video z-scored mouth opening) of each video with enough measured frames."""
    items = []
    for video in videos:
        folder = data_root / "videos" / video
        meta = json.loads((folder / "meta.json").read_text())
        mouth = np.load(folder / "mouth.npy")
        if np.isfinite(mouth).sum() < 25 or np.nanstd(mouth) == 0:
            continue
        mouth = (mouth - np.nanmean(mouth)) / np.nanstd(mouth)
        waveform = load_audio(folder / meta["audio"]["file"], sampling_rate=SAMPLING_RATE, mono=True).mono
        target = round(meta["num_frames"] / meta["fps"] * SAMPLING_RATE)
        waveform = np.pad(waveform[:target], (0, max(0, target - len(waveform))))
        values = feature_extractor(waveform, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_values[0]
        items.append((values, mouth))
    return items


def pretrain_audio_encoder(
    pipe,
    data_root: str | Path,
    steps: int,
    heldout: set[str] = frozenset(),
    window_frames: int = 50,
    batch_size: int = 16,
    lr: float = 2e-3,
    fps: float = 25.0,
    seed: int = 0,
) -> dict:
    """Fit `pipe.audio_encoder` (+ a MouthHead) to the measured mouth opening -> {"train_r", "heldout_r"}:
    the correlation of prediction and measure on training windows and on the videos named in `heldout`."""
    data_root = Path(data_root)
    videos = sorted({c.video for c in read_clips(data_root)})
    layers = pipe.audio_projection.config.num_layers
    train_items = _load_videos(data_root, pipe.feature_extractor, [v for v in videos if v not in heldout])
    held_items = _load_videos(data_root, pipe.feature_extractor, [v for v in videos if v in heldout])
    encoder = pipe.audio_encoder.train().requires_grad_(True)
    head = MouthHead(layers, encoder.config.hidden_size)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    per_frame = round(SAMPLING_RATE / fps)
    # sample windows where at least half of the frames were measured
    starts = []
    for i, (_, mouth) in enumerate(train_items):
        for s in range(0, len(mouth) - window_frames + 1, 5):
            if np.isfinite(mouth[s : s + window_frames]).mean() >= 0.5:
                starts.append((i, s))
    if not starts:
        raise ValueError(f"no {window_frames}-frame window with measured mouth opening in {data_root}")
    train_r = float("nan")
    for step in range(steps):
        picks = [starts[j] for j in rng.integers(0, len(starts), batch_size)]
        audio = torch.stack(
            [train_items[i][0][s * per_frame : (s + window_frames) * per_frame] for i, s in picks]
        )
        target = torch.from_numpy(
            np.stack([train_items[i][1][s : s + window_frames] for i, s in picks])
        ).float()
        pred = head(frame_features(encoder, audio, window_frames, layers))
        keep = torch.isfinite(target)
        loss = ((pred - target.nan_to_num()) ** 2)[keep].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*encoder.parameters(), *head.parameters()], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            train_r = correlation(pred.detach().numpy().ravel(), target.numpy().ravel())
            logger.info("audio encoder step %d: loss %.3f, r %.3f", step, loss.item(), train_r)
    encoder.eval().requires_grad_(False)

    heldout_r = []
    with torch.no_grad():
        for values, mouth in held_items:
            pred = head(frame_features(encoder, values[None], len(mouth), layers))[0].numpy()
            heldout_r.append(correlation(pred, mouth))
    return {"train_r": train_r, "heldout_r": float(np.nanmean(heldout_r)) if heldout_r else float("nan")}


def fit_mouth_head(
    pipe,
    data_root: str | Path | list,
    steps: int,
    heldout_fraction: float = 0.1,
    window_frames: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    fps: float = 25.0,
    seed: int = 0,
    target: str = "zscore",
    speech: list | tuple = (),
    speech_share: float = 0.5,
) -> dict:
    """Fit the mouth head of a mouth-drive model (`pipe.audio_projection.mouth_head`) to the measured mouth
    opening (`target`: "zscore", per video; "normalised", the 0..1 scale of `normalised_opening`, which a posed
    reference needs) from the features of its frozen audio encoder, computed as inference computes them
    (`wav2vec_frame_features` of the whole sound). Every `1 / heldout_fraction`-th video (sorted by name)
    is kept out and measured -> {"train_r", "heldout_r", "videos"}: the correlation of prediction and measure.

    `speech`: more sounds with a known opening on the same scale, (16 kHz waveform, opening per frame), e.g.
    espeak-ng's (`spoken_phonemes.phoneme_opening`; "normalised" only); `speech_share` of every batch is drawn
    from them, every tenth is kept out -> also {"speech_heldout_r", "speech"}."""
    from pipeline.audio_features import wav2vec_frame_features

    from .talking_photos import normalised_opening

    if target not in ("zscore", "normalised"):
        raise ValueError(f"target must be 'zscore' or 'normalised', got {target!r}")
    roots = [Path(r) for r in (data_root if isinstance(data_root, list | tuple) else [data_root])]
    projection = pipe.audio_projection
    if projection.mouth_head is None:
        raise ValueError("the pipeline's audio projection has no mouth head (build it with mouth_drive=True)")
    layers = projection.config.num_layers
    items = []  # (features (frames, layers, dim), z-scored mouth (frames,))
    for root in roots:
        for video in sorted({c.video for c in read_clips(root)}):
            folder = root / "videos" / video
            if not (folder / "mouth.npy").is_file():
                continue
            mouth = np.load(folder / "mouth.npy")
            if np.isfinite(mouth).sum() < 25 or np.nanstd(mouth) == 0:
                continue
            meta = json.loads((folder / "meta.json").read_text())
            waveform = load_audio(folder / meta["audio"]["file"], sampling_rate=SAMPLING_RATE, mono=True).mono
            features = wav2vec_frame_features(
                pipe.audio_encoder, pipe.feature_extractor, waveform, len(mouth), fps, num_layers=layers
            )
            if target == "zscore":
                values = (mouth - np.nanmean(mouth)) / np.nanstd(mouth)
            else:
                values = normalised_opening(mouth, fill=False)
            items.append((features.float(), values))
    if not items:
        raise ValueError(f"no video with measured mouth opening (mouth.npy) in {roots}")
    if speech and target != "normalised":
        raise ValueError("speech with a known opening is on the 0..1 scale: it needs target='normalised'")
    spoken = [
        (wav2vec_frame_features(pipe.audio_encoder, pipe.feature_extractor, waveform, len(opening), fps,
                                num_layers=layers).float(), np.asarray(opening, np.float64))
        for waveform, opening in speech
    ]  # fmt: skip
    every = max(2, round(1 / heldout_fraction)) if heldout_fraction else 0
    held, train_items = _split(items, every)
    held_speech, train_speech = _split(spoken, 10)
    starts = _window_starts(train_items, window_frames)
    if not starts:
        raise ValueError(f"no {window_frames}-frame window with measured mouth opening in {roots}")
    speech_starts = _window_starts(train_speech, window_frames)
    from_speech = round(batch_size * speech_share) if speech_starts else 0
    head = projection.mouth_head.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    train_r = float("nan")
    for step in range(steps):
        picks = [(train_items, *starts[j]) for j in rng.integers(0, len(starts), batch_size - from_speech)]
        picks += [(train_speech, *speech_starts[j]) for j in rng.integers(0, len(speech_starts), from_speech)]
        features = torch.stack([group[i][0][s : s + window_frames] for group, i, s in picks])
        target = torch.from_numpy(
            np.stack([group[i][1][s : s + window_frames] for group, i, s in picks])
        ).float()
        pred = projection.mouth_opening(features)
        keep = torch.isfinite(target)
        loss = ((pred - target.nan_to_num()) ** 2)[keep].mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            train_r = correlation(pred.detach().numpy()[keep.numpy()], target.numpy()[keep.numpy()])
            logger.info("mouth head step %d: loss %.3f, r %.3f", step, loss.item(), train_r)
    head.eval().requires_grad_(False)
    figures = {"train_r": float(train_r), "heldout_r": _heldout_r(projection, held), "videos": len(items)}
    if spoken:
        figures |= {"speech_heldout_r": _heldout_r(projection, held_speech), "speech": len(spoken)}
    return figures


def _split(items: list, every: int) -> tuple[list, list]:
    """Every `every`-th item kept out (none for 0) -> (kept out, the rest)."""
    out = [item for i, item in enumerate(items) if every and i % every == every - 1]
    return out, [item for i, item in enumerate(items) if not (every and i % every == every - 1)]


def _window_starts(items: list, window_frames: int) -> list[tuple[int, int]]:
    """(item, first frame) of every `window_frames` window, 5 frames apart, at least half of it measured."""
    return [
        (i, s)
        for i, (_, mouth) in enumerate(items)
        for s in range(0, max(1, len(mouth) - window_frames + 1), 5)
        if len(mouth) >= window_frames and np.isfinite(mouth[s : s + window_frames]).mean() >= 0.5
    ]


def _heldout_r(projection, held: list) -> float:
    """The mean over `held` (features, measured opening) of the correlation of the head's opening with it."""
    with torch.no_grad():
        values = [
            correlation(
                projection.mouth_opening(features[None])[0].numpy()[np.isfinite(m)], m[np.isfinite(m)]
            )
            for features, m in held
        ]
    return float(np.nanmean(values)) if values else float("nan")


def with_new_mouth_head(pipe, hidden: int) -> None:
    """Give `pipe`'s audio projection a fresh mouth head of `hidden` width (0: linear), its other weights kept."""
    from pipeline.models import AudioProjection

    old = pipe.audio_projection
    new = AudioProjection.from_config(old.config, mouth_drive=True, mouth_head_hidden=hidden)
    kept = {k: v for k, v in old.state_dict().items() if not k.startswith("mouth_head.")}
    result = new.load_state_dict(kept, strict=False)
    if result.unexpected_keys or any(not k.startswith("mouth_head.") for k in result.missing_keys):
        raise ValueError("the audio projection's weights do not fit its own config")
    pipe.register_modules(audio_projection=new)


def refit_mouth_head(
    model: str | Path,
    out: str | Path,
    clips: str | Path,
    steps: int = 1500,
    hidden: int = 64,
    speech: int = 0,
    seed: int = 0,
    **fit_options,
) -> dict:
    """A posed-reference model (`behaviour.posed_reference`) with a new mouth head of `hidden` width, fitted
    on the mouths measured in the prepared `clips` and on `speech` espeak-ng sentences with their phoneme
    openings (`spoken_phonemes.training_speech`) -> the model saved to `out`, its other weights unchanged (the
    backbone follows whatever opening the pose shows: training poses the reference by the measured mouth);
    returns the fit's figures, also in `out/mouth_head.json`."""
    from pipeline import EmoPipeline

    pipe = EmoPipeline.from_pretrained(model)
    if not pipe.behaviour.posed_reference:
        raise ValueError(f"{model}: not a posed-reference model (behaviour.posed_reference is 0)")
    torch.manual_seed(seed)
    figures = fit_posed_head(pipe, clips, steps, hidden, speech, seed=seed, **fit_options)
    pipe.save_pretrained(out)
    (Path(out) / "mouth_head.json").write_text(json.dumps(figures))
    return figures


def fit_posed_head(pipe, clips, steps: int, hidden: int, speech: int, seed: int = 0, **fit_options) -> dict:
    """`pipe` with a fresh mouth head of `hidden` width fitted to the 0..1 opening of the `clips`' measured mouths
    and of `speech` espeak-ng sentences (`spoken_phonemes.training_speech(speech, seed)`) -> the fit's figures
    with the settings (what `mouth_head.json` holds)."""
    from .spoken_phonemes import training_speech

    with_new_mouth_head(pipe, hidden)
    spoken = training_speech(speech, seed=seed) if speech else ()
    figures = fit_mouth_head(pipe, clips, steps, target="normalised", speech=spoken, seed=seed, **fit_options)
    return figures | {"steps": steps, "hidden": hidden, "target": "normalised", "speech_seed": seed}


def main(argv: list[str] | None = None) -> dict:
    """python -m training.mouth --model M --clips runs/emo-drive/data --out OUT [--speech 800] [--hidden 64]"""
    import argparse

    parser = argparse.ArgumentParser(description="Refit the mouth head of a posed-reference model.")
    parser.add_argument("--model", type=Path, required=True, help="a model folder with a posed reference")
    parser.add_argument("--clips", type=Path, required=True, help="prepared clips with mouth.npy (training)")
    parser.add_argument("--out", type=Path, required=True, help="the new model folder")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=64, help="the head's hidden width (0: linear)")
    parser.add_argument("--speech", type=int, default=800, help="espeak-ng sentences to fit on too (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.out.resolve() == args.model.resolve():
        raise SystemExit("--out is --model: write the refitted model to another folder")
    try:
        figures = refit_mouth_head(args.model, args.out, args.clips, args.steps, args.hidden, args.speech,
                                   args.seed)  # fmt: skip
    except (ValueError, RuntimeError) as error:
        raise SystemExit(str(error)) from None
    logger.info("mouth head refitted -> %s: %s", args.out, figures)
    return figures


if __name__ == "__main__":
    main()

"""Talking photos (`training.talking_photos`): a photo's mouth opened as a donor clip's was, with its sound."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.face import face_landmarks
from pipeline.metrics import correlation
from training.data import EmoDataset, read_clips
from training.photos import prepare_photos
from training.prepare import PrepareOptions, write_manifest
from training.talking_photos import make_talking_photos, normalised_opening, open_mouth

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT / "assets" / "examples" / "portrait.png"


def _donor(root: Path, name: str, opening: np.ndarray, start: int = 5) -> None:
    """A prepared video with sound, one clip of len(opening) frames at `start` and its measured mouth."""
    folder = root / "videos" / name
    folder.mkdir(parents=True)
    frames = start + len(opening) + 5
    with wave.open(str(folder / "audio.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes((np.random.default_rng(0).normal(0, 3000, frames * 640)).astype(np.int16).tobytes())
    mouth = np.full(frames, np.nan)
    mouth[start : start + len(opening)] = opening
    np.save(folder / "mouth.npy", mouth)
    box = [30.0, 30.0, 90.0, 90.0]
    meta = {
        "source": name, "fps": 25.0, "size": 128, "num_frames": frames, "image_format": "jpg",
        "audio": {"file": "audio.wav", "sampling_rate": 16_000, "num_samples": frames * 640}, "wav2vec": None,
        "clips": [{"index": 0, "start": start, "end": start + len(opening), "boxes": [box] * len(opening),
                   "speeds": [0.0] * len(opening)}],
    }  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    prepare_photos([PORTRAIT], root, size=128, frames=2)
    return root


def _mouth_landmarks() -> np.ndarray:
    """FaceMesh-numbered landmarks of a drawn face: lips meeting at y 72.5, mouth 28 px wide, chin at 100."""
    lm = np.zeros((468, 2), np.float32)
    for index, point in {78: (54, 72.5), 308: (74, 72.5), 61: (50, 72.5), 291: (78, 72.5), 13: (64, 72.5),
                         14: (64, 72.5), 17: (64, 76), 152: (64, 100), 10: (64, 30)}.items():  # fmt: skip
        lm[index] = point
    return lm


def test_opening_the_mouth_drops_the_lower_lip_and_shows_the_inside():
    image = np.full((128, 128, 3), (200, 160, 140), np.uint8)
    image[70:73] = image[73:76] = (0, 0, 0)
    image[70:73, 48:81] = (180, 40, 50)  # upper lip
    image[73:76, 48:81] = (150, 30, 40)  # lower lip
    lm = _mouth_landmarks()
    image[70:76, :48] = image[70:76, 81:] = (200, 160, 140)
    assert np.array_equal(open_mouth(image, lm, 0.0), image)
    opened = open_mouth(image, lm, 8.0).astype(int)
    column = opened[:, 64]
    assert np.array_equal(opened[:70], image[:70])  # above the mouth: untouched
    assert np.abs(opened[:, :30] - image[:, :30]).max() <= 1  # beside it: untouched
    assert column[75:80].mean() < 100 and column[75:80, 0].mean() < 110  # the dark inside below the lips
    lower = 74 + np.flatnonzero(np.all(np.abs(column[74:] - (150, 30, 40)) < 20, axis=1))
    assert (
        lower.min() == pytest.approx(73 + 8, abs=1.5) and len(lower) >= 3
    )  # the lower lip moved down by the opening
    # at the mouth corner the lower lip moves less than at the centre
    corner = 74 + np.flatnonzero(np.all(np.abs(opened[74:, 50] - (150, 30, 40)) < 20, axis=1))
    assert 74 <= corner.min() < lower.min()


def test_the_portraits_mouth_opens_step_by_step(photo):
    image = np.asarray(Image.open(next((photo / "videos").iterdir()) / "clips/000/00000.jpg").convert("RGB"))
    landmarks = face_landmarks(image)
    assert landmarks is not None and landmarks.shape == (468, 2)
    face = float(np.hypot(*(landmarks[10] - landmarks[152])))
    changed = [
        np.abs(open_mouth(image, landmarks, a * face).astype(int) - image).sum() for a in (0.02, 0.05, 0.08)
    ]
    assert 0 < changed[0] < changed[1] < changed[2]
    assert np.abs(open_mouth(image, landmarks, 0.08 * face)[:50].astype(int) - image[:50]).max() <= 1


def test_normalised_opening_spans_the_donors_range_and_fills_gaps():
    values = normalised_opening(np.array([0.01, np.nan, 0.03, 0.05, np.nan, np.nan, 0.02, 0.04]))
    assert values.shape == (8,) and np.all(np.isfinite(values))
    assert values.min() == 0.0 and 1.0 <= values.max() <= 1.2
    assert values[4] == pytest.approx((2 * values[3] + values[6]) / 3)  # filled between its neighbours
    with pytest.raises(ValueError, match="fewer than two"):
        normalised_opening(np.array([np.nan, 0.1, np.nan]))


def test_talking_photos_follow_their_donor_and_train_as_clips(photo, tmp_path):
    clips = tmp_path / "clips"
    t = np.arange(30)
    donor_mouth = 0.02 + 0.015 * np.sin(t / 2.0)  # a mouth opening and closing about every 12 frames
    _donor(clips, "grid_s1__a", donor_mouth)
    _donor(clips, "real__b", donor_mouth[::-1].copy(), start=0)
    write_manifest(clips, PrepareOptions(size=128, clip_length=30, min_clip_length=12), {})

    out = tmp_path / "talking"
    manifest = make_talking_photos(photo, clips, out, per_photo=2, seed=0)
    assert manifest["num_clips"] == 2 and not manifest["skipped"]
    made = read_clips(out)
    assert {json.loads((out / "videos" / c.video / "meta.json").read_text())["talking_photo"]["donor"]
            for c in made} == {"grid_s1__a", "real__b"}  # fmt: skip
    for clip in made:
        meta = json.loads((out / "videos" / clip.video / "meta.json").read_text())
        donor = meta["talking_photo"]["donor"]
        donor_meta = json.loads((clips / "videos" / donor / "meta.json").read_text())
        # the clip sits on the donor's timeline, with the donor's own sound
        assert clip.start == donor_meta["clips"][0]["start"] and clip.video_frames == donor_meta["num_frames"]
        assert (out / "videos" / clip.video / "audio.wav").resolve() == (
            clips / "videos" / donor / "audio.wav"
        ).resolve()
        frames = [np.asarray(Image.open(clip.folder / f"{i:05d}.jpg"), int) for i in range(clip.num_frames)]
        wanted = np.load(clips / "videos" / donor / "mouth.npy")[clip.start : clip.start + clip.num_frames]
        still = frames[int(np.argmin(wanted))]  # the donor's most closed frame: the photo as it is
        assert correlation([np.abs(f - still).sum() for f in frames], wanted) > 0.9
        assert np.all(clip.speeds == 0)

    # a second call keeps what is there
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    make_talking_photos(photo, clips, out, per_photo=2, seed=0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == before

    # stage 2 reads them next to the clips
    features = tmp_path / "features"
    features.mkdir()
    for clip in made + read_clips(clips):
        np.save(features / f"{clip.video}.npy", np.zeros((clip.video_frames, 1, 4), np.float32))
    dataset = EmoDataset([clips, out], 64, num_frames=8, num_motion_frames=4, with_audio=True,
                         audio_features_dir=features)  # fmt: skip
    assert len(dataset.clips) == 4
    sample = dataset[3]
    assert sample["pixel_values"].shape == (12, 3, 64, 64) and sample["audio_features"].shape == (12, 1, 4)


def test_clips_without_a_measured_mouth_are_a_clear_error(photo, tmp_path):
    clips = tmp_path / "clips"
    (clips / "videos").mkdir(parents=True)
    write_manifest(clips, PrepareOptions(size=128, clip_length=30, min_clip_length=12), {})
    with pytest.raises(ValueError, match="no clip with sound and a measured mouth"):
        make_talking_photos(photo, clips, tmp_path / "talking")


def test_talking_photos_keep_their_added_opening_and_a_posed_reference_matches_their_frames(photo, tmp_path):
    """Each talking-photo clip keeps the opening it added (`mouth.npy`, rewritten by `write_openings` where
    missing); a dataset with `posed_reference` opens its reference by each target frame's wider mouth, so that
    the posed frames are the targets' mouths on the reference (exact here, up to rounding and JPEG)."""
    from training.talking_photos import OPENING_FILE, write_openings

    clips = tmp_path / "clips"
    donor_mouth = 0.02 + 0.015 * np.sin(np.arange(30) / 2.0)
    _donor(clips, "grid_s1__a", donor_mouth)
    write_manifest(clips, PrepareOptions(size=128, clip_length=30, min_clip_length=12), {})
    out = tmp_path / "talking"
    make_talking_photos(photo, clips, out, per_photo=1, seed=0)
    (clip,) = read_clips(out)
    meta = json.loads((out / "videos" / clip.video / "meta.json").read_text())
    opening = np.load(out / "videos" / clip.video / OPENING_FILE)
    expected = normalised_opening(np.load(clips / "videos" / "grid_s1__a" / "mouth.npy"))[5:35]
    np.testing.assert_allclose(opening[5:35], expected * meta["talking_photo"]["amplitude"])
    assert np.isnan(opening[:5]).all() and np.isnan(opening[35:]).all()
    (out / "videos" / clip.video / OPENING_FILE).unlink()
    assert write_openings(out, clips) == 1 and write_openings(out, clips) == 0
    np.testing.assert_allclose(np.load(out / "videos" / clip.video / OPENING_FILE), opening)

    features = tmp_path / "features"
    features.mkdir()
    np.save(features / f"{clip.video}.npy", np.zeros((clip.video_frames, 1, 4), np.float32))
    options = dict(num_frames=8, num_motion_frames=2, with_audio=True, audio_features_dir=features)
    dataset = EmoDataset(out, 128, posed_reference=True, **options)
    plain = EmoDataset(out, 128, **options)
    gaps = opening[clip.start : clip.start + clip.num_frames]
    errors = []  # (mouth error of the posed frame, of the still reference) where the target's mouth is wider
    for i in range(6):
        sample = dataset[i]
        frames = [dataset._image(clip, t) for t in range(clip.num_frames)]
        reference = next(t for t, f in enumerate(frames) if torch.equal(f, sample["reference"]))
        n = len(sample["pixel_values"])
        start = next(
            s for s in range(clip.num_frames - n + 1)
            if all(torch.equal(frames[s + k], p) for k, p in enumerate(sample["pixel_values"]))
        )  # fmt: skip
        window = list(range(start, start + n))
        outside = sorted((t for t in range(clip.num_frames) if t not in window), key=lambda t: gaps[t])
        assert reference in outside[: max(1, len(outside) // 4)]  # one of the most closed mouths
        targets, posed = sample["pixel_values"][2:], sample["posed_reference"]
        assert posed.shape == (8, 3, 128, 128)
        mouth = (slice(None), slice(70, 100), slice(45, 80))  # the portrait's mouth and chin at 128 px
        for target, pose, t in zip(targets, posed, window[2:], strict=True):
            if gaps[t] - gaps[reference] > 0.01:  # a wider mouth: the pose has it, the still photo not
                errors.append(
                    [(pose - target)[mouth].abs().mean(), (sample["reference"] - target)[mouth].abs().mean()]
                )
            elif gaps[t] <= gaps[reference]:  # no wider: the reference as it is
                assert torch.equal(pose, sample["reference"])
    errors = np.array(errors)
    assert len(errors) >= 10 and errors[:, 0].mean() < 0.6 * errors[:, 1].mean()
    assert "posed_reference" not in plain[0]
    (out / "videos" / clip.video / OPENING_FILE).unlink()
    with pytest.raises(ValueError, match="mouth.npy"):
        EmoDataset(out, 128, posed_reference=True, **options)

"""training.device_pack: a prepared work folder survives pack -> unpack, and a trained model collect -> restore."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
from conftest import tiny_pipeline
from PIL import Image
from safetensors.torch import load_file

from pipeline.audio import write_wav
from training.device_pack import collect, pack, restore, unpack

SIZE, FRAMES, SR = 32, 12, 16_000


def frame(t: int, seed: int) -> np.ndarray:
    """A smooth test frame: a colour gradient with a bright disc that moves with t."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rng = np.random.default_rng(seed)
    base = np.stack([x, y, 1 - x * y], -1) * 0.6 + rng.uniform(0, 0.2, 3)
    disc = ((x - 0.3 - t / 40) ** 2 + (y - 0.5) ** 2 < 0.02)[..., None]
    return np.round(255 * np.clip(base + 0.35 * disc, 0, 1)).astype(np.uint8)


def read_pcm(path) -> np.ndarray:
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float64)


@pytest.fixture
def work(tmp_path):
    """A work folder shaped like small_model's: two prepared videos, one talking photo whose sound links to a
    video's, photos/DONE."""
    work = tmp_path / "work"
    for n, video in enumerate(["data/videos/a", "data/videos/b", "talking_photos/videos/talk_a"]):
        clip = work / video / "clips" / "000"
        clip.mkdir(parents=True)
        for t in range(FRAMES):
            Image.fromarray(frame(t, n)).save(clip / f"{t:05d}.jpg", quality=95)
        (work / video / "meta.json").write_text(json.dumps({"num_frames": FRAMES, "n": n}))
    t = np.arange(SR // 2) / SR
    write_wav(work / "data/videos/a/audio.wav", 0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(np.pi * t * 2), SR)
    write_wav(work / "data/videos/b/audio.wav", 0.3 * np.sin(2 * np.pi * 330 * t), SR)
    (work / "talking_photos/videos/talk_a/audio.wav").symlink_to(work / "data/videos/a/audio.wav")
    np.save(work / "data/videos/a/mouth.npy", np.linspace(0, 1, FRAMES))
    for done in ("data/DONE", "talking_photos/DONE", "photos/DONE"):
        (work / done).parent.mkdir(parents=True, exist_ok=True)
        (work / done).touch()
    return work


def test_a_packed_work_folder_unpacks_to_the_same_files_frames_and_sound(work, tmp_path):
    counts = pack(work, tmp_path / "pack", shards=2)
    assert counts | {"bytes": 0} == {
        "clips": 3,
        "frames": 3 * FRAMES,
        "wavs": 3,
        "distinct_wavs": 2,
        "bytes": 0,
    }
    # the linked sound is stored once: 4-bit ADPCM of the two distinct half-second wavs
    assert (tmp_path / "pack" / "audio.adpcm").stat().st_size == 2 * SR // 2 // 2

    out = tmp_path / "unpacked"
    assert unpack(tmp_path / "pack", out, workers=1) == 3 * FRAMES

    originals = sorted(p.relative_to(work) for p in work.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == originals
    for name in originals:
        if name.suffix in (".json", ".npy", ""):
            assert (out / name).read_bytes() == (work / name).read_bytes(), name
        elif name.suffix == ".jpg":
            a = np.asarray(Image.open(work / name), np.float64)
            b = np.asarray(Image.open(out / name), np.float64)
            assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 30, name
        else:
            a, b = read_pcm(work / name), read_pcm(out / name)
            assert len(a) == len(b)
            assert 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)) > 20, name


def test_a_collected_model_restores_over_its_base_with_the_frozen_parts_kept(tmp_path):
    base, trained = tmp_path / "base", tmp_path / "trained"
    tiny_pipeline(seed=0).save_pretrained(base)
    tiny_pipeline(seed=1).save_pretrained(trained)  # every weight differs from base's

    vae = "vae/diffusion_pytorch_model.safetensors"
    assert any((load_file(base / vae)[k] != v).any() for k, v in load_file(trained / vae).items())
    chunks = collect(trained, tmp_path / "out", "m")
    assert [c.name for c in chunks] == ["m.tar.0"] and not (chunks[0].parent / "vae").exists()
    restored = restore(base, chunks, tmp_path / "restored")

    for part, source in (("denoising_unet", trained), ("reference_net", trained), ("vae", base)):
        want = load_file(source / part / "diffusion_pytorch_model.safetensors")
        got = load_file(restored / part / "diffusion_pytorch_model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype
            tolerance = 0 if part == "vae" else 1e-3 * (1 + want[key].abs().max().item())
            assert (got[key] - want[key]).abs().max().item() <= tolerance, (part, key)
    assert (restored / "model_index.json").read_text() == (trained / "model_index.json").read_text()

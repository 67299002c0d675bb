"""The embedded model's recipe (`training.small_model`): stage configs and continuing from a finished model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import config_from_dict
from training.small_model import main, stage_config


def test_stage_configs_carry_the_recipe_and_its_options(tmp_path):
    first = config_from_dict(stage_config(1, tmp_path, [tmp_path / "clips"], 10, "init"))
    assert Path(first.output_dir) == tmp_path / "stage1" and first.train.mouth_weight == 0.0
    assert first.data.num_frames == 1 and first.train.learning_rate == 5e-4
    default = config_from_dict(stage_config(2, tmp_path, [tmp_path / "clips"], 10, "init"))
    assert default.train.mouth_weight == 4.0 and default.train.condition_dropout.motion == 0.2
    assert default.train.learning_rate == 2e-4 and Path(default.output_dir) == tmp_path / "stage2"
    assert (first.train.seed, default.train.seed) == (1, 2)  # the shipped model's documented commands
    more = config_from_dict(
        stage_config(2, tmp_path, [tmp_path / "clips"], 10, "model", name="stage2_continued", mouth_weight=8.0,
                     motion_dropout=0.3, learning_rate=1e-4, seed=5, mixed_precision="bf16")
    )  # fmt: skip
    assert Path(more.output_dir) == tmp_path / "stage2_continued" and more.init.pipeline == "model"
    assert more.train.mouth_weight == 8.0 and more.train.condition_dropout.motion == 0.3
    assert more.train.learning_rate == 1e-4 and more.train.max_steps == 10 and more.train.seed == 7
    assert (default.train.mixed_precision, more.train.mixed_precision) == ("no", "bf16")


def test_continuing_from_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, monkeypatch):
    import training.small_model as small_model

    clips = tmp_path / "clips"
    monkeypatch.setattr(small_model, "prepare_data", lambda *args: (clips, tmp_path / "photos"))
    monkeypatch.setattr("training.mouth.measure_clips", lambda clips: None)
    with pytest.raises(SystemExit, match=r"--continue-from .*nothing: not a model folder"):
        main(["--work", str(tmp_path / "work"), "--continue-from", str(tmp_path / "nothing")])


def test_reconstruction_loss_weights_the_mouth_region_only_when_asked():
    from training.small_model import reconstruction_loss

    target = torch.zeros(1, 3, 4, 4)
    recon = torch.zeros(1, 3, 4, 4)
    recon[..., 0, 0] = 0.5  # an error inside the mouth
    recon[..., 3, 3] = 0.5  # the same error outside it
    mouth = torch.zeros(1, 1, 4, 4)
    mouth[..., :2, :2] = 1.0  # 4 of 16 pixels
    per_pixel = 0.5**2 + 0.5
    plain = reconstruction_loss(recon, target)
    assert plain.item() == pytest.approx(2 * per_pixel / 16)
    assert reconstruction_loss(recon, target, mouth, 0.0).item() == pytest.approx(plain.item())
    weighted = reconstruction_loss(recon, target, mouth, 3.0)  # weights 4 (mouth) and 1; mean weight 1.75
    assert weighted.item() == pytest.approx((4 * per_pixel + per_pixel) / 16 / 1.75)
    recon[..., 0, 0] = 0.0  # the mouth error alone now counts 4x the outside one
    outside_only = reconstruction_loss(recon, target, mouth, 3.0).item()
    assert outside_only == pytest.approx(per_pixel / 16 / 1.75)


def test_a_finished_model_gets_a_mouth_weighted_decoder_and_keeps_everything_else(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import training.small_model as small_model
    from pipeline import build_pipeline
    from training import synthetic
    from training.prepare import PrepareOptions, prepare

    torch.set_num_threads(1)
    videos = tmp_path / "videos"
    videos.mkdir()
    synthetic.write_talking_video(videos / "alice.mp4", seconds=1.2, fps=25, seed=0)
    clips = tmp_path / "clips"
    prepare(videos, clips, PrepareOptions(fps=25, size=32, clip_length=20, min_clip_length=12), workers=1)
    source = tmp_path / "finished"
    torch.manual_seed(0)
    build_pipeline("tiny").save_pretrained(source)
    monkeypatch.setattr(small_model, "prepare_data", lambda *args: (clips, clips))
    monkeypatch.setattr("training.mouth.measure_clips", lambda clips: None)
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--work", str(work), "--continue-from", str(source), "--out", str(out), "--stage2-steps", "0",
            "--stage3-steps", "0", "--refine-decoder", "--decoder-steps", "2", "--decoder-mouth-weight", "10"]  # fmt: skip
    main(argv)

    record = json.loads((work / "vae_decoder_continued.json").read_text())
    assert record["steps"] == 2 and record["mouth_weight"] == 10.0 and record["mse"] > 0
    before = load_file(source / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    unet = "denoising_unet/diffusion_pytorch_model.safetensors"
    assert all(torch.equal(v, load_file(out / unet)[k]) for k, v in load_file(source / unet).items())
    with pytest.raises(SystemExit, match="--out .* is the --continue-from model"):
        main([*argv[:4], "--out", str(source), *argv[6:]])


def test_the_4x_latent_layout_doubles_the_latent_side_and_generates(monkeypatch):
    from pipeline import build_pipeline
    from training.small_model import RESOLUTION, small_config

    torch.set_num_threads(1)
    assert small_config() == small_config(8) and small_config(8)["vae"]["block_out_channels"] == (
        16,
        32,
        64,
        64,
    )
    with pytest.raises(ValueError, match="latent_scale 2"):
        small_config(2)
    torch.manual_seed(0)
    pipe = build_pipeline(small_config(4))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, RESOLUTION, RESOLUTION) * 2 - 1
    latents = pipe.vae.encode(image).latent_dist.mode()
    assert latents.shape == (1, 8, RESOLUTION // 4, RESOLUTION // 4)
    assert pipe.face_locator(torch.ones(1, 1, RESOLUTION, RESOLUTION)).shape[-2:] == latents.shape[-2:]
    audio = np.random.default_rng(0).standard_normal(16_000 // 5).astype(np.float32) * 0.1
    frames = pipe(
        np.full((RESOLUTION, RESOLUTION, 3), 128, np.uint8), audio, sampling_rate=16_000, num_inference_steps=1,
        clip_length=4, num_motion_frames=2, output_type="np", face_mask=np.ones((RESOLUTION, RESOLUTION), np.float32),
    ).frames  # fmt: skip
    assert frames.shape == (5, RESOLUTION, RESOLUTION, 3) and np.isfinite(frames).all()


def test_a_work_folder_of_one_latent_scale_is_not_continued_at_another(tmp_path, monkeypatch):
    import training.small_model as small_model
    from pipeline import build_pipeline

    work = tmp_path / "work"
    build_pipeline(small_model.small_config(8)).save_pretrained(work / "init_vae")
    monkeypatch.setattr(small_model, "prepare_data", lambda *args: (tmp_path / "clips", tmp_path / "photos"))
    monkeypatch.setattr("training.mouth.measure_clips", lambda clips: None)
    with pytest.raises(
        SystemExit, match="whose VAE downsamples 8x: give --latent-scale 8, or another --work"
    ):
        main(["--work", str(work), "--latent-scale", "4"])

"""The mouth drive of the small embedded model: the mouth opening a head on the audio projection predicts from
the voice, drawn into the portrait's mouth region of every frame and added after the backbone's `conv_in`
through a zero-initialised conv (`mouth_drive` of the backbone and the audio projection)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speech_like, tiny_pipeline
from PIL import Image

from pipeline import EmoPipeline
from pipeline.models import AudioProjection, EmoUNet3DModel
from pipeline.models.backbone import mouth_drive_map
from training.config import parameter_matcher
from training.train import EmoTrainingModel

EXAMPLE_PORTRAIT = Path(__file__).parents[1] / "assets" / "examples" / "portrait.png"
pytestmark = pytest.mark.usefixtures("one_thread")


def with_mouth_drive(pipe: EmoPipeline) -> EmoPipeline:
    for name, cls, new_keys in (
        ("denoising_unet", EmoUNet3DModel, ["mouth_drive_in.bias", "mouth_drive_in.weight"]),
        ("audio_projection", AudioProjection, [f"mouth_head.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]),
    ):  # fmt: skip
        old = getattr(pipe, name)
        new = cls.from_config(old.config, mouth_drive=True).eval()
        assert sorted(new.load_state_dict(old.state_dict(), strict=False).missing_keys) == new_keys
        pipe.register_modules(**{name: new})
    return pipe


def test_the_map_is_the_opening_times_the_share_of_each_latent_cell_inside_the_mouth():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:6, 2:6] = 1  # latent cells (2, 1) and (2, 2) of a 2x downsampling are all mouth
    mask[..., 6, 2:4] = 1  # cell (3, 1): half mouth
    opening = torch.tensor([[1.5, -2.0, 0.0]])
    drawn = mouth_drive_map(opening, mask, (4, 4))
    assert drawn.shape == (1, 3, 4, 4)
    torch.testing.assert_close(drawn[0, :, 2, 1:3], opening[0, :, None].expand(3, 2))
    torch.testing.assert_close(drawn[0, :, 3, 1], opening[0] * 0.5)
    assert drawn[0, :, :2].eq(0).all() and drawn[0, :, :, 3].eq(0).all()  # outside the mouth: nothing
    assert not mouth_drive_map(opening, None, (4, 4)).any()  # no face found: no drive


@torch.no_grad()
def test_a_new_drive_leaves_the_backbone_unchanged_and_a_trained_one_moves_the_drawn_frames_only():
    torch.manual_seed(0)
    from test_reference_latents import backbone_inputs

    plain = tiny_pipeline().denoising_unet.eval()
    driven = EmoUNet3DModel.from_config(plain.config, mouth_drive=True).eval()
    driven.load_state_dict(plain.state_dict(), strict=False)
    inputs = backbone_inputs(plain)  # 3 frames of 8x8 latents
    drive = torch.zeros(1, 3, 8, 8)
    drive[0, 1, 5:7, 3:5] = 2.0  # only frame 1 has an open mouth
    before = plain(**inputs).sample
    assert torch.equal(driven(**inputs, mouth_drive=drive).sample, before)
    driven.mouth_drive_in.weight.data.normal_(0, 0.3)
    after = driven(**inputs, mouth_drive=drive).sample
    change = (after - before).abs().mean(dim=(0, 1, 3, 4))
    # the temporal layers spread a little of frame 1's change to its neighbours; frame 1 changes most
    assert change[1] > 1e-3 and change[1] > 2 * change[0] and change[1] > 2 * change[2]
    with pytest.raises(ValueError, match="mouth_drive"):
        driven(**inputs)
    with pytest.raises(ValueError, match="mouth_drive"):
        plain(**inputs, mouth_drive=drive)


def test_the_pipeline_draws_the_voice_into_the_portraits_mouth_for_the_audio_branch_only():
    portrait = Image.open(EXAMPLE_PORTRAIT).convert("RGB")  # a real face, found by MediaPipe at 64 px
    torch.manual_seed(0)
    pipe = with_mouth_drive(tiny_pipeline())
    pipe.denoising_unet.mouth_drive_in.weight.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    seen = []
    pipe.denoising_unet.mouth_drive_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))

    def video(audio):
        seen.clear()
        return pipe(
            portrait, audio, sampling_rate=16000, height=64, width=64, num_inference_steps=2, clip_length=4,
            num_motion_frames=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np",
        ).frames  # fmt: skip

    voice = speech_like(0.5)
    frames = video(voice)
    assert frames.shape == (13, 64, 64, 3)
    # per step of each clip one batched pass: the guided branch's 4 frames, then the audio-less branch's
    assert len(seen) == 4 * 2 and seen[0].shape == (8, 1, 32, 32)
    assert not seen[0][4:].any() and seen[0][:4].abs().sum() > 0
    # the drawn maps are the head's predicted opening times the portrait's mouth region at latent size
    from pipeline.face import detect_face, mouth_mask

    image = pipe.image_processor.postprocess(pipe.image_processor.preprocess(portrait, 64, 64), "pil")[0]
    region = torch.from_numpy(mouth_mask(detect_face(np.asarray(image)), (64, 64))).float()[None, None]
    features = pipe.audio_frame_features(voice, 16, 25.0, "cpu")
    expected = mouth_drive_map(pipe.audio_projection.mouth_opening(features), region, (32, 32))
    torch.testing.assert_close(seen[0][:4, 0], expected[0, :4].detach())
    pooled = torch.nn.functional.adaptive_avg_pool2d(region, (32, 32))[0, 0]
    assert (
        region.sum() > 0
        and expected[0, :, pooled == 0].eq(0).all()
        and expected[0, :, pooled > 0].abs().sum() > 0
    )
    # another voice, another mouth (the rest of the model is the same)
    assert np.abs(video(speech_like(0.5, seed=7)) - frames).mean() > 1e-4


def test_training_reaches_the_drive_conv_and_leaves_the_fitted_head_alone():
    torch.manual_seed(0)
    pipe = with_mouth_drive(tiny_pipeline())
    trainable = parameter_matcher(["backbone", "audio", "temporal"])
    assert trainable("denoising_unet.mouth_drive_in.weight")
    assert trainable("audio_projection.proj1.weight") and not trainable(
        "audio_projection.mouth_head.0.weight"
    )
    model = EmoTrainingModel(pipe)
    g = torch.Generator().manual_seed(0)
    b, f, m = 2, 3, pipe.audio_projection.config.window
    layers, dim = pipe.audio_projection.config.num_layers, pipe.audio_projection.config.feature_dim
    mouth = torch.zeros(b, 1, 32, 32)
    mouth[..., 18:26, 10:22] = 1
    args = dict(
        noisy=torch.randn(b, 4, f, 16, 16, generator=g), timesteps=torch.tensor([100, 700]),
        reference_latents=torch.randn(b, 4, 16, 16, generator=g), motion_latents=None,
        face_mask=torch.ones(b, 1, 32, 32), audio_features=torch.randn(b, f + 2 * m, layers, dim, generator=g),
        speeds=None, keep={"reference": torch.ones(b), "audio": torch.tensor([1.0, 0.0]), "motion": torch.ones(b)},
    )  # fmt: skip
    with pytest.raises(ValueError, match="mouth_mask"):
        model(**args)
    seen = []
    pipe.denoising_unet.mouth_drive_in.register_forward_hook(lambda mod, a, out: seen.append(a[0]))
    model(**args, mouth_mask=mouth).square().mean().backward()
    assert pipe.denoising_unet.mouth_drive_in.weight.grad.abs().sum() > 0
    drawn = seen[0].unflatten(0, (b, f))
    assert drawn[0].abs().sum() > 0 and not drawn[1].any()  # the sample whose audio was dropped: no drive
    opening = pipe.audio_projection.mouth_opening(args["audio_features"])[0, m:-m]
    torch.testing.assert_close(drawn[0, :, 0, 9:13, 5:11], opening[:, None, None].expand(f, 4, 6).detach())


def test_the_drive_conv_can_learn_faster_than_the_rest_of_the_backbone():
    from training.config import config_from_dict
    from training.train import make_optimizer

    pipe = with_mouth_drive(tiny_pipeline())
    unet = pipe.denoising_unet
    params = list(unet.parameters())
    values = {"stage": 2, "output_dir": "unused", "init": {"pipeline": "unused"}}
    values["train"] = {"learning_rate": 1e-4, "use_8bit_adam": False}
    plain = make_optimizer(config_from_dict(values), params, pipe)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == 1e-4
    values["train"]["mouth_drive_lr_scale"] = 20
    fast = make_optimizer(config_from_dict(values), params, pipe)
    slow_group, fast_group = fast.param_groups
    assert fast_group["lr"] == pytest.approx(2e-3) and slow_group["lr"] == 1e-4
    assert {id(p) for p in fast_group["params"]} == {id(p) for p in unet.mouth_drive_in.parameters()}
    assert len(slow_group["params"]) == len(params) - 2
    # a stage in which the conv does not train (stage 3) gets one group
    others = [p for p in params if all(p is not q for q in unet.mouth_drive_in.parameters())]
    assert len(make_optimizer(config_from_dict(values), others, pipe).param_groups) == 1

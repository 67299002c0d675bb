"""The posed reference of the small embedded model (`behaviour.posed_reference`): the portrait's latents injected
into every frame with the frame's mouth opening drawn on the portrait by an image warp (`pipeline.mouth_pose`),
the opening predicted from the voice by the audio projection's mouth head."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speech_like, tiny_pipeline
from PIL import Image

from pipeline import EmoPipeline
from pipeline.behaviour import Behaviour
from pipeline.face import face_landmarks
from pipeline.models import AudioProjection
from pipeline.mouth_pose import LOWER_INNER, UPPER_INNER, close_mouth, face_height, open_mouth, posed_frames
from training.train import EmoTrainingModel

EXAMPLE_PORTRAIT = Path(__file__).parents[1] / "assets" / "examples" / "portrait.png"
pytestmark = pytest.mark.usefixtures("one_thread")


def posed_pipeline(amplitude: float = 0.08) -> EmoPipeline:
    """A tiny pipeline with the reference-latent injection, a linear mouth head and a posed reference."""
    from test_reference_latents import with_injection

    pipe = tiny_pipeline()
    pipe.register_modules(denoising_unet=with_injection(pipe.denoising_unet))
    pipe.denoising_unet.reference_latent_in.weight.data.normal_(
        0, 0.3, generator=torch.Generator().manual_seed(2)
    )
    old = pipe.audio_projection
    head = AudioProjection.from_config(old.config, mouth_drive=True, mouth_head_hidden=0).eval()
    head.load_state_dict(old.state_dict(), strict=False)
    head.mouth_head[0].weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    pipe.register_modules(audio_projection=head)
    pipe.register_to_config(behaviour=replace(pipe.behaviour, posed_reference=amplitude).to_config())
    return pipe


def test_posed_frames_warp_each_distinct_opening_once():
    image = np.asarray(Image.open(EXAMPLE_PORTRAIT).convert("RGB").resize((128, 128)))
    landmarks = face_landmarks(image)
    distinct, index = posed_frames(image, landmarks, np.array([0.0, 3.1, np.nan, 3.0, -2.0, 6.0]))
    # 0, NaN and negatives: the photo as it is; 3.1 and 3.0 round to the same quarter pixel
    assert distinct.shape == (3, 128, 128, 3) and index.tolist() == [0, 1, 0, 1, 0, 2]
    assert np.array_equal(distinct[0], image)
    assert np.array_equal(distinct[1], open_mouth(image, landmarks, 3.0))
    assert np.array_equal(distinct[2], open_mouth(image, landmarks, 6.0))
    # a wider opening changes more of the photo, below the nose only
    change = [np.abs(frame.astype(int) - image).sum() for frame in distinct]
    assert 0 == change[0] < change[1] < change[2]
    assert np.abs(distinct[2][: int(landmarks[1, 1])].astype(int) - image[: int(landmarks[1, 1])]).max() <= 1
    assert 40 < face_height(landmarks) < 128


def test_the_behaviour_switch_is_a_non_negative_fraction_without_the_hidden_mouth():
    assert Behaviour(posed_reference=0.06).posed_reference == 0.06
    with pytest.raises(ValueError, match="posed_reference"):
        Behaviour(posed_reference=-0.1)
    with pytest.raises(ValueError, match="posed_reference"):
        Behaviour(posed_reference=0.06, mask_reference_mouth=True)


@torch.no_grad()
def test_per_frame_reference_latents_inject_each_frame_its_own():
    from test_reference_latents import backbone_inputs, with_injection

    torch.manual_seed(0)
    unet = with_injection(tiny_pipeline().denoising_unet)
    unet.reference_latent_in.weight.data.normal_(0, 0.3)
    inputs = backbone_inputs(unet)  # 3 frames of 8x8 latents
    still = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    once = unet(**inputs, reference_latents=still).sample
    per_frame = still[:, :, None].expand(-1, -1, 3, -1, -1)
    torch.testing.assert_close(unet(**inputs, reference_latents=per_frame).sample, once)
    posed = per_frame.clone()
    posed[:, :, 2, 5:7, 3:5] += 2.0  # frame 2's mouth opened
    change = (unet(**inputs, reference_latents=posed).sample - once).abs().mean(dim=(0, 1, 3, 4))
    assert change[2] > 1e-3 and change[2] > 2 * change[0] and change[2] > 2 * change[1]
    with pytest.raises(ValueError, match="one per frame"):
        unet(**inputs, reference_latents=per_frame[:, :, :2])


def test_the_pipeline_injects_the_portrait_posed_by_the_voice_frame_by_frame():
    portrait = Image.open(EXAMPLE_PORTRAIT).convert("RGB")  # a real face, found by MediaPipe at 64 px
    pipe = posed_pipeline()
    seen = []
    pipe.denoising_unet.reference_latent_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))

    def video(audio):
        seen.clear()
        return pipe(
            portrait, audio, sampling_rate=16000, height=64, width=64, num_inference_steps=2, clip_length=4,
            num_motion_frames=2, guidance_scale=1.0, reference_guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).frames  # fmt: skip

    voice = speech_like(0.5)
    frames = video(voice)
    assert frames.shape == (13, 64, 64, 3)
    # per step of each clip one batched pass: the 4 frames with the reference, then 4 without (zeros)
    assert len(seen) == 4 * 2 and seen[0].shape == (8, 4, 32, 32) and not seen[0][4:].any()
    # the first clip's latents: the portrait with its mouth opened as the head asks for its 4 frames
    image = pipe.image_processor.postprocess(pipe.image_processor.preprocess(portrait, 64, 64), "pil")[0]
    features = pipe.audio_frame_features(voice, 16, 25.0, "cpu")
    opening = pipe.audio_projection.mouth_opening(features)[0].detach().numpy()
    assert opening[:4].max() > 0.1 and len(np.unique(np.round(opening[:4], 2))) > 1
    landmarks = face_landmarks(np.asarray(image))
    closed, moved = close_mouth(np.asarray(image), landmarks)  # the lips brought together first
    pixels = [open_mouth(closed, moved, v) for v in
              np.round(np.clip(opening[:4], 0, 1.2) * 0.08 * face_height(landmarks) * 4) / 4]  # fmt: skip
    expected = pipe.encode_image(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(seen[0][:4], expected.detach(), atol=1e-4, rtol=1e-4)
    # another voice, another mouth; the same voice with the pose off: the still portrait in every frame
    assert np.abs(video(speech_like(0.5, seed=7)) - frames).mean() > 1e-4
    pipe.register_to_config(behaviour=replace(pipe.behaviour, posed_reference=0.0).to_config())
    video(voice)
    assert seen[0].shape == (2, 4, 32, 32)  # one still portrait for the clip (and zeros), as before


def test_audio_guidance_sets_the_voices_pose_against_the_closed_mouth():
    """The pose is drawn from the voice: the guidance branch without audio gets the closed mouth in every frame,
    so audio guidance pushes the mouth towards the voice's pose as well as through audio attention."""
    portrait = Image.open(EXAMPLE_PORTRAIT).convert("RGB")
    pipe = posed_pipeline()
    seen = []
    pipe.denoising_unet.reference_latent_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    pipe(
        portrait, speech_like(0.3), sampling_rate=16000, height=64, width=64, num_inference_steps=1, clip_length=4,
        num_motion_frames=0, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    with_audio, without = seen[0][:4], seen[0][4:]  # one batched pass: the branch with audio, then without
    assert (with_audio[1:] - with_audio[:1]).abs().amax() > 1e-3  # the voice's pose changes frame by frame
    image = pipe.image_processor.postprocess(pipe.image_processor.preprocess(portrait, 64, 64), "pil")[0]
    closed, _ = close_mouth(np.asarray(image), face_landmarks(np.asarray(image)))
    expected = pipe.encode_image(torch.from_numpy(closed[None]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(without, expected.detach().expand_as(without), atol=1e-4, rtol=1e-4)


def _drawn_open_mouth() -> tuple[np.ndarray, np.ndarray]:
    """A drawn face whose mouth shows teeth (rows 71-74) between the upper lip (68-70) and the lower lip (75-77),
    with FaceMesh-numbered landmarks: inner lip edges at y 71 and 75 between corners at (54, 73) and (74, 73)."""
    image = np.full((128, 128, 3), (200, 160, 140), np.uint8)
    image[68:71, 50:79] = (180, 40, 50)
    image[71:75, 55:74] = (235, 235, 225)
    image[75:78, 50:79] = (150, 30, 40)
    lm = np.zeros((468, 2), np.float32)
    inner = np.linspace(56, 72, 9)
    lm[UPPER_INNER[1:-1]] = np.stack([inner, np.full(9, 71.0)], 1)
    lm[LOWER_INNER[1:-1]] = np.stack([inner, np.full(9, 75.0)], 1)
    for index, point in {78: (54, 73), 308: (74, 73), 61: (50, 73), 291: (78, 73), 17: (64, 78), 152: (64, 100),
                         10: (64, 30)}.items():  # fmt: skip
        lm[index] = point
    return image, lm


def test_closing_the_mouth_covers_the_teeth_with_the_lower_lip():
    image, lm = _drawn_open_mouth()
    closed, moved = close_mouth(image, lm)
    assert np.array_equal(closed[:71], image[:71])  # the upper lip and everything above: untouched
    assert np.array_equal(closed[:, :45], image[:, :45])  # beside the mouth: untouched
    column = closed[:, 64].astype(int)
    assert not (column[60:100] > 220).all(axis=1).any()  # no teeth left in the middle of the mouth
    assert np.abs(column[71:74] - (150, 30, 40)).max() < 25  # the lower lip now meets the upper one
    assert moved[14, 1] == pytest.approx(71, abs=0.5) and moved[17, 1] == pytest.approx(74, abs=0.5)
    assert np.array_equal(moved[[10, 13, 78]], lm[[10, 13, 78]])  # the upper lip's edge and above stay
    assert moved[152, 1] < lm[152, 1] and moved[152, 1] > 96  # the chin follows, a little
    # a closed mouth is left as it is; posed frames opened from a closed mouth count from there
    again, same = close_mouth(closed, moved)
    assert np.array_equal(again, closed) and np.array_equal(same, moved)
    distinct, _ = posed_frames(image, lm, np.array([0.0, 6.0]), close_first=True)
    assert np.array_equal(distinct[0], closed) and np.array_equal(distinct[1], open_mouth(closed, moved, 6.0))


def test_the_portraits_smile_is_closed_then_opened_by_the_pose():
    from pipeline.metrics import mouth_opening

    image = np.asarray(Image.open(EXAMPLE_PORTRAIT).convert("RGB").resize((128, 128)))
    landmarks = face_landmarks(image)  # the astronaut smiles with her teeth showing
    face = face_height(landmarks)
    distinct, _ = posed_frames(image, landmarks, np.array([0.0, 0.1, 0.15]) * face, close_first=True)
    measured = mouth_opening(np.concatenate([image[None], distinct]))
    print("MediaPipe's lip gap: the photo, then posed from closed:", np.round(measured, 3))
    assert measured[1] < 0.5 * measured[0]  # closed: measured at 0.028 of the face height against 0.068
    assert 1.5 * measured[1] < measured[2] < measured[3]  # and a wider pose measures wider


def test_a_portrait_without_a_face_keeps_the_still_reference(caplog):
    pipe = posed_pipeline()
    seen = []
    pipe.denoising_unet.reference_latent_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    blank = Image.new("RGB", (64, 64), (120, 160, 200))
    frames = pipe(
        blank, speech_like(0.3), sampling_rate=16000, height=64, width=64, num_inference_steps=1, clip_length=4,
        num_motion_frames=0, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames  # fmt: skip
    assert frames.shape[0] == 8 and np.isfinite(frames).all()
    assert "its mouth cannot follow the voice" in caplog.text
    assert all(torch.equal(s[0], s[k]) for s in seen for k in range(len(s)))


def test_training_injects_the_posed_latents_and_keeps_the_still_reference_for_the_reference_net():
    torch.manual_seed(0)
    pipe = posed_pipeline()
    model = EmoTrainingModel(pipe)
    g = torch.Generator().manual_seed(0)
    b, f, m = 2, 3, pipe.audio_projection.config.window
    layers, dim = pipe.audio_projection.config.num_layers, pipe.audio_projection.config.feature_dim
    still = torch.randn(b, 4, 16, 16, generator=g)
    posed = torch.randn(b, 4, f, 16, 16, generator=g)
    args = dict(
        noisy=torch.randn(b, 4, f, 16, 16, generator=g), timesteps=torch.tensor([100, 700]),
        reference_latents=still, motion_latents=None, face_mask=torch.ones(b, 1, 32, 32),
        audio_features=torch.randn(b, f + 2 * m, layers, dim, generator=g), speeds=None,
        keep={"reference": torch.tensor([1.0, 0.0]), "audio": torch.ones(b), "motion": torch.ones(b)},
    )  # fmt: skip
    injected, referenced = [], []
    pipe.denoising_unet.reference_latent_in.register_forward_hook(lambda mod, a, out: injected.append(a[0]))
    pipe.reference_net.register_forward_hook(lambda mod, a, out: referenced.append(a[0]))
    model(**args, posed_latents=posed).square().mean().backward()
    rows = injected[0].unflatten(0, (b, f))  # (b, f, 4, h, w)
    torch.testing.assert_close(rows[0], posed[0].permute(1, 0, 2, 3))
    assert not rows[1].any()  # the sample whose reference was dropped: zeros, as in guidance
    torch.testing.assert_close(referenced[0], still)
    assert pipe.denoising_unet.reference_latent_in.weight.grad.abs().sum() > 0


def test_the_training_loss_encodes_the_posed_frames_for_the_injection():
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from training.config import config_from_dict
    from training.train import training_loss

    pipe = posed_pipeline()
    model = EmoTrainingModel(pipe)
    values = {"stage": 2, "output_dir": "unused", "init": {"pipeline": "unused"}}
    values["data"] = {"root": "unused", "resolution": 32, "num_frames": 3, "num_motion_frames": 2}
    values["train"] = {"condition_dropout": {"reference": 0.0, "audio": 0.0, "motion": 0.0}}
    config = config_from_dict(values)
    g = torch.Generator().manual_seed(0)
    b, m = 2, pipe.audio_projection.config.window
    layers, dim = pipe.audio_projection.config.num_layers, pipe.audio_projection.config.feature_dim
    batch = {
        "pixel_values": torch.rand(b, 5, 3, 32, 32, generator=g) * 2 - 1,
        "reference": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
        "posed_reference": torch.rand(b, 3, 3, 32, 32, generator=g) * 2 - 1,
        "face_mask": torch.ones(b, 1, 32, 32), "mouth_mask": torch.zeros(b, 1, 32, 32),
        "audio_features": torch.randn(b, 3 + 2 * m, layers, dim, generator=g),
    }  # fmt: skip
    injected = []
    pipe.denoising_unet.reference_latent_in.register_forward_hook(lambda mod, a, out: injected.append(a[0]))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        loss = training_loss(
            model, pipe, scheduler, batch, config, torch.Generator().manual_seed(1), Accelerator(cpu=True)
        )
        expected = pipe.encode_image(batch["posed_reference"].flatten(0, 1))
    assert torch.isfinite(loss)
    torch.testing.assert_close(injected[0], expected)  # (b f) rows, sample by sample

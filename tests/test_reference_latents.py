"""The reference-latent injection of the small embedded model: the reference image's latents, through a
zero-initialised conv, added after the backbone's `conv_in` to every frame (`reference_latent_channels`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speech_like, tiny_pipeline

from pipeline import EmoPipeline, build_pipeline
from pipeline.models import EmoUNet3DModel
from training.train import EmoTrainingModel

EXAMPLE_PORTRAIT = Path(__file__).parents[1] / "assets" / "examples" / "portrait.png"
pytestmark = pytest.mark.usefixtures("one_thread")


def backbone_inputs(unet: EmoUNet3DModel, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c, f, h = unet.config.in_channels, 3, 8
    ref_net = build_pipeline("tiny").reference_net
    tokens = ref_net(torch.randn(1, c, h, h, generator=g)).reference_tokens
    return dict(
        sample=torch.randn(1, c, f, h, h, generator=g),
        timestep=500,
        reference_tokens=tokens,
        audio_tokens=torch.randn(1, f, 4, unet.config.audio_dim, generator=g),
        speed_tokens=torch.randn(1, f, unet.config.speed_dim, generator=g),
    )


def with_injection(unet: EmoUNet3DModel) -> EmoUNet3DModel:
    new = EmoUNet3DModel.from_config(unet.config, reference_latent_channels=4).eval()
    missing = new.load_state_dict(unet.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["reference_latent_in.bias", "reference_latent_in.weight"]
    return new


@torch.no_grad()
def test_a_new_injection_leaves_the_backbone_unchanged_and_a_trained_one_reads_the_reference():
    torch.manual_seed(0)
    plain = tiny_pipeline().denoising_unet
    injected = with_injection(plain)
    inputs = backbone_inputs(plain)
    reference = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    before = plain(**inputs).sample
    assert torch.equal(injected(**inputs, reference_latents=reference).sample, before)

    injected.reference_latent_in.weight.data.normal_(0, 0.2)
    after = injected(**inputs, reference_latents=reference).sample
    assert (after - before).abs().mean() > 1e-3  # the reference's latents now change every frame
    per_frame = (after - before).abs().mean(dim=(0, 1, 3, 4))
    assert per_frame.min() > 1e-3
    # a dropped reference (zeros) is the plain backbone plus the conv's bias only
    injected.reference_latent_in.bias.data.zero_()
    dropped = injected(**inputs, reference_latents=torch.zeros_like(reference)).sample
    torch.testing.assert_close(dropped, before)

    with pytest.raises(ValueError, match="reference_latents.*reference_latent_channels"):
        injected(**inputs)
    with pytest.raises(ValueError, match="reference_latents.*reference_latent_channels"):
        plain(**inputs, reference_latents=reference)


def injected_pipeline() -> EmoPipeline:
    pipe = tiny_pipeline()
    pipe.register_modules(denoising_unet=with_injection(pipe.denoising_unet))
    pipe.denoising_unet.reference_latent_in.weight.data.normal_(
        0, 0.3, generator=torch.Generator().manual_seed(2)
    )
    return pipe


def test_the_pipeline_gives_the_portrait_to_the_guided_branch_and_zeros_to_the_unguided_one(portrait):
    from pipeline.pipeline_emo import ClipConditions

    pipe = injected_pipeline()
    latents = torch.randn(1, 4, 4, 4)
    conds = ClipConditions(
        reference={}, motion=None, motion_null=None, audio=torch.zeros(1, 2, 4, 32), speed=None,
        face=torch.zeros(1, 32, 4, 4), identity=None, region_masks=None, region_weights=(1.0, 1.0, 1.0),
        reference_latents=latents,
    )  # fmt: skip
    rows = pipe._branch_inputs(conds, ((True, True), (True, False), (False, False)))["reference_latents"]
    assert torch.equal(rows[0], latents[0]) and torch.equal(rows[1], latents[0]) and not rows[2].any()

    def video(pipe):
        return pipe(
            portrait, speech_like(0.48), sampling_rate=16_000, face_mask=np.ones((32, 32)), height=32, width=32,
            num_inference_steps=2, clip_length=4, num_motion_frames=2, guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).frames  # fmt: skip

    frames = video(pipe)
    assert frames.shape == (12, 32, 32, 3) and np.isfinite(frames).all()
    pipe.denoising_unet.reference_latent_in.weight.data.zero_()
    assert np.abs(video(pipe) - frames).mean() > 1e-3  # the injection is on the generation's path


def test_continuing_a_small_model_brings_it_to_the_small_layout_once_and_training_reaches_it(tmp_path):
    from training.small_model import with_small_layout

    torch.manual_seed(0)
    source = tmp_path / "old"
    tiny_pipeline().save_pretrained(source)
    switches = {"mask_reference_mouth": True}
    out = with_small_layout(source, tmp_path / "init", switches)
    assert out == tmp_path / "init"
    pipe = EmoPipeline.from_pretrained(out)
    unet = pipe.denoising_unet
    assert unet.config.reference_latent_channels == 4 and not unet.reference_latent_in.weight.any()
    assert (
        pipe.behaviour.mask_reference_mouth
        and not EmoPipeline.from_pretrained(source).behaviour.mask_reference_mouth
    )
    old = EmoPipeline.from_pretrained(source).denoising_unet
    inputs = backbone_inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(
            unet(**inputs, reference_latents=torch.ones(1, 4, 8, 8)).sample, old(**inputs).sample
        )
    assert with_small_layout(source, out, switches) == out  # done once
    assert with_small_layout(out, tmp_path / "again", switches) == out  # already in the layout
    assert with_small_layout(out, tmp_path / "again") == out  # a switch already on stays on
    # a model with the injection but without the behaviour (the model shipped before it) gets the switch only
    pipe.register_to_config(behaviour={})
    pipe.save_pretrained(tmp_path / "injected")
    assert with_small_layout(tmp_path / "injected", tmp_path / "plain") == tmp_path / "injected"
    switched = EmoPipeline.from_pretrained(
        with_small_layout(tmp_path / "injected", tmp_path / "switched", switches)
    )
    assert switched.behaviour.mask_reference_mouth
    torch.testing.assert_close(
        switched.denoising_unet.reference_latent_in.weight, unet.reference_latent_in.weight
    )

    model = EmoTrainingModel(pipe)
    g = torch.Generator().manual_seed(0)
    b, f = 2, 3
    prediction = model(
        noisy=torch.randn(b, 4, f, 16, 16, generator=g),  # 32 px frames, 2x VAE
        timesteps=torch.tensor([100, 700]),
        reference_latents=torch.randn(b, 4, 16, 16, generator=g),
        motion_latents=None,
        face_mask=torch.ones(b, 1, 32, 32),
        audio_features=None,
        speeds=None,
        keep={k: torch.ones(b) for k in ("reference", "audio", "motion")},
        reference_mouth_mask=torch.zeros(b, 1, 32, 32),
    )
    prediction.square().mean().backward()
    assert unet.reference_latent_in.weight.grad.abs().sum() > 0


def test_hide_mouth_keeps_each_latent_cell_by_its_share_outside_the_mouth():
    from pipeline.face import FaceBox, mouth_mask
    from pipeline.models.backbone import hide_mouth

    mask = mouth_mask(
        FaceBox(8, 8, 24, 24), (32, 32)
    )  # the middle half of x (12..20), 55..100 % of y (17..24)
    assert mask.shape == (32, 32) and mask.sum() == 8 * 7
    assert mask[17:24, 12:20].all() and not mask[:17].any() and not mask[:, :12].any() and not mask[24:].any()
    latents = torch.ones(1, 2, 8, 8)  # 4 px per latent cell
    hidden = hide_mouth(latents, torch.from_numpy(mask)[None, None])
    assert hidden[0, :, 5, 3:5].eq(0).all()  # cells inside the mouth: gone
    assert hidden[0, :, 4, 3:5].eq(0.25).all()  # rows 16..19, of which 17..19 are mouth: a quarter kept
    assert hidden[0, :, :4].eq(1).all() and hidden[0, :, :, :3].eq(1).all()  # elsewhere unchanged


def test_a_model_that_hides_the_mouth_gets_the_portrait_without_it_in_the_pipeline_and_in_training():
    from PIL import Image

    from pipeline.face import detect_face, mouth_mask

    portrait = Image.open(EXAMPLE_PORTRAIT).convert("RGB")  # a real face, found by MediaPipe at 64 px
    pipe = injected_pipeline()
    pipe.register_to_config(behaviour={"mask_reference_mouth": True})
    seen = []
    pipe.denoising_unet.reference_latent_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    pipe(
        portrait, speech_like(0.2), sampling_rate=16000, height=64, width=64, num_inference_steps=1,
        clip_length=4, num_motion_frames=2, guidance_scale=1.0, output_type="np",
    )  # fmt: skip
    image = pipe.image_processor.postprocess(pipe.image_processor.preprocess(portrait, 64, 64), "pil")[0]
    mouth = mouth_mask(detect_face(np.asarray(image)), (64, 64))
    assert mouth.sum() > 0
    full = pipe.encode_image(pipe.image_processor.preprocess(portrait, 64, 64))
    inside = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(mouth)[None, None], (32, 32))[0, 0]
    injected = seen[0][0]
    torch.testing.assert_close(injected, full[0] * (1 - inside))
    assert injected[:, inside == 1].eq(0).all() and full[0][:, inside == 1].abs().sum() > 0

    model = EmoTrainingModel(pipe)
    args = dict(
        noisy=torch.randn(1, 4, 2, 32, 32), timesteps=torch.tensor([500]), reference_latents=full,
        motion_latents=None, face_mask=torch.ones(1, 1, 64, 64), audio_features=None, speeds=None,
        keep={k: torch.ones(1) for k in ("reference", "audio", "motion")},
    )  # fmt: skip
    with pytest.raises(ValueError, match="reference_mouth_mask"):
        model(**args)
    seen.clear()
    model(**args, reference_mouth_mask=torch.from_numpy(mouth)[None, None])
    torch.testing.assert_close(seen[0], injected[None])


@torch.no_grad()
def test_the_reference_mouth_probe_swaps_the_injected_latents_of_the_guided_rows_only():
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "probe_reference_mouth.py"
    spec = importlib.util.spec_from_file_location("probe_reference_mouth", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    with_injected = probe.with_injected
    pipe = injected_pipeline()
    unet = pipe.denoising_unet
    seen = []
    spy = unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["reference_latents"].clone()), with_kwargs=True
    )
    inputs = backbone_inputs(unet)
    inputs = {
        k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in inputs.items()
    }
    inputs["reference_tokens"] = {k: torch.cat([v, v]) for k, v in inputs["reference_tokens"].items()}
    given = torch.stack([torch.ones(4, 8, 8), torch.zeros(4, 8, 8)])  # a guided row and an unguided one
    swap = torch.full((1, 4, 8, 8), 3.0)
    handle = with_injected(pipe, swap)  # registered after the spy: the spy sees what came in
    swapped = unet(**inputs, reference_latents=given).sample
    handle.remove()
    plain = unet(**inputs, reference_latents=given).sample
    spy.remove()
    assert all(torch.equal(s, given) for s in seen)
    expected = unet(**inputs, reference_latents=torch.stack([swap[0], torch.zeros(4, 8, 8)])).sample
    torch.testing.assert_close(swapped, expected)
    assert not torch.allclose(swapped[0], plain[0]) and torch.equal(swapped[1], plain[1])

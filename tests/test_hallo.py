"""Hallo's weights in EmoPipeline: the converter on tiny random releases in Hallo's exact layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hallo_release import TINY_UNET, hallo_net_shapes, write_tiny_release
from PIL import Image
from safetensors.torch import load_file

from pipeline import EmoPipeline
from pipeline.convert import main as convert_main
from pipeline.hallo import (
    HALLO_BEHAVIOUR,
    UNUSED_PLAIN_MOTION,
    ConversionError,
    convert_hallo,
    map_denoising_key,
)

SIZE = 64  # pixels; latents 8 x 8


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("hallo_release"))


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("hallo_converted") / "model"
    report = convert_hallo(release, out, dtype="fp32")
    return out, report


def _inputs(seconds: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.02 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, SIZE)[None]
    image[16:48, 20:44] = (200, 150, 120)
    yy, xx = np.mgrid[:64, :64]
    face = (np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 300) * 255).astype(np.uint8)
    lip = (np.exp(-((yy - 44) ** 2 + (xx - 32) ** 2) / 40) * 255).astype(np.uint8)
    masks = {"full": 255 - face, "face": np.clip(face.astype(int) - lip, 0, 255).astype(np.uint8), "lip": lip}
    box = np.zeros((SIZE, SIZE), np.float32)
    box[10:54, 14:50] = 1.0
    embedding = rng.standard_normal(512).astype(np.float32) * 1.5
    return image, audio, masks, box, embedding


def _generate(pipe, steps=2, seconds=0.8, **overrides):
    image, audio, masks, box, embedding = _inputs(seconds)
    kwargs = dict(
        sampling_rate=16000, face_mask=box, face_embedding=embedding, region_masks=masks,
        num_inference_steps=steps, generator=torch.manual_seed(42), output_type="np",
    ) | overrides  # fmt: skip
    return pipe(image, audio, **kwargs).frames


def test_every_key_of_net_pth_is_mapped_or_unused_with_a_reason(release, converted):
    out, report = converted
    net = torch.load(release / "hallo" / "net.pth", weights_only=True)
    assert set(report.mapped) | set(report.unused) == set(net)
    assert not set(report.mapped) & set(report.unused)
    # the unused ones are exactly the motion modules of the blocks without attention (down 3, up 0)
    plain = {
        k
        for k in net
        if k.startswith(("denoising_unet.down_blocks.3.motion", "denoising_unet.up_blocks.0.motion"))
    }
    assert set(report.unused) == plain and len(plain) == 5 * 28
    assert set(report.unused.values()) == {UNUSED_PLAIN_MOTION}
    assert report.from_base == {}
    saved = json.loads((out / "conversion_report.json").read_text())
    assert saved["unused"] == report.unused
    # one tensor of each kind lands where it should, with its value
    pipe = EmoPipeline.from_pretrained(out)
    key = "denoising_unet.up_blocks.2.audio_modules.1.transformer_blocks.0.attn2_2.to_k.weight"
    ours = pipe.denoising_unet.state_dict()[
        "up_blocks.2.audio_modules.1.transformer_blocks.0.attn2_2.to_k.weight"
    ]
    torch.testing.assert_close(ours, net[key], rtol=0, atol=0)
    table = "denoising_unet.mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    stored = pipe.denoising_unet.state_dict()["mid_block.motion_modules.0.transformer_blocks.0.pe"]
    torch.testing.assert_close(stored[1], net[table][0], rtol=0, atol=0)
    torch.testing.assert_close(
        pipe.identity_projection.proj.weight, net["imageproj.proj.weight"], rtol=0, atol=0
    )
    assert pipe.face_locator.blocks[3].weight.shape == net["face_locator.blocks.3.weight"].shape


def test_converted_folder_carries_hallos_settings(converted):
    out, _ = converted
    pipe = EmoPipeline.from_pretrained(out)
    assert pipe.behaviour == HALLO_BEHAVIOUR
    assert pipe.speed_encoder is None and not pipe.has_speed_layers and pipe.has_region_audio
    settings = pipe.resolved_defaults()
    assert (settings["clip_length"], settings["num_motion_frames"], settings["fps"]) == (16, 2, 25)
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (40, 3.5)
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.prediction_type, sched.timestep_spacing) == (
        "linear",
        "v_prediction",
        "trailing",
    )
    assert sched.rescale_betas_zero_snr
    unet = pipe.denoising_unet
    assert unet.config.reference_attention == "concat" and unet.config.motion_in_plain_blocks is False
    assert unet.down_blocks[3].motion_modules is None and unet.up_blocks[0].motion_modules is None
    assert len(unet.down_blocks[1].audio_modules) == 2
    # Hallo's width rule: down block 1's first audio module is as wide as the block's input (32), not 64
    assert unet.down_blocks[1].audio_modules[0].proj_in.weight.shape == (32, 64, 1, 1)
    assert unet.up_blocks[2].audio_modules[0].proj_in.weight.shape == (32, 64, 1, 1)  # skip input width


def test_wrong_shape_and_unknown_key_are_clear_errors(release, tmp_path):
    net = torch.load(release / "hallo" / "net.pth", weights_only=True)
    bad = dict(net)
    key = "denoising_unet.mid_block.audio_modules.0.transformer_blocks.0.attn2_1.to_k.weight"
    bad[key] = torch.zeros(3, 5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"attn2_1\.to_k\.weight.*shape \(3, 5\)"):
        convert_hallo(release, tmp_path / "out", net=tmp_path / "bad.pth", dtype="fp32")
    extra = dict(net) | {"denoising_unet.mid_block.something_new.weight": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match="unmapped key 'denoising_unet.mid_block.something_new.weight'"):
        convert_hallo(release, tmp_path / "out", net=tmp_path / "extra.pth", dtype="fp32")
    missing = {k: v for k, v in net.items() if not k.startswith("imageproj.proj.bias")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConversionError, match=r"identity_projection\.proj\.bias is in neither net\.pth"):
        convert_hallo(release, tmp_path / "out", net=tmp_path / "missing.pth", dtype="fp32")
    with pytest.raises(ConversionError, match="net: .* not found"):
        convert_hallo(tmp_path / "nowhere", tmp_path / "out")


def test_cli_converts_and_reports(release, tmp_path, capsys):
    assert (
        convert_main(["hallo", "--release", str(release), "--output", str(tmp_path / "m"), "--dtype", "fp16"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "2512 tensors of net.pth mapped, 140 unused" in printed
    saved = {
        name: next(iter(load_file(next((tmp_path / "m" / name).glob("*.safetensors"))).values())).dtype
        for name in ("denoising_unet", "reference_net", "vae", "audio_encoder")
    }
    assert saved == {
        "denoising_unet": torch.float16,
        "reference_net": torch.float16,
        "vae": torch.float16,
        "audio_encoder": torch.float32,
    }
    pipe = EmoPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.float16)
    assert pipe.denoising_unet.dtype == torch.float16
    assert (
        convert_main(["hallo", "--release", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    )
    assert "error: net:" in capsys.readouterr().err


def test_joyhallo_layout_converts_to_shared_audio_attention(tmp_path):
    root = write_tiny_release(tmp_path / "joy", joyhallo=True)
    report = convert_hallo(root, tmp_path / "out", dtype="fp32")
    pipe = EmoPipeline.from_pretrained(tmp_path / "out")
    assert pipe.denoising_unet.config.audio_attention_type == "region_shared"
    assert not hasattr(pipe.denoising_unet.mid_block.audio_modules[0].transformer_blocks[0], "attn2_1")
    assert len(report.mapped) + len(report.unused) == len(
        torch.load(root / "hallo" / "net.pth", weights_only=True)
    )


def test_layout_of_full_size_net_pth():
    """The builder's full-size layout: Hallo's parameter count (~2.42 B) and the facts of docs/hallo_port.md."""
    sd15 = TINY_UNET | dict(
        block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, sample_size=64
    )
    shapes = hallo_net_shapes(sd15, wav2vec_layers=12, wav2vec_hidden=768)
    total = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(".pe"))
    assert 2.35e9 < total < 2.5e9
    assert shapes["audioproj.proj1.weight"] == (512, 46080)
    assert shapes["imageproj.proj.weight"] == (3072, 512)
    assert shapes["denoising_unet.down_blocks.1.audio_modules.0.proj_in.weight"] == (320, 640, 1, 1)
    assert shapes["denoising_unet.up_blocks.1.audio_modules.2.transformer_blocks.0.attn2_1.to_k.weight"] == (
        640,
        768,
    )
    assert sum(1 for k in shapes if k.endswith("attention_blocks.0.to_q.weight")) == 21
    assert sum(1 for k in shapes if k.endswith("audio_modules.0.norm.weight")) == 7


def test_map_denoising_key():
    assert map_denoising_key(
        "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    ) == ("up_blocks.1.motion_modules.2.transformer_blocks.0.pe", 1)
    assert map_denoising_key(
        "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight"
    ) == (
        "mid_block.motion_modules.0.transformer_blocks.0.norm3.weight",
        None,
    )
    assert map_denoising_key("down_blocks.0.attentions.1.transformer_blocks.0.norm1.weight")[0] == (
        "down_blocks.0.attentions.1.transformer_blocks.0.norm1.weight"
    )


def test_converted_model_generates_deterministically(converted):
    out, _ = converted
    pipe = EmoPipeline.from_pretrained(out)
    frames = _generate(pipe, seconds=0.8)  # 20 frames -> 2 clips of 16: the decoded motion-frame path runs
    assert frames.shape == (20, SIZE, SIZE, 3) and np.isfinite(frames).all()
    assert frames.std() > 0.01
    again = _generate(pipe, seconds=0.8)
    np.testing.assert_array_equal(frames, again)
    # the whole video's noise as one tensor: clip k uses frames 16k .. 16k+15
    noise = torch.randn(1, 4, 32, 8, 8, generator=torch.manual_seed(3))
    a = _generate(pipe, latents=noise)
    b = _generate(pipe, latents=noise.clone())
    np.testing.assert_array_equal(a, b)
    c = _generate(pipe, latents=torch.cat([noise[:, :, :16], torch.randn(1, 4, 16, 8, 8)], dim=2))
    np.testing.assert_array_equal(a[:16], c[:16])
    assert np.abs(a[16:] - c[16:]).max() > 1e-3
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 32, 8, 8\)"):
        _generate(pipe, latents=noise[:, :, :16])
    # the region weights, the face embedding and the masks all reach the output
    for change in (dict(lip_weight=0.0), dict(face_embedding=np.zeros(512, np.float32))):
        assert np.abs(_generate(pipe, **change) - frames).max() > 1e-4, change
    # Hallo's frames read the null- and the conditional-identity reference in turn; without the switch, all
    # frames read the conditional one: a different video
    behaviour = dict(pipe.config.behaviour)
    pipe.register_to_config(behaviour={**behaviour, "reference_frames_alternate": False})
    try:
        assert np.abs(_generate(pipe, seconds=0.8) - frames).max() > 1e-4
    finally:
        pipe.register_to_config(behaviour=behaviour)
    with pytest.raises(ValueError, match="`face_embedding` must have 512 values, got 3"):
        _generate(pipe, face_embedding=np.ones(3))


def _grad_report(pipe):
    """Run one denoising step with gradients on and backpropagate from the step's latents."""
    image, audio, masks, box, embedding = _inputs(0.3)

    def backward(p, step, t, kwargs):
        kwargs["latents"].square().mean().backward()
        p.interrupt()
        return kwargs

    pipe.batch_guidance = True
    EmoPipeline.__call__.__wrapped__(
        pipe, image, audio, sampling_rate=16000, face_mask=box, face_embedding=embedding, region_masks=masks,
        num_inference_steps=2, generator=torch.manual_seed(0), output_type="np", callback_on_step_end=backward,
    )  # fmt: skip
    untouched = set()
    for name in (
        "reference_net",
        "denoising_unet",
        "face_locator",
        "identity_projection",
        "audio_projection",
    ):
        for key, param in getattr(pipe, name).named_parameters():
            if param.grad is None or not param.grad.abs().sum() > 0:
                untouched.add(f"{name}.{key}")
    return untouched


def test_every_mapped_tensor_reaches_the_output(converted):
    """Nothing silently ignored: every parameter from net.pth moves the denoised latents, except the
    ReferenceNet's last block after the last tokens the backbone reads (Hallo computes and discards them)."""
    out, report = converted
    pipe = EmoPipeline.from_pretrained(out)
    untouched = _grad_report(pipe)
    last = "reference_net.up_blocks.3.attentions.2."
    allowed = {
        k
        for k in untouched
        if k.startswith(last) and ".norm1." not in k and ".norm." not in k and ".proj_in." not in k
    }
    # self-attention over the mid block's single token (1 x 1 at 64 px): the softmax of one logit is 1 whatever
    # q and k are, so their gradient is zero in exact arithmetic (exactly 0.0 on some CPUs, rounding noise on others)
    one_token = {k for k in untouched if ".mid_block." in k and (".attn1.to_q." in k or ".attn1.to_k." in k)}
    assert untouched == allowed | one_token and allowed, sorted(untouched - allowed - one_token)[:5]
    assert any(".attn2." in k for k in allowed) and any("proj_out" in k for k in allowed)
    # the position tables are buffers: they matter too
    mapped_tables = [k for k, v in report.mapped.items() if v.endswith(".pe")]
    assert len(mapped_tables) == 2 * 16  # 16 motion modules run, 2 tables each


def test_face_mask_arrays_are_resized_as_hallo_resizes_its_mask_png(converted):
    pipe = EmoPipeline.from_pretrained(converted[0])
    box = np.zeros((75, 90), np.uint8)
    box[10:60, 20:70] = 255
    as_png = pipe.prepare_face_mask(Image.fromarray(box), None, 64, 64, "cpu")
    expected = np.asarray(Image.fromarray(box).resize((64, 64), Image.BILINEAR), np.float32) / 255
    np.testing.assert_array_equal(as_png[0, 0].numpy(), expected)
    assert 0 < expected[8, 16] < 1  # soft edges, as Hallo's bilinear resize makes them
    for array in (box, box / 255.0, torch.as_tensor(box / 255.0)):
        np.testing.assert_array_equal(pipe.prepare_face_mask(array, None, 64, 64, "cpu"), as_png)


def test_an_all_bright_portrait_is_normalised_twice_as_in_hallo(converted):
    pipe = EmoPipeline.from_pretrained(converted[0])
    image, audio, masks, box, embedding = _inputs(0.4)  # one clip
    bright = (128 + image.astype(int) // 2).astype(np.uint8)  # every value >= 128: no negative pixel
    kwargs = dict(sampling_rate=16000, face_mask=box, face_embedding=embedding, region_masks=masks,
                  num_inference_steps=2, output_type="np")  # fmt: skip
    frames = pipe(bright, audio, generator=torch.manual_seed(1), **kwargs).frames
    # pixel p in [-1, 1] normalised again is 2p - 1, i.e. the 8-bit value 2v - 255
    darker = (2 * bright.astype(int) - 255).astype(np.uint8)
    assert darker.min() < 128
    expected = pipe(darker, audio, generator=torch.manual_seed(1), **kwargs).frames
    np.testing.assert_allclose(frames, expected, atol=2e-4)  # float rounding of 2p - 1 only
    behaviour = dict(pipe.config.behaviour)
    pipe.register_to_config(behaviour={**behaviour, "renormalise_bright_batch": False})
    plain = pipe(bright, audio, generator=torch.manual_seed(1), **kwargs).frames
    assert np.abs(plain - frames).max() > 1e-3

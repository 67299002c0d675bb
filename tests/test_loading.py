"""From base weights to an untrained EMO: SD 1.5 UNet, VAE, AnimateDiff (both layouts) and wav2vec2 files.

Checkpoints are written by the tests in the real on-disk formats (diffusers folders, the original AnimateDiff
`.ckpt` keys, transformers folders); tiny sizes run in seconds, the full SD 1.5 size checks every tensor.
"""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from safetensors import safe_open
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from pipeline import EmoPipeline
from pipeline.loading import CONFIGS, convert_animatediff_keys

TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    norm_num_groups=8,
    sample_size=16,
    cross_attention_dim=48,  # the "text" width: differs from every block width, as 768 does in SD 1.5
)
TINY_MOTION = dict(
    block_out_channels=(32, 64),
    motion_layers_per_block=1,
    motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=4,
    motion_norm_num_groups=8,
    use_motion_mid_block=True,
)
TINY_BACKBONE = dict(audio_dim=32, speed_dim=32, motion_num_attention_heads=4, motion_norm_num_groups=8)


def to_original_animatediff(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter keys -> the key layout of AnimateDiff's own `mm_sd_v15_v2.ckpt`."""
    original = {}
    for key, value in state_dict.items():
        key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        if key.endswith("pos_embed.pe"):
            for i in (0, 1):
                original[key.replace("pos_embed.pe", f"attention_blocks.{i}.pos_encoder.pe")] = value
            continue
        key = re.sub(r"\.attn(\d)\.", lambda m: f".attention_blocks.{int(m.group(1)) - 1}.", key)
        key = re.sub(r"\.norm([12])\.", lambda m: f".norms.{int(m.group(1)) - 1}.", key)
        original[key.replace(".norm3.", ".ff_norm.")] = value
    return original


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    """Tiny SD 1.5 folder (unet/ + vae/), MotionAdapter folder, original-layout .ckpt, wav2vec2 folder."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "sd15" / "unet")
    AutoencoderKL(**CONFIGS["tiny"]["vae"]).save_pretrained(root / "sd15" / "vae")
    adapter = MotionAdapter(**TINY_MOTION)
    adapter.save_pretrained(root / "motion_adapter")
    torch.save(to_original_animatediff(adapter.state_dict()), root / "mm_tiny.ckpt")
    Wav2Vec2Model(Wav2Vec2Config(**CONFIGS["tiny"]["audio_encoder"])).save_pretrained(root / "wav2vec2")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(root / "wav2vec2")
    return root


def build(base_models, motion_module):
    return EmoPipeline.from_base_models(
        unet=base_models / "sd15", vae=base_models / "sd15", audio_encoder=base_models / "wav2vec2",
        motion_module=motion_module, backbone_config=TINY_BACKBONE, return_report=True,
    )  # fmt: skip


def test_original_animatediff_keys_map_to_motion_adapter_keys(base_models):
    adapter = MotionAdapter.from_pretrained(base_models / "motion_adapter").state_dict()
    converted = convert_animatediff_keys(torch.load(base_models / "mm_tiny.ckpt", weights_only=True))
    assert set(converted) == {k for k in adapter if not k.endswith("pos_embed.pe")}
    assert all(torch.equal(converted[k], adapter[k]) for k in converted)


@pytest.mark.parametrize("layout", ["mm_tiny.ckpt", "motion_adapter"])
def test_every_kept_sd15_and_motion_tensor_loads_with_its_value(base_models, layout):
    pipe, report = build(base_models, base_models / layout)
    sd = UNet2DConditionModel.from_pretrained(base_models / "sd15" / "unet").state_dict()
    motion = MotionAdapter.from_pretrained(base_models / "motion_adapter").state_dict()

    for name in ("reference_net", "denoising_unet"):
        ours = getattr(pipe, name).state_dict()
        kept = [k for k in sd if k in ours and sd[k].shape == ours[k].shape]
        assert kept and all(torch.equal(ours[k], sd[k]) for k in kept)
        # every SD tensor is either kept or a named, explained exception
        dropped = {k for k in sd if k not in kept}
        text_kv = {k for k in sd if re.search(r"attn2\.to_[kv]\.", k)}
        head = (
            {k for k in sd if k.startswith(("conv_norm_out", "conv_out"))}
            if name == "reference_net"
            else set()
        )
        assert dropped == text_kv | head
        for key in text_kv:  # reference-attention keys/values start as the block's self-attention ones
            twin = key.replace("attn2", "attn1")
            assert torch.equal(ours[key], sd[twin])
            assert twin in report.initialised[name][key]
        assert set(report.loaded[name]) >= set(kept)

    backbone = pipe.denoising_unet.state_dict()
    motion_keys = [k for k in motion if not k.endswith("pos_embed.pe")]
    assert all(torch.equal(backbone[k], motion[k]) for k in motion_keys)
    new = set(report.new["denoising_unet"])
    assert new and all((".audio_attention." in k) or ("_speed." in k) for k in new)
    assert not any(".motion_modules." in k and "_speed." not in k for k in new)


def test_new_layers_start_with_zero_output(base_models):
    pipe, _ = build(base_models, base_models / "mm_tiny.ckpt")
    for key, value in pipe.denoising_unet.state_dict().items():
        if re.search(r"(audio_attention\.attn|attn_speed)\.to_out\.0\.", key):
            assert not value.any(), key
    assert not pipe.face_locator.conv_out.weight.any()
    x = torch.randn(1, 32, 8, 8)
    block = pipe.denoising_unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert not block.audio_attention(x.flatten(2).transpose(1, 2), torch.randn(1, 4, 32)).any()


def test_without_motion_module_the_temporal_layers_are_new_and_identity(base_models):
    pipe, report = build(base_models, None)
    assert any(".motion_modules." in k for k in report.new["denoising_unet"])
    module = pipe.denoising_unet.down_blocks[0].motion_modules[0]
    x = torch.randn(6, 32, 8, 8)
    torch.testing.assert_close(module(x, num_frames=3), x)


def test_audio_encoder_and_projection_sizes_follow_wav2vec2(base_models):
    pipe, _ = build(base_models, None)
    saved = Wav2Vec2Model.from_pretrained(base_models / "wav2vec2").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.audio_encoder.state_dict().items())
    assert pipe.audio_projection.config.num_layers == 3  # 2 layers + the CNN features
    assert pipe.audio_projection.config.feature_dim == 32
    assert pipe.face_locator.config.embedding_channels == 32


def test_pipeline_from_base_models_generates_and_round_trips(base_models, tmp_path):
    pipe, report = build(base_models, base_models / "motion_adapter")
    assert "denoising_unet:" in report.summary() and "tensors loaded" in report.summary()
    pipe.set_progress_bar_config(disable=True)
    image = np.full((32, 32, 3), 128, np.uint8)
    kwargs = dict(sampling_rate=16_000, face_mask=np.ones((32, 32)), num_inference_steps=2, output_type="np")
    out = pipe(image, np.zeros(4800, np.float32), generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.frames.shape == (8, 32, 32, 3) and np.isfinite(out.frames).all()
    pipe.save_pretrained(tmp_path / "emo")
    again = EmoPipeline.from_pretrained(tmp_path / "emo")
    again.set_progress_bar_config(disable=True)
    out2 = again(image, np.zeros(4800, np.float32), generator=torch.Generator().manual_seed(0), **kwargs)
    np.testing.assert_array_equal(out.frames, out2.frames)


def test_unsupported_unet_is_refused_with_a_reason(tmp_path):
    UNet2DConditionModel(**TINY_UNET, use_linear_projection=True).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="only SD 1.x-style UNets"):
        EmoPipeline.from_base_models(unet=tmp_path / "unet", vae=tmp_path, audio_encoder=tmp_path)


@pytest.mark.slow
def test_full_size_sd15_and_animatediff_v2_load_every_kept_tensor(tmp_path, base_models):
    """SD 1.5 UNet (860M) + mm_sd_v15_v2 layout (453M), random values, real formats and shapes."""
    torch.manual_seed(0)
    UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).save_pretrained(
        tmp_path / "unet"
    )
    motion = {k: v for k, v in MotionAdapter().state_dict().items() if not k.endswith("pos_embed.pe")}
    assert len(motion) == 21 * 26  # v2: 21 motion modules (incl. the mid block) of 26 tensors, pe dropped
    torch.save(to_original_animatediff(motion), tmp_path / "mm_sd_v15_v2.ckpt")
    del motion
    gc.collect()

    pipe, report = EmoPipeline.from_base_models(
        unet=tmp_path / "unet", vae=base_models / "sd15", audio_encoder=base_models / "wav2vec2",
        motion_module=tmp_path / "mm_sd_v15_v2.ckpt", return_report=True,
    )  # fmt: skip
    backbone = pipe.denoising_unet.state_dict()
    reference = pipe.reference_net.state_dict()
    # compare against the files, memory-mapped, so the test holds no second copy of the weights
    with safe_open(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", "pt") as sd:
        keys = list(sd.keys())
        text_kv = {k for k in keys if re.search(r"attn2\.to_[kv]\.", k)}
        assert len(text_kv) == 32  # 16 transformer blocks in SD 1.5
        for key in keys:
            value = sd.get_tensor(key)
            if key in text_kv:
                assert backbone[key].shape == (value.shape[0], value.shape[0])  # reference-attention: c -> c
                assert torch.equal(backbone[key], sd.get_tensor(key.replace("attn2", "attn1")))
            else:
                assert torch.equal(backbone[key], value), key
                if not key.startswith(("conv_norm_out", "conv_out")):
                    assert torch.equal(reference[key], value), key
    original = torch.load(tmp_path / "mm_sd_v15_v2.ckpt", mmap=True, weights_only=True)
    for key, value in convert_animatediff_keys(original).items():
        assert torch.equal(backbone[key], value), key
    assert all((".audio_attention." in k) or ("_speed." in k) for k in report.new["denoising_unet"])

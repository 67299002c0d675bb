"""CUDA paths: fp16, model CPU offload and 8-bit UNets (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import speech_like, tiny_pipeline

from pipeline import EmoPipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MASK = np.ones((32, 32), np.float32)


def frames(pipe: EmoPipeline) -> np.ndarray:
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return pipe(
        image, speech_like(0.6), sampling_rate=16_000, face_mask=MASK, num_inference_steps=3,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip


def test_fp16_on_cuda_stays_close_to_fp32_on_cpu():
    reference = frames(tiny_pipeline())
    half = frames(tiny_pipeline().to("cuda", torch.float16))
    assert np.isfinite(half).all()
    assert np.abs(half - reference).mean() < 0.02


def test_model_cpu_offload_gives_the_same_frames():
    on_gpu = frames(tiny_pipeline().to("cuda"))
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload()
    np.testing.assert_allclose(frames(pipe), on_gpu, atol=1e-4)
    assert pipe.denoising_unet.device.type == "cpu"  # offloaded again after the call


def test_8bit_unets_load_through_diffusers_quantization_config(tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig

    tiny_pipeline().save_pretrained(tmp_path / "emo")
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_8bit",
        quant_kwargs={"load_in_8bit": True},
        components_to_quantize=["denoising_unet", "reference_net"],
    )
    pipe = EmoPipeline.from_pretrained(tmp_path / "emo", quantization_config=config).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    linear = pipe.denoising_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(linear).__name__ == "Linear8bitLt"
    assert np.isfinite(frames(pipe)).all()

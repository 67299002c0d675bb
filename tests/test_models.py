"""emo_app.models: which model (embedded, $EMO_MODEL, folder, hub id), loading it, describing it."""

import pytest
import torch

from emo_app import models
from emo_app.models import ModelError, describe_model, load_pipeline, resolve_model
from pipeline import build_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved random tiny EmoPipeline (32x32 frames)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_pipeline("tiny").save_pretrained(folder)
    return folder


def test_no_model_means_emo_model_env_then_the_embedded_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EMO_MODEL", str(model_dir))
    assert resolve_model(None) == str(model_dir)
    monkeypatch.delenv("EMO_MODEL")
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", model_dir)
    assert resolve_model(None) == str(model_dir)
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", tmp_path / "emo-small")
    with pytest.raises(
        ModelError, match=r"^the embedded model is missing \(.*emo-small\): .* \(--model or \$EMO_MODEL\)"
    ):
        resolve_model(None)


def test_unusable_models_raise_one_line_model_errors(tmp_path):
    with pytest.raises(ModelError, match="has no model_index.json: it is not a saved EmoPipeline"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file: pass the folder that holds model_index.json"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(
        ModelError, match=r"^model 'nobody/no-such-emo' is not a local folder and could not be downloaded: \S"
    ):
        resolve_model("nobody/no-such-emo")
    with pytest.raises(ModelError, match="unknown dtype 'fp8': use one of fp16, bf16, fp32"):
        load_pipeline(tmp_path, device="cpu", dtype="fp8")
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        load_pipeline(tmp_path, device="gpu0")


def test_load_pipeline_applies_dtype_and_low_vram_slicing(model_dir):
    pipe = load_pipeline(model_dir, device="cpu", dtype="bf16", low_vram=True)
    assert {p.dtype for p in pipe.denoising_unet.parameters()} == {torch.bfloat16}
    slices = {m.slice_size for m in pipe.denoising_unet.modules() if hasattr(m, "slice_size")}
    assert slices == {2}  # "auto": half of the tiny model's 4 heads at a time
    assert pipe.vae.use_slicing
    assert load_pipeline(model_dir, device="cpu").dtype == torch.float32  # CPU default


def test_memory_plan_picks_the_cheapest_combination_that_fits():
    from emo_app.models import GIB, memory_plan

    weights, largest = int(2.6 * GIB), int(1.7 * GIB)  # an SD 1.5-sized EMO in fp16
    assert memory_plan(40 * GIB, weights, largest) == ["vae_slicing"]
    assert memory_plan(7 * GIB, weights, largest) == ["vae_slicing", "attention_slicing"]
    assert memory_plan(4 * GIB, weights, largest) == ["vae_slicing", "attention_slicing", "model_cpu_offload"]
    assert memory_plan(2 * GIB, weights, largest)[-1] == "sequential_cpu_offload"


def test_describe_model_counts_parameters_and_flags_the_embedded_model(model_dir, monkeypatch):
    pipe = load_pipeline(model_dir, device="cpu")
    fresh = build_pipeline("tiny")
    expected = sum(
        p.numel() for c in fresh.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    described = describe_model(pipe, model_dir)
    assert described | {"summary": None} == {
        "name": model_dir.name,
        "path": str(model_dir.resolve()),
        "parameters": expected,
        "resolution": 32,
        "device": "cpu",
        "dtype": "float32",
        "embedded": False,
        "hallo": False,
        "speed_layers": True,
        "region_audio": False,
        "summary": None,
    }
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", model_dir)
    embedded = describe_model(pipe, model_dir)
    assert (embedded["name"], embedded["embedded"]) == ("emo-small (embedded)", True)
    assert embedded["summary"].startswith("The project's small embedded model (32x32 px, 3 M parameters)")

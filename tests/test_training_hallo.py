"""Fine-tuning a converted Hallo model with `training`: a tiny random Hallo release -> `convert_hallo` ->
stage 2 (audio + temporal modules) -> stage 3 (speed layers added) -> an EmoPipeline folder that generates.
All on the CPU, one thread, on synthetic talking videos prepared at the tiny release's 64 x 64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hallo_release import write_tiny_release
from safetensors.torch import load_file

from pipeline import EmoPipeline
from pipeline.audio import load_audio
from pipeline.hallo import convert_hallo
from training import synthetic
from training.config import load_config, parameter_matcher
from training.data import EmoDataset
from training.prepare import PrepareOptions, prepare
from training.train import (
    EmoTrainingModel,
    add_speed_layers,
    region_masks,
    select_trainable,
    train,
    training_loss,
)

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
FPS, SECONDS, CLIP, SIZE = 25, 1.6, 20, 64
COMPONENTS = (
    "reference_net",
    "denoising_unet",
    "face_locator",
    "audio_projection",
    "identity_projection",
    "speed_encoder",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Two synthetic talking videos prepared at 64 px (no cached audio features) and a converted tiny Hallo."""
    root = tmp_path_factory.mktemp("training_hallo")
    videos = root / "videos"
    videos.mkdir()
    for seed, name in enumerate(("alice", "bob")):
        synthetic.write_talking_video(videos / f"{name}.mp4", seconds=SECONDS, fps=FPS, size=SIZE, seed=seed)
    prepare(videos, root / "data", PrepareOptions(fps=FPS, size=SIZE, clip_length=CLIP, min_clip_length=8))
    release = write_tiny_release(root / "release")
    convert_hallo(release, root / "hallo", dtype="fp32")
    return {"root": root, "data": root / "data", "hallo": root / "hallo"}


def hallo_config(workspace, stage: int, out: str, init: Path, *overrides: str):
    base = [
        f"data.root={workspace['data']}",
        f"output_dir={workspace['root'] / out}",
        f"init.pipeline={init}",
    ]
    return load_config(CONFIGS / f"tiny_hallo_stage{stage}.yaml", [*base, *overrides])


def component_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for name in COMPONENTS:
        if (folder / name).is_dir():
            for key, value in load_file(next((folder / name).glob("*.safetensors"))).items():
                weights[f"{name}.{key}"] = value
    return weights


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def stage2(workspace) -> dict:
    return train(hallo_config(workspace, 2, "stage2", workspace["hallo"]))


def a_batch(workspace, pipe, with_embedding: bool = False) -> dict[str, torch.Tensor]:
    """Two stage-2 samples with audio features computed as the trainer computes them for this model."""
    from training.train import compute_audio_features

    audio_dir = workspace["root"] / "audio_features_batch"
    compute_audio_features(pipe, str(workspace["data"]), audio_dir, FPS)
    dataset = EmoDataset(
        workspace["data"], SIZE, num_frames=4, num_motion_frames=2, with_audio=True,
        audio_layers=pipe.audio_projection.config.num_layers, audio_features_dir=audio_dir, seed=0,
    )  # fmt: skip
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    if with_embedding:
        batch["face_embedding"] = torch.randn(2, 512, generator=torch.Generator().manual_seed(3)) * 1.5
    return batch


def model_inputs(pipe, batch, keep=(1.0, 1.0), seed: int = 0):
    """The training forward's inputs for a batch: latents through the VAE, fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.encode_image(torch.cat([batch["pixel_values"].flatten(0, 1), batch["reference"]]))
    b = batch["reference"].shape[0]
    reference, latents = latents[-b:], latents[:-b].unflatten(0, (b, 6))
    target = latents[:, 2:].permute(0, 2, 1, 3, 4)
    levels = len(pipe.denoising_unet.config.block_out_channels)
    sizes = [(target.shape[-2] // 2**i, target.shape[-1] // 2**i) for i in range(levels)]
    return dict(
        noisy=torch.randn(target.shape, generator=gen),
        timesteps=torch.tensor([500, 900]),
        reference_latents=reference,
        motion_latents=latents[:, :2],
        face_mask=batch["face_mask"],
        audio_features=batch["audio_features"],
        keep={
            "reference": torch.tensor(keep),
            "audio": torch.ones(b),
            "motion": torch.ones(b),
        },
        region_masks=region_masks(batch["face_mask"], batch["mouth_mask"], sizes),
    )


# ------------------------------------------------------------------------------------------------ conditions
def test_region_masks_from_the_face_and_mouth_boxes(workspace):
    dataset = EmoDataset(workspace["data"], SIZE, seed=0)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    levels = region_masks(batch["face_mask"], batch["mouth_mask"], [(8, 8), (4, 4), (2, 2), (1, 1)])
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        (8, 8): (2, 64, 3), (4, 4): (2, 16, 3), (2, 2): (2, 4, 3), (1, 1): (2, 1, 3)
    }  # fmt: skip
    grid = levels[(8, 8)][0].reshape(8, 8, 3)
    assert 0 <= grid.min() and grid.max() <= 1
    face = torch.nn.functional.adaptive_avg_pool2d(batch["face_mask"][:1], 8)[0, 0]
    mouth = torch.nn.functional.adaptive_avg_pool2d(batch["mouth_mask"][:1], 8)[0, 0]
    # full = 1 - face: high away from the face; lip: high on the mouth; face: the face without the mouth
    assert grid[..., 0][face == 0].mean() > 0.6 > grid[..., 0][face == 1].mean()
    assert grid[..., 2][mouth > 0.5].mean() > 0.5 > grid[..., 2][face == 0].mean()
    assert grid[..., 1][(face == 1) & (mouth == 0)].mean() > grid[..., 1][mouth > 0.5].mean()


def test_training_audio_features_are_the_pipelines(workspace):
    """The trainer's cached features of a video, through the audio projection, are the pipeline's audio
    tokens of that audio (Hallo's way: CNN features at the frame rate before the transformer)."""
    from training.train import compute_audio_features

    pipe = EmoPipeline.from_pretrained(workspace["hallo"])
    assert pipe.behaviour.audio_features == "hallo"
    compute_audio_features(pipe, str(workspace["data"]), workspace["root"] / "features", FPS)
    cached = np.load(workspace["root"] / "features" / "alice.npy")
    assert cached.shape == (40, 3, 16)  # frames, tiny wav2vec2 layers + 1, hidden
    waveform = load_audio(workspace["data"] / "videos" / "alice" / "audio.wav", sampling_rate=16_000).mono
    waveform = waveform[: round(40 / FPS * 16_000)]
    with torch.no_grad():
        expected = pipe.encode_audio(waveform, 40, FPS, "cpu")
        layers = pipe.audio_projection.config.num_layers
        ours = pipe.audio_projection(torch.from_numpy(cached[:, -layers:])[None])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_dropped_reference_is_the_unconditional_branch(workspace):
    """Without its reference a sample runs plain self-attention with the null identity and no face-locator
    features: its prediction depends neither on the reference image nor on the face embedding."""
    pipe = EmoPipeline.from_pretrained(workspace["hallo"])
    model = EmoTrainingModel(pipe).eval()
    batch = a_batch(workspace, pipe, with_embedding=True)
    inputs = model_inputs(pipe, batch, keep=(1.0, 0.0))
    with torch.no_grad():
        pred = model(**inputs, speeds=None, face_embedding=batch["face_embedding"])
        other = dict(inputs, reference_latents=inputs["reference_latents"].flip(-1))
        moved_reference = model(**other, speeds=None, face_embedding=torch.zeros(2, 512))
        null_identity = model(**inputs, speeds=None)
        no_reference = model(**dict(inputs, keep=dict(inputs["keep"], reference=torch.zeros(2))), speeds=None)
    assert torch.equal(pred[1], moved_reference[1]) and torch.equal(pred[1], null_identity[1])
    assert not torch.equal(pred[0], moved_reference[0]) and not torch.equal(pred[0], null_identity[0])
    torch.testing.assert_close(no_reference[1], pred[1])  # a batch without any reference: plain attention


# ------------------------------------------------------------------------------------------------ stages
def test_stage2_fine_tunes_a_converted_hallo_model(workspace, stage2):
    assert math.isfinite(stage2["loss"]) and stage2["step"] == 2
    before = component_weights(workspace["hallo"])
    after = component_weights(stage2["export"])
    assert before.keys() == after.keys()
    changed = moved(before, after)
    declared = parameter_matcher(["temporal", "audio"])
    assert changed and all(declared(k) for k in changed), sorted(k for k in changed if not declared(k))[:5]
    assert any(".audio_modules." in k for k in changed) and any(".motion_modules." in k for k in changed)
    assert any(k.startswith("audio_projection.") for k in changed)
    pipe = EmoPipeline.from_pretrained(stage2["export"])
    assert pipe.behaviour.audio_features == "hallo" and pipe.identity_projection is not None
    assert not pipe.has_speed_layers


def test_stage1_on_a_converted_hallo_model_trains_its_identity_projection(workspace):
    overrides = [
        f"data.root={workspace['data']}", f"output_dir={workspace['root'] / 'stage1'}", "init.model=null",
        f"init.pipeline={workspace['hallo']}", f"data.resolution={SIZE}", "train.max_steps=2",
        "train.trainable=[backbone, reference_net, face_locator, identity]",
    ]  # fmt: skip
    result = train(load_config(CONFIGS / "tiny_stage1.yaml", overrides))
    assert math.isfinite(result["loss"]) and result["step"] == 2
    changed = moved(component_weights(workspace["hallo"]), component_weights(result["export"]))
    assert any(k.startswith("identity_projection.") for k in changed)
    assert not any(".motion_modules." in k or ".audio_modules." in k for k in changed)


def test_added_speed_layers_start_as_identity(workspace):
    """With the speed layers freshly added, the backbone predicts exactly what the converted model does,
    whatever the head speed; the layers are wired (non-zero output weights change the prediction)."""
    original = EmoPipeline.from_pretrained(workspace["hallo"])
    extended = EmoPipeline.from_pretrained(workspace["hallo"])
    torch.manual_seed(0)
    added = add_speed_layers(extended)
    assert extended.has_speed_layers and not original.has_speed_layers
    assert added and all(".attn_speed." in k or ".norm_speed." in k for k in added)
    assert extended.denoising_unet.config.speed_dim == extended.speed_encoder.config.output_dim == 256
    batch = a_batch(workspace, original)
    inputs = model_inputs(original, batch)
    speeds = torch.tensor([[0.2] * 8, [1.4] * 8])
    with torch.no_grad():
        before = EmoTrainingModel(original).eval()(**inputs, speeds=None)
        after = EmoTrainingModel(extended).eval()(**inputs, speeds=speeds)
        assert torch.equal(before, after)
        for name, param in extended.denoising_unet.named_parameters():
            if ".attn_speed.to_out." in name:
                param.normal_(0, 0.1)
        wired = EmoTrainingModel(extended).eval()(**inputs, speeds=speeds)
    assert not torch.allclose(before, wired)


def test_stage3_adds_speed_layers_and_exports_a_pipeline_that_generates(workspace, stage2):
    config = hallo_config(workspace, 3, "stage3", stage2["export"])
    result = train(config)
    assert math.isfinite(result["loss"]) and result["step"] == 2
    before, after = component_weights(stage2["export"]), component_weights(result["export"])
    new = set(after) - set(before)
    assert new and all(
        ".attn_speed." in k or ".norm_speed." in k or k.startswith("speed_encoder.") for k in new
    )
    changed = moved(before, after)
    declared = parameter_matcher(config.train.trainable)
    assert changed and all(declared(k) for k in changed)
    assert any(".attn_speed." in k and not torch.equal(after[k], torch.zeros_like(after[k])) for k in new)
    assert any(k.startswith("speed_encoder.") for k in changed | new)

    pipe = EmoPipeline.from_pretrained(result["export"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.has_speed_layers and pipe.identity_projection is not None
    assert (
        json.loads((result["export"] / "model_index.json").read_text())["speed_encoder"][1] == "SpeedEncoder"
    )
    image = np.asarray(synthetic.portrait(SIZE))
    box = np.zeros((SIZE, SIZE), np.float32)
    box[8:56, 12:52] = 1.0
    yy, xx = np.mgrid[:64, :64]
    face = (np.exp(-((yy - 30) ** 2 + (xx - 32) ** 2) / 300) * 255).astype(np.uint8)
    lip = (np.exp(-((yy - 44) ** 2 + (xx - 32) ** 2) / 40) * 255).astype(np.uint8)
    masks = {"full": 255 - face, "face": np.clip(face.astype(int) - lip, 0, 255).astype(np.uint8), "lip": lip}
    kwargs = dict(
        sampling_rate=16_000, face_mask=box, face_embedding=np.zeros(512, np.float32), region_masks=masks,
        num_inference_steps=2, clip_length=4, num_motion_frames=2, output_type="np",
    )  # fmt: skip
    audio = synthetic.speech_like_audio(0.3, seed=4)
    slow = pipe(image, audio, head_speed=0.1, generator=torch.Generator().manual_seed(0), **kwargs).frames
    fast = pipe(image, audio, head_speed=1.5, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert slow.shape == (8, SIZE, SIZE, 3) and np.isfinite(slow).all()
    assert not np.array_equal(slow, fast)  # the trained speed layers respond to the head speed


# ------------------------------------------------------------------------------------------------ identity
def test_face_embeddings_of_the_data_become_identity_tokens(workspace, monkeypatch, tmp_path):
    import shutil

    import pipeline.identity_embedding as identity_embedding
    from training.face_embeddings import write_face_embeddings

    data = tmp_path / "data"
    shutil.copytree(workspace["data"], data)
    calls = []

    def fake_embedding(image, model_root=None):
        calls.append(image.size)
        return np.full(512, float(len(calls)), np.float32)

    monkeypatch.setattr(identity_embedding, "face_embedding", fake_embedding)
    written = write_face_embeddings(data)
    assert sorted(written) == ["alice", "bob"] and calls == [(SIZE, SIZE)] * 2
    assert np.load(written["bob"]).tolist() == [2.0] * 512
    dataset = EmoDataset(data, SIZE, seed=0)
    assert dataset.has_face_embeddings
    assert {float(dataset[i]["face_embedding"][0]) for i in range(len(dataset))} == {1.0, 2.0}

    (data / "videos" / "bob" / "face_embedding.npy").unlink()
    with pytest.raises(ValueError, match="training.face_embeddings"):
        EmoDataset(data, SIZE, seed=0)

    pipe = EmoPipeline.from_pretrained(workspace["hallo"])
    model = EmoTrainingModel(pipe)
    params = select_trainable(model, ["identity"])
    assert params and all(p.requires_grad for p in pipe.identity_projection.parameters())
    assert not any(p.requires_grad for p in pipe.denoising_unet.parameters())
    # the embedding changes the loss (identity tokens reach both UNets) and its gradient trains the projection
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    config = hallo_config(workspace, 2, "identity", workspace["hallo"], "train.trainable=[identity]")
    batch = a_batch(workspace, pipe, with_embedding=True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(b):
        return training_loss(
            model, pipe, scheduler, b, config, torch.Generator().manual_seed(7), Accelerator(cpu=True)
        )

    with_identity = loss(batch)
    with_identity.backward()
    assert pipe.identity_projection.proj.weight.grad.abs().sum() > 0
    without = {k: v for k, v in batch.items() if k != "face_embedding"}
    with torch.no_grad():
        assert loss(without).item() != pytest.approx(with_identity.item(), rel=1e-6)

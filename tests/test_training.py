"""Training on tiny configs and a tiny dataset made here: synthetic talking videos -> training.prepare -> the
three stages -> an EmoPipeline folder that loads and generates. All on the CPU, one thread."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline import EmoPipeline, build_pipeline
from training import synthetic
from training.config import load_config, parameter_matcher
from training.data import EmoDataset
from training.prepare import PrepareOptions, prepare
from training.spoken_phonemes import espeak_available
from training.train import (
    EmoTrainingModel,
    list_checkpoints,
    load_initial_pipeline,
    main,
    resolve_resume,
    select_trainable,
    train,
    training_loss,
)

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
FPS, SECONDS, CLIP = 25, 1.6, 20  # 40 frames per video -> 2 clips of 20 frames


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training")
    videos = root / "videos"
    videos.mkdir()
    synthetic.write_talking_video(videos / "alice.mp4", seconds=SECONDS, fps=FPS, seed=0)
    synthetic.write_talking_video(videos / "bob.mp4", seconds=SECONDS, fps=FPS, seed=1)
    synthetic.write_talking_video(videos / "mime.mp4", seconds=SECONDS, fps=FPS, with_audio=False, seed=2)
    (videos / "broken.mp4").write_bytes(b"this is not a video" * 64)
    tiny = root / "tiny"
    build_pipeline("tiny").save_pretrained(tiny)  # its wav2vec2 caches the audio features
    data = root / "data"
    options = PrepareOptions(fps=FPS, size=32, clip_length=CLIP, min_clip_length=8, wav2vec=str(tiny))
    manifest = prepare(videos, data, options, workers=1)
    synthetic.portrait(32).save(root / "portrait.png")
    from pipeline.audio import write_wav

    write_wav(root / "speech.wav", synthetic.speech_like_audio(0.5, seed=3), 16_000)
    return {"root": root, "videos": videos, "data": data, "tiny": tiny, "manifest": manifest}


def stage_config(workspace, stage: int, out: str, *overrides: str):
    base = [f"data.root={workspace['data']}", f"output_dir={workspace['root'] / out}"]
    if stage > 1:
        base.append(f"init.pipeline={workspace['root'] / f'stage{stage - 1}' / 'pipeline'}")
    return load_config(CONFIGS / f"tiny_stage{stage}.yaml", [*base, *overrides])


def component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All trainable-component tensors of an exported pipeline, named "<component>.<param>"."""
    weights = {}
    for name in ("reference_net", "denoising_unet", "face_locator", "audio_projection", "speed_encoder"):
        for key, value in load_file(next((folder / name).glob("*.safetensors"))).items():
            weights[f"{name}.{key}"] = value
    return weights


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_clips_and_logs_skip_reasons(workspace):
    manifest = workspace["manifest"]
    assert [v["name"] for v in manifest["videos"]] == ["alice", "bob"]
    assert manifest["num_clips"] == 4
    assert all(c["num_frames"] == CLIP for v in manifest["videos"] for c in v["clips"])
    skipped = {Path(k).name: v for k, v in manifest["skipped"].items()}
    assert set(skipped) == {"mime.mp4", "broken.mp4"}
    assert skipped["mime.mp4"].startswith("no usable audio") and "no audio track" in skipped["mime.mp4"]
    assert skipped["broken.mp4"].startswith("unreadable video")

    folder = workspace["data"] / "videos" / "alice"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["num_frames"] == round(SECONDS * FPS) == 40
    assert meta["audio"]["num_samples"] == pytest.approx(SECONDS * 16_000, abs=1600)
    clip = meta["clips"][1]
    assert (clip["start"], clip["end"]) == (20, 40)
    frames = sorted((folder / "clips" / "001").glob("*.jpg"))
    assert len(frames) == CLIP and Image.open(frames[0]).size == (32, 32)
    boxes = np.array(clip["boxes"])
    assert boxes.shape == (CLIP, 4) and np.all(boxes[:, 2] > boxes[:, 0])
    # the crop is stable over the clip: the face (about 45 % of the crop) stays inside it
    assert boxes.min() > -2 and boxes.max() < 34
    speeds = np.array(clip["speeds"])
    assert speeds.shape == (CLIP,) and np.all(speeds >= 0) and 0.05 < speeds.mean() < 3.0  # degrees/frame
    assert np.load(folder / "wav2vec.npy").shape == (40, 3, 32)  # frames, tiny wav2vec2 layers + 1, hidden


def test_prepare_rerun_in_parallel_skips_finished_videos(workspace):
    meta = workspace["data"] / "videos" / "alice" / "meta.json"
    before = meta.stat().st_mtime_ns
    (workspace["data"] / "videos" / ".bob.partial").mkdir()  # an interrupted earlier run
    options = PrepareOptions(fps=FPS, size=32, clip_length=CLIP)
    manifest = prepare(workspace["videos"], workspace["data"], options, workers=2)  # the process-pool path
    assert meta.stat().st_mtime_ns == before
    assert manifest["num_clips"] == 4 and len(manifest["skipped"]) == 2
    assert not (workspace["data"] / "videos" / ".bob.partial").exists()


# ------------------------------------------------------------------------------------------------ data
def test_stage1_samples_a_target_and_another_frame_as_reference(workspace):
    dataset = EmoDataset(workspace["data"], 32, seed=5)
    sample = dataset[3]
    assert sample["pixel_values"].shape == (1, 3, 32, 32) and sample["reference"].shape == (3, 32, 32)
    assert -1.0 <= sample["pixel_values"].min() and sample["pixel_values"].max() <= 1.0
    assert not torch.equal(sample["pixel_values"][0], sample["reference"])
    mask = sample["face_mask"]
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0} and 0.1 < mask.mean() < 0.6
    assert all(torch.equal(a, b) for a, b in zip(dataset[3].values(), sample.values(), strict=True))
    assert not torch.equal(
        dataset[3 + len(dataset)]["reference"], sample["reference"]
    )  # next epoch, new draw


def test_stage2_samples_contiguous_frames_with_their_audio_and_speeds(workspace):
    dataset = EmoDataset(workspace["data"], 32, num_frames=4, num_motion_frames=2, with_audio=True, seed=0)
    sample = dataset[1]  # alice, clip 1 (frames 20-39)
    assert sample["pixel_values"].shape == (6, 3, 32, 32)
    clip = dataset.clips[1]
    rng = np.random.default_rng([0, 1])
    start = int(rng.integers(0, CLIP - 6 + 1))
    first = clip.start + start + 2
    features = np.load(clip.wav2vec)
    rows = np.clip(np.arange(first - 2, first + 6), 0, 39)
    assert torch.equal(sample["audio_features"], torch.from_numpy(features[rows]))
    assert sample["speeds"].shape == (8,)
    image = np.asarray(Image.open(clip.folder / f"{start:05d}.jpg"), np.float32) / 127.5 - 1
    assert torch.allclose(sample["pixel_values"][0], torch.from_numpy(image).permute(2, 0, 1))


# ------------------------------------------------------------------------------------------------ trainer
def test_parameter_groups_follow_the_paper():
    model = EmoTrainingModel(build_pipeline("tiny"))
    names = [n for n, _ in model.named_parameters()]
    stage3 = parameter_matcher(["temporal", "speed"])
    selected = {n for n in names if stage3(n)}
    assert any(".attn_speed." in n for n in selected) and any(
        n.startswith("speed_encoder.") for n in selected
    )
    assert all(".motion_modules." in n or n.startswith("speed_encoder.") for n in selected)
    stage1 = parameter_matcher(["backbone", "reference_net", "face_locator"])
    assert not any(stage1(n) for n in names if ".motion_modules." in n or ".audio_attention." in n)
    assert stage1("denoising_unet.conv_in.weight") and stage1("face_locator.conv_out.weight")


def test_loss_falls_on_a_fixed_batch(workspace):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    config = stage_config(workspace, 1, "fixed")
    torch.manual_seed(0)
    pipe = load_initial_pipeline(config)
    model = EmoTrainingModel(pipe)
    params = select_trainable(model, config.train.trainable)
    dataset = EmoDataset(workspace["data"], 32, seed=0)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    accelerator = Accelerator(cpu=True)
    losses = []
    for _ in range(50):
        loss = training_loss(
            model, pipe, scheduler, batch, config, torch.Generator().manual_seed(7), accelerator
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"fixed-batch loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])


def test_three_stages_train_only_their_modules_and_chain(workspace):
    from accelerate.utils import set_seed

    root = workspace["root"]
    # stage 1 through the command line; its initial weights are the seeded tiny build
    result = main(
        [
            "--config",
            str(CONFIGS / "tiny_stage1.yaml"),
            "--output-dir",
            str(root / "stage1"),
            "--set",
            f"data.root={workspace['data']}",
        ]
    )
    assert math.isfinite(result["loss"]) and result["step"] == 4
    set_seed(0)
    build_pipeline("tiny").save_pretrained(root / "stage1-init")
    exports = [root / "stage1-init"]
    validation = [
        "validation.every=2",
        f"validation.image={root / 'portrait.png'}",
        f"validation.audio={root / 'speech.wav'}",
        "validation.num_inference_steps=2",
    ]
    for stage in (1, 2, 3):
        if stage > 1:
            result = train(
                stage_config(workspace, stage, f"stage{stage}", *(validation if stage == 3 else []))
            )
            assert math.isfinite(result["loss"]) and result["step"] == 2
        exports.append(root / f"stage{stage}" / "pipeline")
        before, after = component_weights(exports[-2]), component_weights(exports[-1])
        declared = parameter_matcher(load_config(CONFIGS / f"tiny_stage{stage}.yaml").train.trainable)
        moved = changed(before, after)
        assert moved and all(declared(k) for k in moved), sorted(k for k in moved if not declared(k))[:5]
        assert all(
            not torch.equal(before[k], after[k])
            for k in before
            if k.endswith("conv_in.weight") and declared(k)
        )
    assert any(".attn_speed." in k for k in moved) and any(k.startswith("speed_encoder.") for k in moved)
    assert (root / "stage3" / "validation" / "step-0000002.mp4").stat().st_size > 1000
    assert list((root / "stage3" / "logs").rglob("events.out.tfevents.*"))


def test_export_loads_and_generates_a_video(workspace):
    folder = workspace["root"] / "stage3" / "pipeline"
    if not folder.is_dir():
        pytest.skip("needs test_three_stages_train_only_their_modules_and_chain")
    pipe = EmoPipeline.from_pretrained(folder)
    audio = synthetic.speech_like_audio(0.5, seed=4)
    out = pipe(
        synthetic.portrait(32),
        audio,
        sampling_rate=16_000,
        num_inference_steps=2,
        clip_length=4,
        num_motion_frames=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (13, 32, 32, 3) and np.isfinite(out.frames).all()
    assert (folder / "training_config.yaml").is_file()


def test_resume_after_a_kill_matches_an_uninterrupted_run(workspace):
    root = workspace["root"]
    settings = [
        "train.batch_size=1",
        "train.max_steps=4",
        "checkpointing.every=2",
        "checkpointing.keep=3",
        "train.use_8bit_adam=true",
        "train.ema=true",
    ]
    if not (root / "stage1" / "pipeline").is_dir():
        train(stage_config(workspace, 1, "stage1"))
    train(stage_config(workspace, 2, "straight", *settings))
    train(stage_config(workspace, 2, "killed", *settings, "train.max_steps=3"))
    killed = root / "killed"
    shutil.rmtree(killed / "checkpoint-3")  # killed after step 3, before writing its checkpoint...
    (killed / ".checkpoint-4.tmp").mkdir()  # ...or while writing the next one
    assert resolve_resume(killed, "latest") == killed / "checkpoint-2"  # mid-epoch: 4 samples, batch 1
    train(stage_config(workspace, 2, "killed", *settings), resume="latest")
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-2", "checkpoint-4"]
    for name in ("model.safetensors",):
        a, b = load_file(root / "straight" / "checkpoint-4" / name), load_file(killed / "checkpoint-4" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = component_weights(root / "straight" / "pipeline"), component_weights(killed / "pipeline")
    assert all(torch.equal(a[k], b[k]) for k in a)  # EMA weights exported by both


def test_a_time_limit_ends_the_stage_with_a_checkpoint_and_an_export_and_resuming_goes_on(workspace):
    root = workspace["root"]
    if not (root / "stage1" / "pipeline").is_dir():
        train(stage_config(workspace, 1, "stage1"))
    settings = ["train.batch_size=1", "train.max_steps=5", "checkpointing.every=100"]
    # a limit of 1e-6 minutes has passed after the first step: the stage ends there, saved and exported
    result = train(stage_config(workspace, 2, "timed", *settings, "train.max_minutes=1e-6"))
    assert result["step"] == 1 and result["export"] == root / "timed" / "pipeline"
    assert [p.name for p in list_checkpoints(root / "timed")] == ["checkpoint-1"]
    assert (root / "timed" / "pipeline" / "model_index.json").is_file()
    # resumed without the limit: on to max_steps
    result = train(stage_config(workspace, 2, "timed", *settings), resume="latest")
    assert result["step"] == 5 and [p.name for p in list_checkpoints(root / "timed")] == ["checkpoint-5"]


# ------------------------------------------------------------------------------------------------ small model parts
def test_photos_become_pseudo_clips_that_stage1_reads_with_the_videos(workspace, tmp_path):
    from training.photos import prepare_photos

    portrait = Path(__file__).resolve().parents[1] / "assets" / "examples" / "portrait.png"
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), "gray").save(blank)
    manifest = prepare_photos([portrait, blank], tmp_path / "photos", size=32, frames=6)
    assert manifest["num_clips"] == 1 and list(manifest["skipped"]) == [str(blank)]
    meta = json.loads((tmp_path / "photos" / "videos" / "photo__portrait" / "meta.json").read_text())
    boxes = np.array(meta["clips"][0]["boxes"])
    assert boxes.shape == (6, 4) and np.ptp(boxes[:, 0]) > 0.1  # the views move, and the boxes with them
    frames = [np.asarray(Image.open(p), np.float32) for p in sorted((tmp_path / "photos").rglob("0000*.jpg"))]
    assert len(frames) == 6 and frames[0].shape == (32, 32, 3)
    assert np.abs(frames[0] - frames[3]).mean() > 1  # different views of the same photo
    both = EmoDataset([workspace["data"], tmp_path / "photos"], 32, seed=0)
    videos_only = EmoDataset(workspace["data"], 32, seed=0)
    assert len(both) == len(videos_only) + 1
    sample = both[len(both) - 1]
    assert sample["pixel_values"].shape == (1, 3, 32, 32) and sample["mouth_mask"].sum() > 0


def test_mouth_weight_weighs_the_mouth_region(workspace):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    config = stage_config(workspace, 1, "mouth")
    torch.manual_seed(0)
    pipe = load_initial_pipeline(config)
    model = EmoTrainingModel(pipe)
    dataset = EmoDataset(workspace["data"], 32, seed=0)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(weight: float, mask=None) -> float:
        config.train.mouth_weight = weight
        b = dict(batch, mouth_mask=batch["mouth_mask"] if mask is None else mask)
        with torch.no_grad():
            return training_loss(
                model, pipe, scheduler, b, config, torch.Generator().manual_seed(7), Accelerator(cpu=True)
            ).item()

    plain = loss(0.0)
    assert batch["mouth_mask"].sum() > 0
    assert loss(4.0) != pytest.approx(plain, rel=1e-4)
    assert loss(4.0, torch.zeros_like(batch["mouth_mask"])) == pytest.approx(plain, rel=1e-5)


def mouth_is_loudness(workspace) -> None:
    """Each prepared video's `mouth.npy` made its loudness: a per-frame target the sound determines."""
    from pipeline.audio import load_audio
    from pipeline.metrics import loudness_envelope

    for folder in (workspace["data"] / "videos").iterdir():
        meta = json.loads((folder / "meta.json").read_text())
        audio = load_audio(folder / "audio.wav", sampling_rate=16_000, mono=True).mono
        np.save(folder / "mouth.npy", loudness_envelope(audio, 16_000, meta["num_frames"], FPS))


def test_mel_audio_encoder_learns_a_mouth_signal(workspace):
    """Pretraining on a per-frame target that the sound determines (its loudness): the unseen video's
    prediction follows it."""
    from pipeline.loading import CONFIGS as SIZES
    from training.mouth import pretrain_audio_encoder

    mouth_is_loudness(workspace)
    config = dict(SIZES["tiny"], audio_encoder={"type": "mel", "hidden_size": 16, "num_hidden_layers": 2})
    torch.manual_seed(0)
    pipe = build_pipeline(config)
    assert type(pipe.audio_encoder).__name__ == "MelAudioEncoder"
    result = pretrain_audio_encoder(
        pipe, workspace["data"], steps=80, heldout={"bob"}, window_frames=20, batch_size=4
    )
    print(result)
    assert result["heldout_r"] > 0.6
    assert not any(p.requires_grad for p in pipe.audio_encoder.parameters())


def test_a_mouth_drive_model_fits_its_head_to_the_measured_mouth_and_starts_where_its_source_was(workspace):
    """`training.small_model.with_mouth_drive`: the head learns a per-frame target the sound determines (its
    loudness) from the frozen encoder's features, on one video, and predicts it on the other; the backbone's
    new conv is zero, so the model's prediction is its source's."""
    from training.small_model import with_mouth_drive

    mouth_is_loudness(workspace)
    source = workspace["root"] / "drive_source"
    torch.manual_seed(0)
    build_pipeline("tiny").save_pretrained(source)
    encoder_before = {
        k: v.clone() for k, v in EmoPipeline.from_pretrained(source).audio_encoder.state_dict().items()
    }
    out = workspace["root"] / "drive"
    options = dict(heldout_fraction=0.5, window_frames=20, batch_size=8)
    assert with_mouth_drive(source, out, workspace["data"], head_steps=300, **options) == out
    figures = json.loads((out / "mouth_head.json").read_text())
    print(figures)
    assert figures["videos"] == 2 and figures["steps"] == 300 and figures["heldout_r"] > 0.5
    pipe = EmoPipeline.from_pretrained(out)
    assert pipe.denoising_unet.config.mouth_drive and not pipe.denoising_unet.mouth_drive_in.weight.any()
    assert pipe.audio_projection.config.mouth_head_hidden == 0  # the default head: one linear map
    assert (
        len(pipe.audio_projection.mouth_head) == 1
        and pipe.audio_projection.mouth_head[0].weight.abs().sum() > 0
    )
    for k, v in pipe.audio_encoder.state_dict().items():
        torch.testing.assert_close(v, encoder_before[k])  # the encoder stays frozen
    assert with_mouth_drive(out, workspace["root"] / "again", workspace["data"], 10) == out  # has one already


def test_a_posed_reference_model_fits_its_head_to_the_mouth_scaled_zero_to_one_and_keeps_its_backbone(
    workspace,
):
    """`training.small_model.with_posed_reference`: the head learns the measured mouth (here the loudness) scaled
    0..1 between each video's 5th and 95th percentile; the behaviour carries the amplitude; the backbone and the
    encoder are the source's."""
    from pipeline.audio import load_audio
    from pipeline.metrics import loudness_envelope
    from training.mouth import fit_mouth_head
    from training.small_model import with_posed_reference

    mouth_is_loudness(workspace)
    source = workspace["root"] / "posed_source"
    torch.manual_seed(0)
    build_pipeline("tiny").save_pretrained(source)
    out = workspace["root"] / "posed"
    options = dict(heldout_fraction=0.5, window_frames=20, batch_size=8)
    assert with_posed_reference(source, out, workspace["data"], 300, 0.07, **options) == out
    figures = json.loads((out / "mouth_head.json").read_text())
    assert figures["target"] == "normalised" and figures["videos"] == 2
    pipe, before = EmoPipeline.from_pretrained(out), EmoPipeline.from_pretrained(source)
    assert pipe.behaviour.posed_reference == 0.07 and not pipe.denoising_unet.config.mouth_drive
    for name in ("denoising_unet", "audio_encoder", "reference_net"):
        after = getattr(pipe, name).state_dict()
        for k, v in getattr(before, name).state_dict().items():
            torch.testing.assert_close(after[k], v)
    # its predictions live on the 0..1 scale of the target: low where the sound is quiet, near 1 where loud
    folder = workspace["data"] / "videos" / "alice"
    meta = json.loads((folder / "meta.json").read_text())
    audio = load_audio(folder / "audio.wav", sampling_rate=16_000, mono=True).mono
    features = pipe.audio_frame_features(audio, meta["num_frames"], FPS, "cpu")
    with torch.no_grad():
        predicted = pipe.audio_projection.mouth_opening(features)[0].numpy()
    loud = loudness_envelope(audio, 16_000, meta["num_frames"], FPS)
    quiet, peak = np.percentile(loud, [10, 90])
    assert predicted[loud <= quiet].mean() < 0.35 and predicted[loud >= peak].mean() > 0.65
    assert with_posed_reference(out, workspace["root"] / "again", workspace["data"], 10, 0.05) == out
    with pytest.raises(ValueError, match="target"):
        fit_mouth_head(pipe, workspace["data"], 1, target="percent")


@pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (apt-get install espeak-ng)")
def test_refitting_the_mouth_head_on_espeak_speech_changes_the_head_alone(workspace, tmp_path):
    """`python -m training.mouth`: a posed-reference model gets a new head of the asked width, fitted on the clips'
    mouths and on espeak-ng sentences with their phoneme openings (every tenth kept out and measured); every
    other weight stays the model's."""
    from training.mouth import main as refit_main
    from training.mouth import refit_mouth_head
    from training.small_model import with_posed_reference

    mouth_is_loudness(workspace)
    source = tmp_path / "source"
    torch.manual_seed(0)
    build_pipeline("tiny").save_pretrained(source)
    options = dict(heldout_fraction=0.5, window_frames=20, batch_size=8)
    posed = with_posed_reference(source, tmp_path / "posed", workspace["data"], 50, 0.1, **options)
    with pytest.raises(ValueError, match="not a posed-reference model"):
        refit_mouth_head(source, tmp_path / "nope", workspace["data"], 1)
    figures = refit_mouth_head(
        posed, tmp_path / "refit", workspace["data"], 300, hidden=8, speech=20, **options
    )
    print(figures)
    assert figures["speech"] == 20 and figures["videos"] == 2 and figures["hidden"] == 8
    assert figures["speech_heldout_r"] > 0.5  # the kept-out sentences' phoneme openings
    assert json.loads((tmp_path / "refit" / "mouth_head.json").read_text())[
        "speech_heldout_r"
    ] == pytest.approx(figures["speech_heldout_r"])
    before, after = EmoPipeline.from_pretrained(posed), EmoPipeline.from_pretrained(tmp_path / "refit")
    assert (
        after.audio_projection.config.mouth_head_hidden == 8 and len(after.audio_projection.mouth_head) == 3
    )
    assert after.behaviour.posed_reference == 0.1
    for name in ("denoising_unet", "audio_encoder", "reference_net", "audio_projection"):
        now = getattr(after, name).state_dict()
        for k, v in getattr(before, name).state_dict().items():
            if not k.startswith("mouth_head."):
                torch.testing.assert_close(now[k], v)
    with pytest.raises(SystemExit, match="--out is --model"):
        refit_main(["--model", str(posed), "--clips", str(workspace["data"]), "--out", str(posed)])

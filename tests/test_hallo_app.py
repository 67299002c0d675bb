"""Hallo's weights in the app: `python -m emo_app download hallo` (the hub replaced by a tiny stand-in, never the
network), the generate options of models with region audio modules, and the controls the Gradio page shows."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speech_like
from gradio_client import Client, handle_file
from hallo_release import write_tiny_release
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from skimage import data

import emo_app.download
import pipeline.identity_embedding
from emo_app.cli import main
from emo_app.download import RELEASES, default_output, download_hallo
from emo_app.generate import GenerationSettings, InputError, generate, ignored_settings, model_arguments
from emo_app.models import ModelError, describe_model, load_pipeline, resolve_model
from emo_app.ui import build_demo, model_markdown
from emo_app.video import probe_video
from pipeline import EmoPipeline, build_pipeline
from pipeline.audio import write_wav

HALLO, HALLO2 = RELEASES["hallo"].repo_id, RELEASES["hallo2"].repo_id
# files of the real repos that the converter does not read: they must stay on the hub
NOT_NEEDED = {
    "audio_separator/Kim_Vocal_2.onnx",
    "motion_module/mm_sd_v15_v2.ckpt",
    "stable-diffusion-v1-5/unet/diffusion_pytorch_model.safetensors",
    "hallo2/net_g.pth",
    "CodeFormer/codeformer.pth",
    "realesrgan/RealESRGAN_x2plus.pth",
    "facelib/detection_Resnet50_Final.pth",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """Both Hallo repos as folders in their published layout (tiny random weights, a different net.pth each),
    with stand-ins for the files the converter does not need."""
    repos = {}
    for repo_id, folder, seed in ((HALLO, "hallo", 0), (HALLO2, "hallo2", 1)):
        root = write_tiny_release(tmp_path_factory.mktemp(folder), seed=seed)
        if folder != "hallo":
            (root / "hallo").rename(root / folder)
        for name in (
            "face_analysis/models/glintr100.onnx",
            "face_analysis/models/scrfd_10g_bnkps.onnx",
            *NOT_NEEDED,
        ):
            if (folder == "hallo2" or not name.startswith("hallo2/")) and not (root / name).exists():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(b"stand-in")
        repos[repo_id] = root
    return repos


class FakeHub:
    """`snapshot_download` over `hub`: copies the files `allow_patterns` selects (huggingface_hub's own filter)
    into a snapshot folder, and records every call."""

    def __init__(self, repos: dict[str, Path], cache: Path) -> None:
        self.repos, self.cache, self.calls = repos, cache, []

    def __call__(self, repo_id: str, *, allow_patterns=None, cache_dir=None, **kwargs) -> str:
        self.calls.append(dict(repo_id=repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir))
        source = self.repos[repo_id]
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, snapshot / name)
        return str(snapshot)

    def fetched(self, repo_id: str) -> set[str]:
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
        return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


@pytest.fixture
def fake_hub(hub, tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(hub, tmp_path / "hf-cache")
    monkeypatch.setattr(emo_app.download, "snapshot_download", fake)
    return fake


def offline(repo_id, **kwargs):
    raise LocalEntryNotFoundError(
        "An error happened while trying to locate the files on the Hub and we cannot find the appropriate"
        " snapshot folder for the specified revision on the local disk.\nPlease check your internet connection."
    )


@pytest.fixture(scope="module")
def hallo_dir(hub, tmp_path_factory) -> Path:
    """Hallo's tiny release downloaded (from the stand-in hub) and converted, as `download_hallo` does it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(emo_app.download, "snapshot_download", FakeHub(hub, cache))
        folder, _ = download_hallo("hallo", tmp_path_factory.mktemp("models") / "hallo", dtype="fp32")
    return folder


@pytest.fixture(scope="module")
def hallo_pipe(hallo_dir) -> EmoPipeline:
    pipe = load_pipeline(hallo_dir, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def emo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-emo")
    torch.manual_seed(0)
    build_pipeline("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(data.astronaut()).save(folder / "portrait.png")
    write_wav(folder / "speech.wav", speech_like(0.3), 16_000)
    return folder


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every EmoPipeline call; insightface's embedding replaced by a fixed vector."""
    seen = []
    call = EmoPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(EmoPipeline, "__call__", spy)
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    monkeypatch.setattr(pipeline.identity_embedding, "face_embedding", lambda image, root=None: embedding)
    return seen


# ------------------------------------------------------------------------------------- download


@pytest.mark.parametrize("variant", ["hallo", "hallo2"])
def test_download_fetches_only_what_the_converter_reads_and_writes_a_loadable_model(
    variant, hub, fake_hub, tmp_path
):
    folder, summary = download_hallo(variant, tmp_path / variant, dtype="fp32")
    repo_id = RELEASES[variant].repo_id
    (call,) = fake_hub.calls
    assert call["repo_id"] == repo_id
    assert call["allow_patterns"][0] == f"{variant}/net.pth"
    fetched = fake_hub.fetched(repo_id)
    assert f"{variant}/net.pth" in fetched and "stable-diffusion-v1-5/unet/config.json" in fetched
    assert {"sd-vae-ft-mse/config.json", "wav2vec/wav2vec2-base-960h/config.json"} <= fetched
    assert "face_analysis/models/glintr100.onnx" in fetched
    assert not fetched & NOT_NEEDED
    assert "tensors of net.pth mapped" in summary

    pipe = EmoPipeline.from_pretrained(folder)
    assert pipe.has_region_audio and not pipe.has_speed_layers
    net = torch.load(hub[repo_id] / variant / "net.pth", weights_only=True)  # this variant's weights
    assert torch.equal(pipe.face_locator.state_dict()["conv_in.weight"], net["face_locator.conv_in.weight"])
    assert (folder / "face_analysis" / "models" / "glintr100.onnx").is_file()  # insightface's models, copied
    card = (folder / "README.md").read_text()
    assert repo_id in card and "MIT" in card and "non-commercial" in card


def test_cli_download_ends_with_the_folder_and_the_commands_that_run_it(fake_hub, tmp_path, capsys):
    out = tmp_path / "my model"
    cache = tmp_path / "hf"
    rc = main(["download", "hallo", "--variant", "hallo2", "--output", str(out), "--dtype", "fp32",
               "--cache-dir", str(cache)])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert fake_hub.calls[0]["repo_id"] == HALLO2 and fake_hub.calls[0]["cache_dir"] == str(cache)
    last = printed.out.strip().splitlines()[-1]
    assert last.startswith(f"{out} is ready: ")
    assert f"python app.py --model '{out}'" in last and f"python -m emo_app generate --model '{out}'" in last
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("variant", ["hallo", "hallo2"])
def test_offline_download_exits_2_with_one_line_naming_the_repo_and_the_offline_converter(
    variant, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(emo_app.download, "snapshot_download", offline)
    out = tmp_path / "model"
    rc = main(["download", "hallo", "--variant", variant, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert RELEASES[variant].repo_id in line and "network connection" in line
    assert "python -m pipeline.convert hallo --release DIR" in line
    assert ("--net DIR/hallo2/net.pth" in line) == (variant == "hallo2")
    assert not out.exists()


def test_download_refuses_a_folder_holding_other_files_before_downloading(fake_hub, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="is not empty and holds no model"):
        download_hallo("hallo", tmp_path)
    assert fake_hub.calls == []


def test_default_output_is_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_output("hallo2") == tmp_path / "emo" / "hallo2"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_output("hallo") == Path.home() / ".cache" / "emo" / "hallo"


def test_model_option_given_hallos_repo_or_release_folder_says_how_to_convert(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)  # must not be reached
    with pytest.raises(ModelError, match="python -m emo_app download hallo --variant hallo2"):
        resolve_model(HALLO2)
    with pytest.raises(ModelError, match=f"python -m pipeline.convert hallo --release {hub[HALLO]}"):
        resolve_model(hub[HALLO])


# ------------------------------------------------------------------------------------- generate


def test_region_weights_go_to_models_with_region_audio_only(hallo_pipe, emo_dir):
    emo = load_pipeline(emo_dir, device="cpu")
    mask = np.ones((512, 512), np.float32)
    weights = GenerationSettings(pose_weight=0.5, lip_weight=1.5)
    assert model_arguments(hallo_pipe, weights, mask) == {"pose_weight": 0.5, "lip_weight": 1.5}
    assert model_arguments(hallo_pipe, GenerationSettings(), mask) == {}  # Hallo's own face box and masks
    assert model_arguments(emo, weights, mask).keys() == {"face_mask"}
    assert ignored_settings(emo, weights) == ["pose_weight", "lip_weight"]
    assert ignored_settings(hallo_pipe, GenerationSettings(head_speed=1.0, face_weight=0.0)) == ["head_speed"]
    assert (
        ignored_settings(hallo_pipe, weights) == ignored_settings(emo, GenerationSettings(head_speed=1)) == []
    )


@pytest.mark.parametrize("value", [-0.1, 10.5])
def test_region_weight_out_of_range_is_an_input_error(value):
    with pytest.raises(InputError, match="face_weight must be a weight in"):
        GenerationSettings(face_weight=value)


def test_cli_passes_region_weights_to_hallos_model_and_warns_that_speed_does_nothing(
    hallo_dir, files, calls, tmp_path, capsys
):
    out = tmp_path / "hallo.mp4"
    rc = main(["generate", "--image", str(files / "portrait.png"), "--audio", str(files / "speech.wav"),
               "--output", str(out), "--model", str(hallo_dir), "--steps", "1", "--seed", "3",
               "--pose-weight", "0.25", "--lip-weight", "1.75", "--speed", "1.2"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: --speed has no effect: this model has no speed layers" in err
    (kwargs,) = calls
    assert (kwargs["pose_weight"], kwargs["lip_weight"]) == (0.25, 1.75) and "face_weight" not in kwargs
    assert "face_mask" not in kwargs  # the pipeline makes Hallo's face box from the landmarks
    assert probe_video(out).num_frames == 8  # 0.3 s at 25 fps


def test_cli_warns_that_region_weights_do_nothing_on_emo_models(emo_dir, files, calls, tmp_path, capsys):
    out = tmp_path / "emo.mp4"
    rc = main(["generate", "--image", str(files / "portrait.png"), "--audio", str(files / "speech.wav"),
               "--output", str(out), "--model", str(emo_dir), "--steps", "1", "--face-weight", "0.5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: --face-weight has no effect: this model has no region audio modules (Hallo's)" in err
    assert "--speed" not in err
    assert "face_weight" not in calls[0] and calls[0]["face_mask"].shape == (512, 512)


def test_hallo_model_without_insightface_is_a_one_line_input_error(hallo_pipe, files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # `import insightface` fails
    out = tmp_path / "none.mp4"
    with pytest.raises(InputError, match=r"pip install insightface onnxruntime"):
        generate(hallo_pipe, files / "portrait.png", files / "speech.wav", out, GenerationSettings(steps=1))
    assert not out.exists()


# ------------------------------------------------------------------------------------- the page


def sliders(demo) -> dict[str, bool]:
    """label -> visible, for every slider of the page."""
    return {
        c["props"]["label"]: c["props"]["visible"] for c in demo.config["components"] if c["type"] == "slider"
    }


def test_page_shows_region_weights_for_hallo_and_head_speed_for_emo(hallo_pipe, hallo_dir, emo_dir):
    hallo = sliders(build_demo(hallo_pipe, describe_model(hallo_pipe, hallo_dir)))
    assert hallo["Pose weight"] and hallo["Face weight"] and hallo["Lip weight"]
    assert not hallo["Head speed"]
    emo_pipe = load_pipeline(emo_dir, device="cpu")
    emo = sliders(build_demo(emo_pipe, describe_model(emo_pipe, emo_dir)))
    assert emo["Head speed"]
    assert not (emo["Pose weight"] or emo["Face weight"] or emo["Lip weight"])


def test_hallo_model_panel_names_the_weights_licences_and_the_gpu(hallo_pipe, hallo_dir):
    info = describe_model(hallo_pipe, hallo_dir)
    assert info["hallo"] and info["region_audio"] and not info["speed_layers"]
    text = model_markdown(info)
    assert "Hallo's trained weights" in text and "Hallo's weights MIT" in text
    assert "CreativeML OpenRAIL-M" in text and "non-commercial research" in text and "GPU" in text
    assert "no head-speed control" in text


def test_page_sends_the_region_weights_to_hallos_model(hallo_pipe, hallo_dir, files, calls):
    demo = build_demo(hallo_pipe, describe_model(hallo_pipe, hallo_dir))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        video, summary = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(files / "portrait.png")), handle_file(str(files / "speech.wav")),
            steps=1, seed=4, random_seed=False, face_weight=0.4, api_name="/generate",
        )  # fmt: skip
    finally:
        demo.close()
    (kwargs,) = calls
    assert (kwargs["pose_weight"], kwargs["face_weight"], kwargs["lip_weight"]) == (1.0, 0.4, 1.0)
    assert probe_video(video).num_frames == 8 and "Seed **4**" in summary

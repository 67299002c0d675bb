"""Which model to run, and loading it: the embedded small model, a local folder, or a Hugging Face hub id.

`resolve_model` turns what a person typed (or nothing) into a local folder; `load_pipeline` loads that
folder as an `EmoPipeline` on a device and dtype; `describe_model` says what was loaded, so that the CLI
and the UI can tell a person what the model can and cannot do.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from pipeline import EmoPipeline

# The project's embedded model: small, trained by `training/`, so that the app runs on a fresh offline machine.
logger = logging.getLogger(__name__)
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "models" / "emo-small"
MODEL_ENV = "EMO_MODEL"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the one-line message names it and says what to do."""


def resolve_model(model: str | os.PathLike | None) -> str:
    """A local folder holding the pipeline (its `model_index.json`) for `model`.

    None -> `$EMO_MODEL` if set, else the embedded folder; an existing local folder -> itself; anything
    else is taken as a hub id ("user/repo") and downloaded with `huggingface_hub.snapshot_download`
    (custom classes must be loaded from a folder, see DESIGN.md).

    Raises:
        ModelError: missing embedded model, a folder that is not a pipeline, or a hub id that could not be
            downloaded (e.g. offline).
    """
    if model is None or str(model) == "":
        model = os.environ.get(MODEL_ENV) or EMBEDDED_MODEL_DIR
        if Path(model) == EMBEDDED_MODEL_DIR and not EMBEDDED_MODEL_DIR.is_dir():
            raise ModelError(
                f"the embedded model is missing ({EMBEDDED_MODEL_DIR}): train it with the training package "
                f"or pass a model folder or hub id (--model or ${MODEL_ENV})"
            )
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return str(path)
        if any(path.glob("*/net.pth")):
            raise ModelError(
                f"model folder '{path}' looks like Hallo's pretrained_models/, not a saved EmoPipeline: convert it "
                f"with python -m pipeline.convert hallo --release {path} --output OUT, then pass --model OUT"
            )
        raise ModelError(f"model folder '{path}' has no model_index.json: it is not a saved EmoPipeline")
    if path.exists():
        raise ModelError(f"model '{model}' is a file: pass the folder that holds model_index.json")
    from huggingface_hub import snapshot_download

    from .download import RELEASES

    for variant, release in RELEASES.items():
        if str(model) == release.repo_id:
            raise ModelError(
                f"'{model}' holds Hallo's original files, not an EmoPipeline: run python -m emo_app download hallo "
                f"--variant {variant}, then pass --model with the folder it prints"
            )

    try:
        return snapshot_download(str(model))
    except Exception as error:  # offline, unknown repo, invalid id, gated repo: all mean "not available"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelError(
            f"model '{model}' is not a local folder and could not be downloaded: {reason}"
        ) from error


def model_defaults(path: str | os.PathLike, preset: str | None = None) -> dict:
    """The generation settings of the pipeline folder `path` (its `generation_defaults` over EMO's; `preset`,
    when given, over both), read from model_index.json without loading the model."""
    from pipeline.pipeline_emo import resolve_settings

    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {Path(path) / 'model_index.json'}: {error}") from error
    return resolve_settings(index.get("generation_defaults"), preset=preset)


def default_device() -> str:
    """The default device: "cuda" when a CUDA GPU is usable, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp16 on a GPU (half the memory, tensor cores), fp32 on the CPU (fp16 matmuls there are slow or missing)."""
    return "fp32" if torch.device(device).type == "cpu" else "fp16"


GIB = 1024**3


def memory_plan(free_bytes: int, weight_bytes: int, largest_component_bytes: int) -> list[str]:
    """The memory options `--low-vram` turns on for a GPU with `free_bytes` free, for a model whose weights
    take `weight_bytes` (the largest component `largest_component_bytes`), in the order of their cost:

    - "vae_slicing": always (decode a clip frame by frame: a few hundred MB less, almost free);
    - "attention_slicing": when the weights plus ~6 GiB of activations (a 512 px clip of 12 + 4 frames, two
      guidance branches) do not fit;
    - "model_cpu_offload": when the weights plus ~2 GiB do not fit, but the largest component does;
    - "sequential_cpu_offload": otherwise (one layer at a time on the GPU: slowest, smallest).
    The activation margins are estimates for the SD 1.5-sized model, not yet measured on a GPU.
    """
    plan = ["vae_slicing"]
    if free_bytes >= weight_bytes + 6 * GIB:
        return plan
    plan.append("attention_slicing")
    if free_bytes >= weight_bytes + 2 * GIB:
        return plan
    if free_bytes >= largest_component_bytes + 2 * GIB:
        return [*plan, "model_cpu_offload"]
    return [*plan, "sequential_cpu_offload"]


def _weight_bytes(pipe: EmoPipeline) -> tuple[int, int]:
    sizes = [
        sum(p.numel() * p.element_size() for p in c.parameters())
        for c in pipe.components.values()
        if isinstance(c, torch.nn.Module)
    ]
    return sum(sizes), max(sizes)


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    low_vram: bool = False,
) -> EmoPipeline:
    """Load an `EmoPipeline` from `model` (see `resolve_model`) onto `device` in `dtype`.

    Args:
        model: None (embedded / `$EMO_MODEL`), a local folder, or a hub id.
        device: "cuda", "cuda:1", "cpu", ...; default `default_device()`.
        dtype: "fp16", "bf16" or "fp32"; default `default_dtype(device)`.
        low_vram: fit the model in the GPU memory that is free (`memory_plan`: VAE slicing, attention slicing,
            model or sequential CPU offload, the cheapest combination that fits); on the CPU, slicing only.

    Raises:
        ModelError: the model is not available, the device does not exist, or the dtype is unknown.
    """
    device = device or default_device()
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ModelError(f"unknown device '{device}': use cpu, cuda or cuda:N") from error
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' is not available (no CUDA GPU found): use --device cpu")
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    path = resolve_model(model)
    try:
        pipe = EmoPipeline.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = " ".join(str(error).split())
        raise ModelError(f"could not load the model in '{path}': {reason}") from error
    if not low_vram:
        return pipe.to(torch_device)
    if torch_device.type == "cpu":  # memory is not the limit there: only the cheap slicing
        plan = ["vae_slicing", "attention_slicing"]
    else:
        free, _ = torch.cuda.mem_get_info(torch_device)
        plan = memory_plan(free, *_weight_bytes(pipe))
    logger.info("--low-vram: %s", ", ".join(plan))
    if "vae_slicing" in plan:
        pipe.vae.enable_slicing()
    if "attention_slicing" in plan:
        pipe.enable_attention_slicing()
    if "model_cpu_offload" in plan:
        pipe.enable_model_cpu_offload(device=torch_device)
    elif "sequential_cpu_offload" in plan:
        pipe.enable_sequential_cpu_offload(device=torch_device)
    else:
        pipe.to(torch_device)
    return pipe


def _model_name(path: Path) -> str:
    """The hub id "user/repo" of a hub snapshot (…/models--user--repo/snapshots/<hash>), else the folder's name."""
    for parent in (path, *path.parents):
        if parent.name.startswith("models--"):
            return parent.name.removeprefix("models--").replace("--", "/")
    return path.name


HALLO_SUMMARY = (
    "Hallo's trained weights (Fudan University; Hallo, Hallo2 and JoyHallo share the network), converted to this "
    "pipeline ({size}): the voice drives the head pose, the expression and the lips through Hallo's region audio "
    "modules (pose/face/lip weights){speed}. Needs a GPU in practice (Hallo reports "
    "about 9.8 GB of GPU memory and 1.6 s per frame at 512x512). Licences: Hallo's weights MIT, their UNets "
    "fine-tuned from Stable Diffusion 1.5 (CreativeML OpenRAIL-M, with its use restrictions); the insightface "
    "face-analysis models non-commercial research use only."
)


def describe_model(pipe: EmoPipeline, model_path: str | os.PathLike) -> dict:
    """What is loaded, for people: a dict with

    name (hub id or folder name), path, parameters (count over all networks), resolution (frame side,
    pixels), device, dtype, embedded (True for the project's small embedded model), hallo (True for Hallo's
    converted weights), speed_layers (the model reads the head speed), region_audio (the model reads the
    pose/face/lip weights) and summary (what the model is, what it can and cannot do; for Hallo's weights their
    licences).
    """
    path = Path(model_path).resolve()
    parameters = sum(
        p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    resolution = pipe.default_size
    embedded = EMBEDDED_MODEL_DIR.is_dir() and path == EMBEDDED_MODEL_DIR.resolve()
    size = f"{resolution}x{resolution} px, {parameters / 1e6:.0f} M parameters"
    hallo = pipe.has_region_audio  # Hallo's audio modules: only Hallo's weights have them
    if hallo:
        speed = (
            "; speed layers added to it take the head speed"
            if pipe.has_speed_layers
            else "; no head-speed control"
        )
        summary = HALLO_SUMMARY.format(size=size, speed=speed)
    elif embedded:
        summary = (
            f"The project's small embedded model ({size}), trained from scratch on a CPU on real talking faces: "
            "it keeps the photo's person, blurred, and opens the mouth as the voice asks (closed in silence); fine "
            "detail is lost (see its model card)."
        )
    else:
        summary = f"Model '{_model_name(path)}' ({size})."
    return {
        "name": "emo-small (embedded)" if embedded else _model_name(path),
        "path": str(path),
        "parameters": parameters,
        "resolution": resolution,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "embedded": embedded,
        "hallo": hallo,
        "speed_layers": pipe.has_speed_layers,
        "region_audio": pipe.has_region_audio,
        "summary": summary,
    }

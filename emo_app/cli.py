"""Command line: `python -m emo_app generate --image IMG --audio AUDIO --output OUT.mp4`, `python -m emo_app info`,
`python -m emo_app download hallo [--variant hallo2]` (Hallo's weights -> a model folder for --model).

Exit codes: 0 done; 2 a bad input, setting or model (one line on stderr, no traceback, no output file);
130 interrupted with Ctrl-C (no output file). The inputs are checked before the model is loaded, so a
mistake is reported in seconds. Library logs are limited to errors; the progress bar shows clip i/N and
the denoising steps. An option the loaded model has no use for (--speed without speed layers, the
--pose/face/lip-weight options without Hallo's region audio modules) is a one-line `warning:` on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Iterator
from importlib import metadata

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
VERSIONS_OF = ("torch", "diffusers", "transformers", "gradio", "mediapipe")
FLAGS = {  # GenerationSettings field -> its option, for messages
    "head_speed": "--speed",
    "pose_weight": "--pose-weight",
    "face_weight": "--face-weight",
    "lip_weight": "--lip-weight",
}


def build_parser() -> argparse.ArgumentParser:
    """The `python -m emo_app` argument parser (subcommands `generate`, `info` and `download`)."""
    parser = argparse.ArgumentParser(
        prog="python -m emo_app", description="EMO: a portrait photo and a vocal audio -> a talking video."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--model",
            help="model folder or Hugging Face hub id (default: $EMO_MODEL, else the embedded model)",
        )
        command.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
        command.add_argument(
            "--dtype",
            choices=("fp16", "bf16", "fp32"),
            help="weights precision (default: fp16 on GPU, fp32 on CPU)",
        )

    gen = commands.add_parser("generate", help="make a talking video from a portrait and an audio file")
    gen.add_argument("--image", required=True, help="portrait photo (JPEG, PNG, ...) with one visible face")
    gen.add_argument("--audio", required=True, help="speech or song (wav, mp3, m4a, flac, ogg, or a video)")
    gen.add_argument("--output", required=True, help="output video, .mp4")
    add_model_options(gen)
    gen.add_argument(
        "--preset",
        choices=("quality", "balanced", "fast"),
        help="speed preset: quality = 40 DDIM steps, balanced = 20 DPM-Solver++ steps, fast = 10 with guidance "
        "on the first 5 (default: the model's)",
    )
    gen.add_argument(
        "--steps", type=int, help="denoising steps per clip (default: the model's, EMO 40; < 20 artifacts)"
    )
    gen.add_argument(
        "--guidance-scale", type=float, help="audio guidance (default: the model's, EMO 3.5; 1 = off)"
    )
    gen.add_argument(
        "--speed",
        type=float,
        help="head motion, degrees/frame (speech 0.1-1.0, singing 1.0-1.3; default: the model's, EMO 1.0)",
    )
    for region, drives in (("pose", "head pose"), ("face", "expression"), ("lip", "lips")):
        gen.add_argument(
            f"--{region}-weight",
            type=float,
            help=f"Hallo's models: how strongly the audio drives the {drives} (0 = off, default 1 = as trained)",
        )
    gen.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    gen.add_argument("--fps", type=float, help="frames per second (default: the model's, EMO 25)")
    gen.add_argument(
        "--paste-back", action="store_true", help="paste the animated face back into the whole photo"
    )
    gen.add_argument(
        "--max-duration", type=float, default=60.0, help="longest accepted audio, seconds (default 60)"
    )
    gen.add_argument(
        "--low-vram",
        action="store_true",
        help="offload models to the CPU between uses, slice attention (GPU)",
    )

    info = commands.add_parser("info", help="print the model, device, dtype and library versions")
    add_model_options(info)

    download = commands.add_parser(
        "download",
        help="download published weights and convert them into a model folder for --model (needs a network)",
    )
    download.add_argument("source", choices=("hallo",), help="whose weights: hallo (Fudan's Hallo, MIT)")
    download.add_argument(
        "--variant",
        choices=("hallo", "hallo2"),
        default="hallo",
        help="hallo (fudan-generative-ai/hallo, default) or hallo2 (fudan-generative-ai/hallo2); about 6 GB",
    )
    download.add_argument("--output", help="the model folder to write (default: ~/.cache/emo/<variant>)")
    download.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="stored precision (default fp16)"
    )
    download.add_argument(
        "--cache-dir",
        help="Hugging Face cache for the downloaded files (default: huggingface_hub's, $HF_HOME)",
    )
    return parser


def _quiet_library_logs() -> None:
    """Only errors from the libraries' loggers, and no loading bars: a CLI's stderr is for its user."""
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null while MediaPipe starts (its C++ code logs there, outside Python);
    Python warnings raised meanwhile are printed afterwards as `warning: ...` lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .generate import GenerationSettings, ignored_settings, prepare_inputs, render
    from .models import load_pipeline, model_defaults, resolve_model

    settings = GenerationSettings(
        preset=args.preset,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        head_speed=args.speed,
        seed=args.seed,
        fps=args.fps,
        paste_back=args.paste_back,
        max_duration=args.max_duration,
        pose_weight=args.pose_weight,
        face_weight=args.face_weight,
        lip_weight=args.lip_weight,
    )
    given = settings
    path = resolve_model(args.model)
    settings = settings.with_model_defaults(model_defaults(path))
    with _native_stderr_silenced():
        inputs = prepare_inputs(args.image, args.audio, settings, limit_hint="--max-duration")
    pipe = load_pipeline(path, device=args.device, dtype=args.dtype, low_vram=args.low_vram)
    pipe.set_progress_bar_config(disable=True)
    for name in ignored_settings(pipe, given):
        lacks = "speed layers" if name == "head_speed" else "region audio modules (Hallo's)"
        print(f"warning: {FLAGS[name]} has no effect: this model has no {lacks}", file=sys.stderr)
    with tqdm(total=inputs.num_clips * settings.steps, unit="step", dynamic_ncols=True) as bar:

        def progress(clip: int, num_clips: int, step: int, steps: int) -> None:
            bar.set_description(f"clip {clip + 1}/{num_clips}", refresh=False)
            bar.update()

        result = render(pipe, inputs, args.output, settings, progress=progress)
    print(
        f"{result.path}: {result.num_frames} frames ({result.duration_s:.2f} s at {settings.fps:g} fps), "
        f"seed {result.seed}, made in {result.seconds:.1f} s"
    )
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _info(args: argparse.Namespace) -> int:
    from .models import (
        ModelError,
        default_device,
        default_dtype,
        describe_model,
        load_pipeline,
        resolve_model,
    )

    print(f"python: {platform.python_version()} ({platform.platform()})")
    for package in VERSIONS_OF:
        print(f"{package}: {_version(package)}")
    import torch

    device = args.device or default_device()
    if device.startswith("cuda") and torch.cuda.is_available():
        print(f"device: {device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})")
    else:
        print(f"device: {device} ({torch.get_num_threads()} CPU threads)")
    print(f"dtype: {args.dtype or default_dtype(device)}")
    try:
        path = resolve_model(args.model)
        described = describe_model(load_pipeline(path, device=args.device, dtype=args.dtype), path)
    except ModelError as error:
        print(f"model: not available ({error})")
        return 0
    print(f"model: {described['name']} ({described['path']})")
    print(f"  {described['summary']}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from .download import RELEASES, download_hallo

    print(
        f"downloading {RELEASES[args.variant].repo_id} (net.pth, VAE, wav2vec2, insightface models; files already "
        "in the Hugging Face cache are reused), then converting it",
        file=sys.stderr,
    )
    folder, summary = download_hallo(args.variant, args.output, dtype=args.dtype, cache_dir=args.cache_dir)
    print(f"{folder}: {summary}")
    model = shlex.quote(str(folder))
    print(
        f"{folder} is ready: python app.py --model {model}  or  python -m emo_app generate --model {model} "
        "--image PORTRAIT --audio VOICE --output talking.mp4"
    )
    return 0


COMMANDS = {"generate": _generate, "info": _info, "download": _download}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    _quiet_library_logs()
    from .generate import InputError
    from .models import ModelError

    try:
        return COMMANDS[args.command](args)
    except (InputError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        done = (
            "files downloaded so far are kept for the next run"
            if args.command == "download"
            else "no video written"
        )
        print(f"interrupted: {done}", file=sys.stderr)
        return EXIT_INTERRUPTED

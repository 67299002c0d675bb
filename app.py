"""EMO's Gradio app: `python app.py`, locally or as a Hugging Face Space. The page is built in `emo_app.ui`.

Every flag has an environment variable, for Spaces (set as a variable in the Space's settings) and
containers: EMO_MODEL, EMO_DEVICE, EMO_DTYPE, EMO_LOW_VRAM=1, GRADIO_SERVER_NAME, GRADIO_SERVER_PORT.
"""

from __future__ import annotations

import argparse
import os
import sys

# Longest generation a ZeroGPU Space may hold its GPU for, seconds.
GPU_SECONDS = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Serve EMO's web app: a portrait and a voice -> a talking video.",
    )
    parser.add_argument("--model", default=env("EMO_MODEL"),
                        help="model folder or Hugging Face hub id (env EMO_MODEL); default: the embedded small model")  # fmt: skip
    parser.add_argument("--device", default=env("EMO_DEVICE"),
                        help="cpu, cuda, cuda:N (env EMO_DEVICE); default: cuda when available")  # fmt: skip
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=env("EMO_DTYPE"),
                        help="weights' precision (env EMO_DTYPE); default: fp16 on a GPU, fp32 on the CPU")  # fmt: skip
    parser.add_argument("--low-vram", action="store_true", default=env("EMO_LOW_VRAM", "") not in ("", "0"),
                        help="offload idle components to the CPU and slice attention (env EMO_LOW_VRAM=1)")  # fmt: skip
    parser.add_argument("--share", action="store_true", help="also serve on a public *.gradio.live link")
    parser.add_argument("--server-name", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1; 0.0.0.0: every interface)")  # fmt: skip
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("GRADIO_SERVER_PORT", "7860")),
        help="port (env GRADIO_SERVER_PORT; default 7860)",
    )
    return parser.parse_args(argv)


def gpu_decorator():
    """`spaces.GPU` on Hugging Face Spaces (ZeroGPU attaches a GPU while a generation runs), else identity.

    Called before torch is imported: ZeroGPU must patch CUDA before anything initialises it.
    """
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=GPU_SECONDS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_on_device = gpu_decorator()

    from emo_app.models import ModelError, describe_model, load_pipeline, resolve_model
    from emo_app.ui import CSS, THEME, build_demo

    try:
        path = resolve_model(args.model)
        pipe = load_pipeline(path, device=args.device, dtype=args.dtype, low_vram=args.low_vram)
    except ModelError as error:
        sys.exit(f"app.py: {error}")
    demo = build_demo(pipe, describe_model(pipe, path), run_on_device=run_on_device)
    demo.launch(server_name=args.server_name, server_port=args.port, share=args.share, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()

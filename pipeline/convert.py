"""Convert released weights of other projects into EmoPipeline folders, offline.

    python -m pipeline.convert hallo --release pretrained_models --output models/hallo [--dtype fp16]
    python -m pipeline.convert hallo --release pretrained_models --net hallo2/net.pth --output models/hallo2

The output loads with `EmoPipeline.from_pretrained(OUTPUT)` and runs in the CLI and app with `--model OUTPUT`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    hallo = sub.add_parser("hallo", help="Hallo / Hallo2 / JoyHallo (net.pth) -> EmoPipeline folder")
    hallo.add_argument(
        "--release", help="Hallo's pretrained_models/ folder (hallo/net.pth, stable-diffusion-v1-5/unet, ...)"
    )
    hallo.add_argument("--output", required=True, help="the EmoPipeline folder to write")
    hallo.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    for name, what in (
        ("net", "net.pth (Hallo2's hallo2/net.pth, JoyHallo's joyhallo/net.pth)"),
        ("unet", "SD 1.5's unet/ folder (config.json; its weights fill what net.pth lacks)"),
        ("vae", "the sd-vae-ft-mse folder"),
        ("motion-module", "mm_sd_v15_v2.ckpt"),
        ("wav2vec", "the wav2vec2 folder (JoyHallo: chinese-wav2vec2-base)"),
        ("face-analysis", "insightface's face_analysis/ folder (copied, for face embeddings)"),
    ):
        hallo.add_argument(f"--{name}", help=f"override: {what}")
    args = parser.parse_args(argv)

    from .hallo import ConversionError, convert_hallo

    try:
        report = convert_hallo(
            args.release, args.output, net=args.net, unet=args.unet, vae=args.vae,
            motion_module=args.motion_module, wav2vec=args.wav2vec, face_analysis=args.face_analysis,
            dtype=args.dtype,
        )  # fmt: skip
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.output}: {report.summary()}")
    for reason in sorted(set(report.unused.values())):
        count = sum(1 for r in report.unused.values() if r == reason)
        print(f"  unused ({count}): {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

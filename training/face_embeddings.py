"""Face embeddings of prepared videos, for models with identity tokens (converted Hallo models).

    python -m training.face_embeddings --data data/prepared [--face-analysis pretrained_models/face_analysis]

Per video of a `training.prepare` folder: insightface's raw 512-d embedding of the largest face in the first
frame of its first clip (`pipeline.identity_embedding.face_embedding`, what the pipeline computes for a
portrait; Hallo's data preparation also embeds one frame per video) -> `videos/NAME/face_embedding.npy`.
The datasets then give every sample its video's embedding, and the trainer projects it to identity tokens.
Without these files a Hallo model trains on the null identity (the projection of a zero embedding).
Needs insightface and onnxruntime (optional dependencies) and Hallo's `face_analysis/models/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .data import FACE_EMBEDDING_FILE

logger = logging.getLogger("training.face_embeddings")


def write_face_embeddings(
    root: str | Path, model_root: str | Path | None = None, overwrite: bool = False
) -> dict[str, Path]:
    """`root/videos/NAME/face_embedding.npy` (float32 (512,)) for every video of the manifest -> {name: file}.

    Existing files are kept unless `overwrite`. model_root: insightface's folder holding `models/`.
    """
    from pipeline.identity_embedding import face_embedding

    root = Path(root)
    written = {}
    for video in json.loads((root / "manifest.json").read_text())["videos"]:
        folder = root / "videos" / video["name"]
        target = folder / FACE_EMBEDDING_FILE
        if target.is_file() and not overwrite:
            written[video["name"]] = target
            continue
        meta = json.loads((folder / "meta.json").read_text())
        first = folder / "clips" / f"{meta['clips'][0]['index']:03d}" / f"00000.{meta['image_format']}"
        embedding = np.asarray(face_embedding(Image.open(first).convert("RGB"), model_root), np.float32)
        tmp = folder / f".{FACE_EMBEDDING_FILE}.tmp.npy"
        np.save(tmp, embedding.reshape(-1))
        os.replace(tmp, target)
        written[video["name"]] = target
        logger.info("%s: face embedding from %s", video["name"], first.name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.face_embeddings", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="a `training.prepare` output folder")
    parser.add_argument(
        "--face-analysis",
        default=None,
        help="insightface's folder holding models/ (Hallo's pretrained_models/face_analysis, or a converted "
        "Hallo model's face_analysis/)",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute existing embeddings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    written = write_face_embeddings(args.data, args.face_analysis, args.overwrite)
    logger.info("%d videos have a face embedding", len(written))


if __name__ == "__main__":
    main()

"""The portrait's face-recognition embedding, as Hallo computes it (insightface, optional dependency).

Hallo's identity tokens are a projection of a 512-d ArcFace embedding of the reference portrait:
insightface's ``FaceAnalysis`` over the models in Hallo's ``pretrained_models/face_analysis/models/``
(detector ``scrfd_10g_bnkps.onnx``, recogniser ``glintr100.onnx``, plus ``1k3d68.onnx``,
``2d106det.onnx`` and ``genderage.onnx``, which it also loads), the largest detected face, and its raw
``embedding`` (not the L2-normalised ``normed_embedding``).

insightface and onnxruntime are imported only when :func:`face_embedding` runs, so importing this module
is cheap and works without them.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .face import to_rgb_array

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512
# Hallo's configs/inference/default.yaml: face_analysis.model_path (relative to the working directory).
DEFAULT_MODEL_ROOT = Path("pretrained_models/face_analysis")
MODEL_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx")

INSIGHTFACE_MISSING = (
    "face_embedding needs insightface (pip install insightface onnxruntime) and Hallo's face-analysis models "
    f"in <model_root>/models/ ({', '.join(MODEL_FILES)}); or pass face_embedding= (a 512-d embedding) yourself."
)


def _face_analysis_class() -> Any:
    """insightface's ``FaceAnalysis`` class; ImportError with the install line when it is missing."""
    try:
        from insightface.app import FaceAnalysis
    except ImportError as err:
        raise ImportError(INSIGHTFACE_MISSING) from err
    return FaceAnalysis


@functools.lru_cache(maxsize=2)
def _analyser(root: str) -> Any:
    """A prepared ``FaceAnalysis`` over ``<root>/models/*.onnx`` (kept: loading takes seconds)."""
    face_analysis = _face_analysis_class()
    analyser = face_analysis(
        name="", root=root, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )  # name "" -> the models are read from <root>/models/ itself
    analyser.prepare(ctx_id=0, det_size=(640, 640))
    return analyser


def _bbox_area(face: Any) -> float:
    x0, y0, x1, y1 = (float(v) for v in face["bbox"][:4])
    return (x1 - x0) * (y1 - y0)


def face_embedding(
    image: Image.Image | np.ndarray | str | Path, model_root: str | Path | None = None
) -> np.ndarray:
    """insightface's raw 512-d embedding of the largest face in ``image`` (Hallo's identity input).

    Args:
        image: the portrait (PIL image, RGB uint8 array or path); insightface gets it as BGR.
        model_root: the folder holding ``models/`` with the onnx files, laid out like Hallo's
            ``pretrained_models/face_analysis`` (the default, relative to the working directory); a
            converted Hallo model keeps a copy in its ``face_analysis/`` folder.

    Returns:
        float32 array (512,). With no face found: zeros and a logged warning, as Hallo does (the model
        then gets the identity tokens of a zero embedding).

    Raises:
        ImportError: insightface (or onnxruntime) is not installed.
        FileNotFoundError: ``<model_root>/models/`` has no onnx files, or no recognition model.
    """
    _face_analysis_class()  # fail on a missing package before anything else
    root = Path(model_root) if model_root is not None else DEFAULT_MODEL_ROOT
    models = root.expanduser() / "models"
    if not models.is_dir() or not any(models.glob("*.onnx")):
        raise FileNotFoundError(
            f"No insightface models in {models}: put Hallo's face_analysis/models/ ({', '.join(MODEL_FILES)}) "
            "there, pass model_root=, or pass face_embedding= yourself."
        )
    analyser = _analyser(str(root.expanduser().resolve()))
    bgr = np.ascontiguousarray(to_rgb_array(image)[:, :, ::-1])
    faces = analyser.get(bgr)
    if not faces:
        logger.warning(
            "No face found by insightface in the portrait; using a zero identity embedding (as Hallo)."
        )
        return np.zeros(EMBEDDING_DIM, dtype=np.float32)
    largest = max(faces, key=_bbox_area)  # the first of equal-sized faces, as Hallo's stable sort
    embedding = largest.get("embedding") if isinstance(largest, dict) else getattr(largest, "embedding", None)
    if embedding is None:
        raise FileNotFoundError(
            f"No face-recognition model in {models}: it needs glintr100.onnx (Hallo's recogniser), "
            "or pass face_embedding= yourself."
        )
    embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if embedding.shape != (EMBEDDING_DIM,):
        raise ValueError(
            f"the recognition model in {models} gives {embedding.size} values, Hallo needs {EMBEDDING_DIM}"
        )
    return embedding

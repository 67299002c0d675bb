"""Hallo's face regions of a portrait: the face-locator box and the full/face/lip audio-attention masks.

Hallo's audio modules weigh three cross-attention branches by soft region masks: ``full`` (the
background and head pose: everything outside the face), ``face`` (the face without the mouth) and
``lip`` (the mouth). Its face locator reads a hard box around the face. All four come from MediaPipe
face landmarks of the portrait, by the rules of Hallo's ``hallo/utils/util.py`` (reimplemented here):

1. Face box: the bounding box of 36 silhouette landmarks, rounded to whole pixels, scaled about its
   centre by ``face_expand_ratio`` (1.2) with Hallo's integer arithmetic, shifted back inside the
   image, and filled with 255 in an H x W uint8 image (:func:`expand_box`, :func:`box_mask`).
2. Lip box: the same with 20 lip-contour landmarks and ratio 2.0.
3. Each box image is resized to 64 x 64, Gaussian-blurred (51 x 51 face, 31 x 31 lip) and min-max
   stretched to 0..255 (:func:`blur_region`).
4. ``full`` = the inverted blurred face, ``face`` = blurred face minus blurred lip (saturating at 0),
   ``lip`` = the blurred lip (:func:`split_regions`).

:func:`level_masks` turns the three 64 x 64 masks into the per-resolution weights the UNet uses.
Landmarks come from :func:`pipeline.face.face_landmarks` (legacy FaceMesh, 468 points); Hallo uses the
Tasks FaceLandmarker (478 points, the first 468 in the same topology), so boxes can differ by a few pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .face import NoFaceError, face_landmarks, to_rgb_array

# MediaPipe face-mesh indices of the face outline, forehead round to the chin and back (Hallo's
# `silhouette_ids`), and of the outer lip contour (Hallo's `lip_ids`).
SILHOUETTE_LANDMARKS: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288,
    397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136,
    172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
LIP_LANDMARKS: tuple[int, ...] = (
    61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291,
    146, 91, 181, 84, 17, 314, 405, 321, 375,
)  # fmt: skip

REGION_NAMES = ("full", "face", "lip")  # the order of the last axis of level_masks' tensors
MASK_SIZE = 64  # side of the soft masks, pixels (Hallo writes them as 64 x 64 PNGs)
FACE_BLUR_KERNEL = 51  # Gaussian kernel side for the face mask, pixels of the 64 x 64 mask
LIP_BLUR_KERNEL = 31  # the same for the lip mask
FACE_EXPAND_RATIO = 1.2  # Hallo's configs/inference/default.yaml: face_expand_ratio
LIP_EXPAND_RATIO = 2.0  # Hallo's get_lip_mask default (get_mask passes no ratio)

NO_FACE_FOR_REGIONS = (
    "No face landmarks found in the portrait, so Hallo's region masks cannot be computed: use a "
    "front-facing portrait, or pass region_masks= ({'full', 'face', 'lip'}) and face_mask= yourself."
)

Rect = tuple[int, int, int, int]  # (x0, y0, x1, y1) whole pixels, x1/y1 exclusive


@dataclass(frozen=True, eq=False)
class RegionMasks:
    """Hallo's masks of one portrait.

    Attributes:
        face_box: (H, W) uint8, 255 inside the expanded face box and 0 elsewhere, at the portrait's
            resolution: the face locator's input (Hallo reads it as RGB and resizes it to the model size).
        full: (64, 64) uint8, the background/pose region (high away from the face).
        face: (64, 64) uint8, the face without the mouth.
        lip: (64, 64) uint8, the mouth.
        face_rect: the face box (x0, y0, x1, y1) in pixels, x1/y1 exclusive.
        lip_rect: the lip box, likewise.
    """

    face_box: np.ndarray
    full: np.ndarray
    face: np.ndarray
    lip: np.ndarray
    face_rect: Rect
    lip_rect: Rect

    def as_dict(self) -> dict[str, np.ndarray]:
        """{"full", "face", "lip"}: the ``region_masks`` argument of the pipeline and of :func:`level_masks`."""
        return {"full": self.full, "face": self.face, "lip": self.lip}


# --------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------


def landmark_box(landmarks: np.ndarray, indices: Sequence[int]) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the chosen landmarks, each side rounded to a whole pixel.

    Rounding is NumPy's (halves to even), as Hallo's. ``landmarks`` is (N, 2+) in pixels; only x and
    y are read.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] < 2 or points.shape[0] <= max(indices):
        raise ValueError(
            f"landmarks must be (N > {max(indices)}, 2) pixel coordinates, got shape {points.shape}"
        )
    chosen = points[list(indices), :2]
    x0, y0 = np.round(chosen.min(axis=0))
    x1, y1 = np.round(chosen.max(axis=0))
    return float(x0), float(y0), float(x1), float(y1)


def _expand_span(low: float, high: float, ratio: float, limit: int) -> tuple[int, int]:
    """One axis of :func:`expand_box`: scale [low, high] about its floored midpoint, keep it in [0, limit]."""
    middle = (low + high) // 2
    half = ((high - low) * ratio) // 2
    low, high = middle - half, middle + half
    if low < 0:  # past the start: slide the span forwards
        high -= low
        low = 0.0
    if high > limit:  # past the end: slide it back
        low -= high - limit
        high = float(limit)
    # A span longer than the image is now negative at the start; Hallo slices with that negative start
    # (which wraps around to a thin strip at the end); clamping keeps the whole image instead.
    return round(max(low, 0.0)), round(high)


def expand_box(box: Sequence[float], ratio: float, width: int, height: int) -> Rect:
    """Hallo's box expansion: ``box`` (x0, y0, x1, y1) scaled by ``ratio`` and kept inside the image.

    Per axis, with floor division on floats: the centre is ``(x0 + x1) // 2``, the half side is
    ``((x1 - x0) * ratio) // 2``, and the box is centre -/+ half side. A box past the image start is
    slid forwards to start at 0, then one past the end is slid back to end at the image side (the
    size is kept). A box larger than the image is clamped to it (see :func:`_expand_span`).

    Args:
        box: (x0, y0, x1, y1) in pixels, usually whole numbers from :func:`landmark_box`.
        ratio: scale factor > 0 (Hallo: 1.2 for the face, 2.0 for the lips).
        width, height: image size in pixels.

    Returns:
        (x0, y0, x1, y1) whole pixels with 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        (x1, y1 exclusive).
    """
    if ratio <= 0:
        raise ValueError(f"expand ratio must be > 0, got {ratio}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {tuple(box)}")
    left, right = _expand_span(x0, x1, ratio, width)
    top, bottom = _expand_span(y0, y1, ratio, height)
    return left, top, right, bottom


def box_mask(rect: Rect, width: int, height: int) -> np.ndarray:
    """(height, width) uint8 image: 255 inside ``rect`` (x0, y0, x1, y1; x1/y1 exclusive), 0 elsewhere."""
    x0, y0, x1, y1 = rect
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 255
    return mask


# --------------------------------------------------------------------------------------------------
# Soft masks
# --------------------------------------------------------------------------------------------------


def blur_region(mask: np.ndarray, kernel: int, size: int = MASK_SIZE) -> np.ndarray:
    """A hard box mask made soft, as Hallo's ``blur_mask``: (size, size) uint8 spanning 0..255.

    Steps: ``cv2.resize`` to ``size`` x ``size`` (bilinear, OpenCV's default), ``cv2.GaussianBlur``
    with a ``kernel`` x ``kernel`` window and sigma derived from it (sigma 0), then ``cv2.normalize``
    min-max to 0..255. A constant image (no box, or a box covering everything) comes out all 0, which is
    what OpenCV's min-max normalisation does with a zero range.

    Args:
        mask: (H, W) uint8 image, 0 and 255.
        kernel: odd Gaussian window side in pixels (Hallo: 51 face, 31 lips).
        size: output side in pixels (Hallo: 64).
    """
    import cv2

    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty (H, W) uint8 array, got {mask.dtype} {mask.shape}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number of pixels, got {kernel}")
    resized = cv2.resize(mask, (size, size))
    blurred = cv2.GaussianBlur(resized, (kernel, kernel), 0)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


def split_regions(
    blurred_face: np.ndarray, blurred_lip: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(full, face, lip) uint8 masks from the blurred face and lip masks, as Hallo's inference writes them.

    - full: ``uint8((1 - face / 255) * 255)``: the inverted face mask, computed in floats and truncated
      as Hallo's ``get_background_mask`` does; it is ``255 - face`` or one less (for 50 of the 256 values,
      e.g. face 43 -> 211, where floating point lands just under the integer).
    - face: ``cv2.subtract(face, lip)``: saturates at 0 where the lip mask is the brighter one.
    - lip: the blurred lip mask, unchanged.
    """
    import cv2

    face = np.asarray(blurred_face)
    lip = np.asarray(blurred_lip)
    if face.dtype != np.uint8 or lip.dtype != np.uint8 or face.shape != lip.shape or face.ndim != 2:
        raise ValueError(
            f"blurred masks must be uint8 (H, W) arrays of one shape, got {face.dtype} {face.shape} "
            f"and {lip.dtype} {lip.shape}"
        )
    full = ((1.0 - face / 255.0) * 255).astype(np.uint8)
    return full, cv2.subtract(face, lip), lip.copy()


def region_masks_from_landmarks(
    landmarks: np.ndarray,
    width: int,
    height: int,
    face_expand_ratio: float = FACE_EXPAND_RATIO,
    lip_expand_ratio: float = LIP_EXPAND_RATIO,
) -> RegionMasks:
    """Hallo's region masks from face-mesh landmarks (N >= 468, 2) in pixels of a ``width`` x ``height`` image."""
    face_rect = expand_box(landmark_box(landmarks, SILHOUETTE_LANDMARKS), face_expand_ratio, width, height)
    lip_rect = expand_box(landmark_box(landmarks, LIP_LANDMARKS), lip_expand_ratio, width, height)
    face_box = box_mask(face_rect, width, height)
    blurred_face = blur_region(face_box, FACE_BLUR_KERNEL)
    blurred_lip = blur_region(box_mask(lip_rect, width, height), LIP_BLUR_KERNEL)
    full, face, lip = split_regions(blurred_face, blurred_lip)
    return RegionMasks(face_box, full, face, lip, face_rect, lip_rect)


def hallo_region_masks(
    image: Image.Image | np.ndarray | str | Path,
    face_expand_ratio: float = FACE_EXPAND_RATIO,
    lip_expand_ratio: float = LIP_EXPAND_RATIO,
) -> RegionMasks:
    """Hallo's face-locator box and full/face/lip masks of a portrait, from its face landmarks.

    Args:
        image: the portrait at its original resolution (PIL image, RGB uint8 array or path); the face box
            has its size.
        face_expand_ratio: scale of the face box about its centre (Hallo's default config: 1.2).
        lip_expand_ratio: scale of the lip box (Hallo: 2.0).

    Raises:
        NoFaceError: FaceMesh found no face. Hallo's own mask code has no fallback (it fails on an
            image without exactly one face), so the caller decides: pass ``region_masks=`` and
            ``face_mask=``, or use another portrait. With several faces, FaceMesh's most prominent is used.
    """
    rgb = to_rgb_array(image)
    landmarks = face_landmarks(rgb)
    if landmarks is None:
        raise NoFaceError(NO_FACE_FOR_REGIONS)
    height, width = rgb.shape[:2]
    return region_masks_from_landmarks(landmarks, width, height, face_expand_ratio, lip_expand_ratio)


# --------------------------------------------------------------------------------------------------
# Per-level weights
# --------------------------------------------------------------------------------------------------


def _as_grey_image(name: str, mask: Any) -> Image.Image:
    """A region mask as a PIL "L" image; see :func:`level_masks` for the accepted inputs."""
    if isinstance(mask, Image.Image):
        return mask if mask.mode == "L" else mask.convert("L")
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"region mask '{name}' must be a PIL image or an array, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] not in (3, 4)) or 0 in mask.shape:
        raise ValueError(
            f"region mask '{name}' must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {mask.shape}"
        )
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError(
                f"region mask '{name}' is float, so it must lie in [0, 1]; got {mask.min()}..{mask.max()}"
            )
        mask = np.round(mask.astype(np.float64) * 255).astype(np.uint8)
    elif mask.dtype.kind in "iu":
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError(
                f"region mask '{name}' must be 8-bit (0..255), got values {mask.min()}..{mask.max()}"
            )
        mask = mask.astype(np.uint8)
    else:
        raise ValueError(
            f"region mask '{name}' must be uint8, bool or float in [0, 1], got dtype {mask.dtype}"
        )
    image = Image.fromarray(np.ascontiguousarray(mask))
    return image if image.mode == "L" else image.convert("L")


def level_masks(
    masks: Mapping[str, Image.Image | np.ndarray | torch.Tensor], sizes: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], torch.Tensor]:
    """Region weights of every UNet resolution level, as Hallo's image processor builds them.

    Each of ``full``, ``face`` and ``lip`` is resized to (h, w) with PIL's bilinear filter (what
    torchvision's ``Resize`` does to a PIL image), divided by 255 in float32 (``ToTensor``), flattened
    row-major, and the three are stacked on the last axis.

    Args:
        masks: {"full", "face", "lip"} masks of any size (they need not match). Accepted: PIL images
            ("L" as is, other modes through ``convert("L")``), and arrays or tensors (H, W) or (H, W, 1)
            of uint8, of integers in 0..255, of bools (True = 255) or of floats in [0, 1] (times 255,
            rounded to the nearest integer); (H, W, 3) and (H, W, 4) arrays are colour images, converted
            to grey as PIL's ``convert("L")`` does.
        sizes: the (h, w) levels, e.g. [(64, 64), (32, 32), (16, 16), (8, 8)] for a 512 x 512 portrait.

    Returns:
        {(h, w): float32 tensor (1, h * w, 3)} with values in [0, 1], last axis in the order full, face, lip.
    """
    missing = [name for name in REGION_NAMES if name not in masks]
    if missing:
        raise ValueError(
            f"region masks need the keys 'full', 'face', 'lip'; missing {', '.join(map(repr, missing))}"
        )
    unknown = sorted(set(masks) - set(REGION_NAMES))
    if unknown:
        raise ValueError(
            f"region masks take only the keys 'full', 'face', 'lip'; got also {', '.join(map(repr, unknown))}"
        )
    greys = {name: _as_grey_image(name, masks[name]) for name in REGION_NAMES}
    levels: dict[tuple[int, int], torch.Tensor] = {}
    for size in sizes:
        if len(size) != 2 or any(not isinstance(v, int | np.integer) or v < 1 for v in size):
            raise ValueError(f"each size must be (h, w) with positive integers, got {size!r}")
        h, w = int(size[0]), int(size[1])
        planes = [
            torch.from_numpy(np.array(greys[name].resize((w, h), Image.BILINEAR)))
            .float()
            .div(255)
            .reshape(-1)
            for name in REGION_NAMES
        ]
        levels[(h, w)] = torch.stack(planes, dim=-1)[None]
    return levels

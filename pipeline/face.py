"""Faces: detection, square crops, the face-locator mask, pasting back, head pose and head speed.

Used by the pipeline (default face mask), the app and CLI (crop a user's photo, paste the result back)
and training data preparation (per-frame boxes, head pose, head rotation speed).

MediaPipe and OpenCV are imported inside the functions that need them, so importing this module is
cheap. Every image argument accepts what :func:`to_rgb_array` accepts (a PIL image, an array or a
path); all coordinates are pixels of the image they refer to, with x to the right and y down.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

NO_FACE_MESSAGE = (
    "No face found in the portrait: use a well-lit, front-facing photo where the face fills at least "
    "~10% of the frame."
)

# Longest image side, in pixels, that the MediaPipe models see: smaller images are upscaled (tiny
# photos are detected more reliably), larger ones downscaled (a 4000 px photo costs no more than a
# 1024 px one). The models resize to 128-192 px internally, so nothing is lost.
_MIN_DETECTION_SIDE = 256
_MAX_DETECTION_SIDE = 1024
_MIN_DETECTION_CONFIDENCE = 0.5
# Extra FaceMesh passes on a video's first frame, so that tracking has settled when the video starts.
_TRACKING_WARMUP_PASSES = 5

# Generic 3D head model for the pose: MediaPipe FaceMesh landmark index -> (x, y, z) in millimetres,
# x to the subject's left (the image's right), y down, z away from the camera, origin between the
# inner eye corners; values from average adult anthropometry. Only landmarks on the rigid part of the
# head (eye corners, nose): the chin and mouth corners move when a person talks or smiles, and with
# them in the fit an 8 px jaw drop on a 100 px face reads as a ~10 degree pitch change.
_POSE_MODEL_POINTS: dict[int, tuple[float, float, float]] = {
    33: (-45.0, -2.0, 10.0),  # outer corner of the eye on the image's left
    133: (-16.5, 0.0, 0.0),  # inner corner of that eye
    362: (16.5, 0.0, 0.0),  # inner corner of the eye on the image's right
    263: (45.0, -2.0, 10.0),  # outer corner of that eye
    168: (0.0, -4.0, -15.0),  # nasal bridge between the eyes
    1: (0.0, 40.0, -33.0),  # nose tip
    2: (0.0, 45.0, -18.0),  # base of the nose (subnasale)
    98: (-18.0, 39.0, -10.0),  # nose wing on the image's left
    327: (18.0, 39.0, -10.0),  # nose wing on the image's right
}


class NoFaceError(ValueError):
    """No face was found in an image that needs one (e.g. the reference portrait)."""

    def __init__(self, message: str = NO_FACE_MESSAGE) -> None:
        super().__init__(message)


# --------------------------------------------------------------------------------------------------
# Boxes and masks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box, in pixels of the image it was detected in.

    The box may extend past the image borders (MediaPipe boxes do when the face touches them);
    :meth:`clipped` cuts it to the image. ``score`` is the detector's confidence in [0, 1].
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def width(self) -> float:
        """Width in pixels."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """Height in pixels."""
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        """Centre (cx, cy) in pixels."""
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float) -> FaceBox:
        """The box with width and height multiplied by ``factor``, about its centre."""
        cx, cy = self.center
        half_w, half_h = self.width * factor / 2, self.height * factor / 2
        return FaceBox(cx - half_w, cy - half_h, cx + half_w, cy + half_h, self.score)

    def clipped(self, width: int, height: int) -> FaceBox:
        """The box cut to an image of ``width`` x ``height`` pixels."""
        return FaceBox(
            min(max(self.x0, 0.0), width),
            min(max(self.y0, 0.0), height),
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            self.score,
        )

    def iou(self, other: FaceBox) -> float:
        """Intersection over union with ``other``, in [0, 1]."""
        inter = FaceBox(
            max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1)
        ).area
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def union_box(boxes: Sequence[FaceBox]) -> FaceBox:
    """The smallest box containing all ``boxes`` (EMO's face region over a clip).

    Its score is the lowest of the scores: the union is as trustworthy as its weakest member.
    """
    if not boxes:
        raise ValueError("union_box needs at least one box, got an empty sequence")
    return FaceBox(
        min(b.x0 for b in boxes),
        min(b.y0 for b in boxes),
        max(b.x1 for b in boxes),
        max(b.y1 for b in boxes),
        min(b.score for b in boxes),
    )


def face_mask(box: FaceBox, size: tuple[int, int], *, expand: float = 1.2) -> np.ndarray:
    """EMO's face-locator mask: 1 inside ``box`` scaled by ``expand`` about its centre, 0 elsewhere.

    Args:
        box: face box in pixels of an image of ``size``.
        size: (width, height) of the mask, pixels.
        expand: box scale factor; 1.2 (as Hallo's face mask) leaves room for the head to move inside
            the region, a wider box allows more head swing.

    Returns:
        float32 array (height, width) of 0 and 1. A pixel is inside when its centre is.
    """
    width, height = size
    region = box.scaled(expand)
    mask = np.zeros((height, width), dtype=np.float32)
    x0, x1 = (min(max(math.floor(v + 0.5), 0), width) for v in (region.x0, region.x1))
    y0, y1 = (min(max(math.floor(v + 0.5), 0), height) for v in (region.y0, region.y1))
    mask[y0:y1, x0:x1] = 1.0
    return mask


def mouth_mask(box: FaceBox, size: tuple[int, int]) -> np.ndarray:
    """The mouth region of a face box: 1 over the middle half of its width and the band from 55 % to 100 % of
    its height (MediaPipe's boxes end near the chin), 0 elsewhere; float32 (height, width) for an image of
    ``size`` = (width, height). Weights the training loss, and hides the portrait's mouth from models with
    ``behaviour.mask_reference_mouth``."""
    width, height = size
    mask = np.zeros((height, width), np.float32)
    x0, x1 = round(box.x0 + 0.25 * box.width), round(box.x0 + 0.75 * box.width)
    y0, y1 = round(box.y0 + 0.55 * box.height), round(box.y1)
    mask[max(0, y0) : max(0, min(height, y1)), max(0, x0) : max(0, min(width, x1))] = 1.0
    return mask


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def to_rgb_array(image: Image.Image | np.ndarray | str | Path) -> np.ndarray:
    """Any supported image as an (H, W, 3) uint8 RGB array (C-contiguous, as MediaPipe wants it).

    Accepts a PIL image of any mode (EXIF orientation applied; 16-bit greyscale scaled to 8 bits),
    a path to an image file, or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8, or of
    floats in [0, 1]. Transparent pixels (RGBA, LA, palette with transparency) are composited on white.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image (the message names it), or the array has an
            unsupported shape or dtype.
    """
    if isinstance(image, str | Path):
        return _pil_to_rgb(_open_image(Path(image)))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"image must be a PIL image, a numpy array or a path, got {type(image).__name__}")


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image file {path}: it is not a valid image ({err})") from err


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I") or image.mode == "F":
        return _array_to_rgb(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        return _array_to_rgb(np.asarray(image.convert("RGBA")))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype == np.uint8 and array.shape[2] != 4:  # the common case, without a float copy
        return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array)
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16 or (array.dtype.kind in "iu" and array.max(initial=0) > 255):
        values = array.astype(np.float32) / 65535.0
    elif array.dtype.kind in "iu":
        values = array.astype(np.float32) / 255.0
    elif array.dtype.kind == "f":
        values = np.nan_to_num(array.astype(np.float32))
    elif array.dtype == np.bool_:
        values = array.astype(np.float32)
    else:
        raise ValueError(f"image array dtype must be uint8 or float in [0, 1], got {array.dtype}")
    values = np.clip(values, 0.0, 1.0)
    if values.shape[2] == 4:
        alpha = values[:, :, 3:]
        values = values[:, :, :3] * alpha + (1.0 - alpha)
    elif values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(np.round(values * 255.0).astype(np.uint8))


def _detection_view(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` resized so that its longest side is within the range the MediaPipe models like."""
    import cv2

    longest = max(rgb.shape[:2])
    target = min(max(longest, _MIN_DETECTION_SIDE), _MAX_DETECTION_SIDE)
    if target == longest:
        return rgb
    factor = target / longest
    size = (max(round(rgb.shape[1] * factor), 1), max(round(rgb.shape[0] * factor), 1))
    interpolation = cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=interpolation))


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


class _FaceDetector:
    """MediaPipe face detection, full-range model first, short-range model when it finds nothing.

    A context manager, so the MediaPipe graphs are closed; one instance serves many frames.
    """

    def __enter__(self) -> _FaceDetector:
        import mediapipe as mp

        self._solution = mp.solutions.face_detection
        self._models: dict[int, Any] = {}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for model in self._models.values():
            model.close()
        self._models.clear()

    def _model(self, selection: int) -> Any:
        if selection not in self._models:
            self._models[selection] = self._solution.FaceDetection(
                model_selection=selection, min_detection_confidence=_MIN_DETECTION_CONFIDENCE
            )
        return self._models[selection]

    def __call__(self, rgb: np.ndarray) -> list[FaceBox]:
        """Faces in an (H, W, 3) uint8 RGB image, largest first, in its pixel coordinates."""
        height, width = rgb.shape[:2]
        view = _detection_view(rgb)
        for selection in (1, 0):  # 1: full range (faces up to ~5 m), 0: short range (~2 m)
            detections = self._model(selection).process(view).detections or []
            if detections:
                break
        boxes = []
        for detection in detections:
            rel = detection.location_data.relative_bounding_box
            boxes.append(
                FaceBox(
                    rel.xmin * width,
                    rel.ymin * height,
                    (rel.xmin + rel.width) * width,
                    (rel.ymin + rel.height) * height,
                    float(detection.score[0]),
                )
            )
        return sorted(boxes, key=lambda b: b.area, reverse=True)


def detect_faces(image: Image.Image | np.ndarray | str | Path) -> list[FaceBox]:
    """All faces found by MediaPipe face detection (confidence >= 0.5), largest first.

    Boxes are in pixels of ``image`` (after EXIF rotation) and may extend past its borders.
    """
    with _FaceDetector() as detector:
        return detector(to_rgb_array(image))


def detect_face(image: Image.Image | np.ndarray | str | Path, *, warn_multiple: bool = True) -> FaceBox:
    """The largest face in ``image``.

    Warns (``UserWarning``) when there are several faces and ``warn_multiple`` is true.

    Raises:
        NoFaceError: no face was found.
    """
    faces = detect_faces(image)
    if not faces:
        raise NoFaceError()
    if len(faces) > 1 and warn_multiple:
        largest = faces[0]
        warnings.warn(
            f"{len(faces)} faces found in the image; using the largest one "
            f"({largest.width:.0f}x{largest.height:.0f} px at {largest.center[0]:.0f}, {largest.center[1]:.0f}).",
            stacklevel=2,
        )
    return faces[0]


def face_boxes(frames: Iterable[Image.Image | np.ndarray | str | Path]) -> list[FaceBox | None]:
    """The largest face box of every frame of a video (None where there is none).

    One detector serves all frames; boxes are in pixels of each frame.
    """
    boxes: list[FaceBox | None] = []
    with _FaceDetector() as detector:
        for frame in frames:
            faces = detector(to_rgb_array(frame))
            boxes.append(faces[0] if faces else None)
    return boxes


# --------------------------------------------------------------------------------------------------
# Crop and paste back
# --------------------------------------------------------------------------------------------------


@dataclass
class FaceCrop:
    """A square crop around a face, and where it came from.

    Attributes:
        image: ``size`` x ``size`` RGB crop with the face box centred.
        box: the face box, in pixels of the original image.
        crop_box: the square crop region (x0, y0, x1, y1) in pixels of the original image; it may
            extend past the image, where the crop repeats the border pixels.
        face_box_in_crop: the face box, in pixels of ``image``.
        original_size: (width, height) of the original image, pixels.
    """

    image: Image.Image
    box: FaceBox
    crop_box: tuple[int, int, int, int]
    face_box_in_crop: FaceBox
    original_size: tuple[int, int]

    @property
    def side(self) -> int:
        """Side of the crop region in original pixels."""
        return self.crop_box[2] - self.crop_box[0]


def crop_face(
    image: Image.Image | np.ndarray | str | Path,
    *,
    size: int = 512,
    margin: float = 0.6,
    box: FaceBox | None = None,
) -> FaceCrop:
    """A ``size`` x ``size`` crop centred on the face (the largest one, or ``box`` if given).

    The square side is ``max(face width, face height) * (1 + 2 * margin)`` original pixels. The default
    margin 0.6 makes the face box 1 / 2.2 = 45% of the crop width: a head-and-shoulders framing like the
    512 x 512 training crops of EMO and Hallo (LivePortrait's video crops use the same 2.2 scale).
    Where the square extends past the photo, the border pixels are repeated (edge padding): unlike
    reflection, it never mirrors a second face or eye into the crop.

    Raises:
        NoFaceError: ``box`` is None and no face was found.
    """
    import cv2

    if size < 1 or margin < 0:
        raise ValueError(f"size must be >= 1 and margin >= 0, got size={size}, margin={margin}")
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if box is None:
        box = detect_face(rgb)
    side = max(round(max(box.width, box.height) * (1 + 2 * margin)), 1)
    cx, cy = box.center
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    x1, y1 = x0 + side, y0 + side

    inside = rgb[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)]
    if inside.size == 0:
        raise ValueError(f"the face box {box} lies outside the {width}x{height} image")
    region = cv2.copyMakeBorder(
        inside,
        max(-y0, 0),
        max(y1 - height, 0),
        max(-x0, 0),
        max(x1 - width, 0),
        cv2.BORDER_REPLICATE,
    )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    crop = cv2.resize(region, (size, size), interpolation=interpolation)

    factor = size / side
    in_crop = FaceBox(
        (box.x0 - x0) * factor,
        (box.y0 - y0) * factor,
        (box.x1 - x0) * factor,
        (box.y1 - y0) * factor,
        box.score,
    )
    return FaceCrop(Image.fromarray(crop), box, (x0, y0, x1, y1), in_crop, (width, height))


def _feather_mask(side: int, feather: float) -> np.ndarray:
    """(side, side) float32 weights: 1 inside, falling smoothly to 0 over ``feather * side`` px at the edges."""
    ramp = max(feather * side, 1e-6)
    centres = np.arange(side, dtype=np.float32) + 0.5
    to_edge = np.minimum(centres, side - centres)
    weight = np.clip(to_edge / ramp, 0.0, 1.0)
    weight = weight * weight * (3.0 - 2.0 * weight)  # smoothstep: no visible kink where the ramp ends
    return np.minimum(weight[:, None], weight[None, :])


class PasteBack:
    """Pastes generated crop frames back into the original photo; the feather mask is computed once.

    ``PasteBack(crop, original, feather=0.1)(frame)`` returns an (H, W, 3) uint8 array of the
    original's size: the frame resized to the crop region, blended in with a soft edge ``feather`` x
    the region side wide. Parts of the region outside the photo are dropped.
    """

    def __init__(
        self, crop: FaceCrop, original: Image.Image | np.ndarray | str | Path, *, feather: float = 0.1
    ) -> None:
        self._original = to_rgb_array(original)
        height, width = self._original.shape[:2]
        if (width, height) != tuple(crop.original_size):
            raise ValueError(
                f"original is {width}x{height} but the crop was made from a "
                f"{crop.original_size[0]}x{crop.original_size[1]} image"
            )
        if not 0 <= feather <= 0.5:
            raise ValueError(f"feather must be in [0, 0.5] (a fraction of the crop side), got {feather}")
        x0, y0, x1, y1 = crop.crop_box
        self._side = crop.side
        # The part of the crop region inside the photo, in photo and in region coordinates.
        self._photo = (slice(max(y0, 0), min(y1, height)), slice(max(x0, 0), min(x1, width)))
        self._region = (
            slice(self._photo[0].start - y0, self._photo[0].stop - y0),
            slice(self._photo[1].start - x0, self._photo[1].stop - x0),
        )
        self._alpha = _feather_mask(self._side, feather)[self._region][:, :, None]
        self._background = self._original[self._photo].astype(np.float32) * (1.0 - self._alpha)

    def __call__(self, frame: Image.Image | np.ndarray) -> np.ndarray:
        """The original photo with ``frame`` (a square RGB crop of any size) pasted in."""
        import cv2

        rgb = to_rgb_array(frame)
        if rgb.shape[0] != rgb.shape[1]:
            raise ValueError(f"frame must be square, got {rgb.shape[1]}x{rgb.shape[0]}")
        interpolation = cv2.INTER_AREA if rgb.shape[0] > self._side else cv2.INTER_CUBIC
        resized = cv2.resize(rgb, (self._side, self._side), interpolation=interpolation)
        blended = resized[self._region].astype(np.float32) * self._alpha + self._background
        out = self._original.copy()
        out[self._photo] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        return out


def paste_back(
    frame: Image.Image | np.ndarray,
    crop: FaceCrop,
    original: Image.Image | np.ndarray | str | Path,
    *,
    feather: float = 0.1,
) -> Image.Image:
    """``frame`` (a generated square crop) pasted into ``original`` where ``crop`` was taken.

    The output has the original's size and framing; the pasted square fades into the photo over
    ``feather`` x its side. For many frames, build one :class:`PasteBack` and call it per frame.
    """
    return Image.fromarray(PasteBack(crop, original, feather=feather)(frame))


# --------------------------------------------------------------------------------------------------
# Head pose and speed
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadPose:
    """Head rotation in the camera frame (x right, y down, z away from the camera), degrees.

    ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` maps the generic head model (facing the camera) onto the
    head, the Euler decomposition of OpenCV's ``RQDecomp3x3``. Signs: pitch > 0 looks down, yaw > 0
    turns the face towards the image's left, roll > 0 tilts the head clockwise in the image. A face
    looking straight into the camera reads about zero when it is at the image centre; elsewhere it
    reads the angle of its line of sight (about atan(offset / image width)).
    """

    yaw: float
    pitch: float
    roll: float

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 rotation matrix (float64)."""
        p, y, r = np.radians([self.pitch, self.yaw, self.roll])
        rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
        ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
        rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
        return rz @ ry @ rx


def _pose_from_landmarks(points: np.ndarray, width: int, height: int) -> HeadPose:
    """Head pose from FaceMesh landmarks (N >= 468, 2+) in pixels of a ``width`` x ``height`` image."""
    import cv2

    indices = list(_POSE_MODEL_POINTS)
    model = np.array([_POSE_MODEL_POINTS[i] for i in indices], dtype=np.float64)
    image_points = np.ascontiguousarray(points[indices, :2], dtype=np.float64)
    focal = float(width)  # a normal lens: focal length about the image width
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    ok, rvec, _ = cv2.solvePnP(model, image_points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise RuntimeError("cv2.solvePnP failed on the face landmarks")
    rotation, _ = cv2.Rodrigues(rvec)
    pitch, yaw, roll = cv2.RQDecomp3x3(rotation)[0]
    return HeadPose(yaw=float(yaw), pitch=float(pitch), roll=float(roll))


def _mesh_landmarks(mesh: Any, rgb: np.ndarray) -> np.ndarray | None:
    """(468, 2) FaceMesh landmarks in pixels of ``rgb``, or None without a face."""
    result = mesh.process(_detection_view(rgb))
    if not result.multi_face_landmarks:
        return None
    height, width = rgb.shape[:2]
    landmarks = result.multi_face_landmarks[0].landmark
    return np.array([(lm.x * width, lm.y * height) for lm in landmarks], dtype=np.float64)


def face_landmarks(image: Image.Image | np.ndarray | str | Path) -> np.ndarray | None:
    """MediaPipe FaceMesh landmarks of the most prominent face, or None if there is no face.

    Returns:
        float64 array (468, 2): x, y in pixels of ``image`` (after EXIF rotation).
    """
    import mediapipe as mp

    rgb = to_rgb_array(image)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        return _mesh_landmarks(mesh, rgb)


def head_pose(
    image: Image.Image | np.ndarray | str | Path, *, landmarks: np.ndarray | None = None
) -> HeadPose | None:
    """Head pose of the (most prominent) face in a single image, or None if there is no face.

    Args:
        image: the photo.
        landmarks: optional (N >= 468, 2 or 3) FaceMesh landmarks in pixels of ``image`` (only x and
            y are used), e.g. from :func:`face_landmarks`; FaceMesh runs on ``image`` when omitted.

    The pose is ``cv2.solvePnP`` of 9 rigid landmarks (eye corners, nose) against a generic head model,
    with a pinhole camera whose focal length is the image width.
    """
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if landmarks is None:
        landmarks = face_landmarks(rgb)
        if landmarks is None:
            return None
    return _pose_from_landmarks(np.asarray(landmarks, dtype=np.float64), width, height)


def head_poses(frames: Iterable[Image.Image | np.ndarray | str | Path]) -> list[HeadPose | None]:
    """Head pose of every frame of a video (None where no face), with FaceMesh tracking.

    One FaceMesh in video mode serves all frames. Tracking refines its face region from the previous
    landmarks over a few frames, which on a still head reads as ~0.6 degrees per frame of false
    rotation at the start; the first frame is therefore passed a few extra times before the video.
    """
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1) as mesh:
        poses: list[HeadPose | None] = []
        for index, frame in enumerate(frames):
            rgb = to_rgb_array(frame)
            for _ in range(_TRACKING_WARMUP_PASSES if index == 0 else 0):
                _mesh_landmarks(mesh, rgb)
            landmarks = _mesh_landmarks(mesh, rgb)
            height, width = rgb.shape[:2]
            poses.append(None if landmarks is None else _pose_from_landmarks(landmarks, width, height))
    return poses


def _rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle of the rotation ``b @ a.T`` taking ``a`` to ``b``, degrees."""
    cos = (np.trace(b @ a.T) - 1.0) / 2.0
    return math.degrees(math.acos(min(max(cos, -1.0), 1.0)))


def head_rotation_speed(poses: Sequence[HeadPose | None]) -> np.ndarray:
    """Head rotation speed per frame, degrees per frame (EMO's speed condition w_f).

    Frame f gets the angle of the relative rotation ``R_f @ R_(f-1)^T`` (a single angle for any
    combination of yaw, pitch and roll). Frame 0 gets frame 1's value. Missing poses (None) are
    interpolated: across a gap of g frames the rotation between the poses around it is spread evenly
    (constant speed, as a slerp); before the first and after the last pose the nearest speed is held.
    With fewer than two poses the speed is 0.

    Returns:
        float32 array (F,).
    """
    speed = np.zeros(len(poses), dtype=np.float32)
    known = [i for i, pose in enumerate(poses) if pose is not None]
    if len(known) < 2:
        return speed
    matrices = {i: poses[i].matrix for i in known}
    for prev, nxt in zip(known[:-1], known[1:], strict=True):
        speed[prev + 1 : nxt + 1] = _rotation_angle(matrices[prev], matrices[nxt]) / (nxt - prev)
    speed[: known[0] + 1] = speed[known[0] + 1]
    speed[known[-1] + 1 :] = speed[known[-1]]
    return speed

"""Tests of pipeline.face on scikit-image's public-domain astronaut portrait (512 x 512 RGB)."""

import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline import face
from pipeline.face import FaceBox, HeadPose, NoFaceError

# The astronaut's face, hairline to chin and cheek to cheek, drawn by eye on the photo.
REFERENCE_BOX = FaceBox(178, 75, 276, 180)
FACE_CENTRE = (227.0, 127.0)  # centre of REFERENCE_BOX, pixels


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_crop(astronaut: np.ndarray) -> face.FaceCrop:
    return face.crop_face(astronaut)


def rotate_about_face(image: np.ndarray, degrees: float) -> np.ndarray:
    """``image`` rotated counter-clockwise (as displayed) by ``degrees`` about the face centre."""
    matrix = cv2.getRotationMatrix2D(FACE_CENTRE, degrees, 1.0)
    return cv2.warpAffine(image, matrix, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)


def resized_box(box: FaceBox, factor: float) -> FaceBox:
    """``box`` in the coordinates of the image resized by ``factor``."""
    return FaceBox(box.x0 * factor, box.y0 * factor, box.x1 * factor, box.y1 * factor)


# --------------------------------------------------------------------------------------------------
# Images and detection
# --------------------------------------------------------------------------------------------------


def test_import_does_not_load_mediapipe_or_opencv():
    # Loads the file alone, so that only its own imports count (not the package's __init__).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('face', {face.__file__!r})\n"
        "sys.modules['face'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print('mediapipe' in sys.modules, 'cv2' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_detects_astronaut_face_at_reference_box(astronaut):
    faces = face.detect_faces(astronaut)
    assert len(faces) == 1
    assert faces[0].iou(REFERENCE_BOX) > 0.7
    assert faces[0].score > 0.5


def test_detect_face_warns_on_several_faces_and_returns_the_largest(astronaut):
    group = np.full((512, 1024, 3), 200, np.uint8)
    group[:, :512] = astronaut
    group[:400, 512:912] = cv2.resize(astronaut, (400, 400), interpolation=cv2.INTER_AREA)
    with pytest.warns(UserWarning, match="2 faces found"):
        largest = face.detect_face(group)
    assert largest.iou(REFERENCE_BOX) > 0.7


def test_to_rgb_array_converts_modes_and_dtypes(astronaut):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(face.to_rgb_array(grey), np.repeat(grey[:, :, None], 3, axis=2))
    assert np.array_equal(face.to_rgb_array(grey[:, :, None])[:, :, 1], grey)
    assert np.array_equal(face.to_rgb_array(astronaut.astype(np.float32) / 255), astronaut)
    sixteen_bit = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen_bit.mode == "I;16"
    assert np.array_equal(face.to_rgb_array(sixteen_bit)[:, :, 2], grey)
    palette = Image.fromarray(astronaut[:32, :32]).convert("P")
    assert np.array_equal(face.to_rgb_array(palette), np.asarray(palette.convert("RGB")))

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    rgb = face.to_rgb_array(Image.fromarray(rgba, mode="RGBA"))
    assert rgb[0, 0].tolist() == [200, 0, 0]
    assert rgb[3, 3].tolist() == [255, 255, 255]  # composited on white
    assert face.to_rgb_array(rgba)[3, 3].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(astronaut, tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_rotated_jpeg(astronaut, path, orientation=6)
    assert Image.open(path).size == (512, 512)  # square, so check pixels, not size
    upright = face.to_rgb_array(path)
    assert np.abs(upright.astype(int) - astronaut).mean() < 3


def _exif_rotated_jpeg(image: np.ndarray, path, orientation: int) -> None:
    """Stores ``image`` rotated so that a viewer applying the EXIF ``orientation`` shows it upright."""
    stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image).transpose(stored).save(path, quality=95, exif=exif)


def _portrait_input(kind: str, astronaut: np.ndarray, tmp_path) -> tuple[object, FaceBox]:
    """(the astronaut in some form accepted by crop_face, the reference box in its coordinates)."""
    ref = REFERENCE_BOX
    if kind in ("exif6_jpeg", "exif8_jpeg"):
        path = tmp_path / f"{kind}.jpg"
        _exif_rotated_jpeg(astronaut, path, orientation=int(kind[4]))
        return path, ref
    if kind == "rot90_array":  # np.rot90 turns counter-clockwise: (x, y) -> (y, 512 - x)
        return np.rot90(astronaut).copy(), FaceBox(ref.y0, 512 - ref.x1, ref.y1, 512 - ref.x0)
    if kind == "tiny_64":
        return cv2.resize(astronaut, (64, 64), interpolation=cv2.INTER_AREA), resized_box(ref, 64 / 512)
    if kind == "huge_4000":
        return cv2.resize(astronaut, (4000, 4000), interpolation=cv2.INTER_CUBIC), resized_box(
            ref, 4000 / 512
        )
    if kind == "greyscale_pil":
        return Image.fromarray(astronaut).convert("L"), ref
    if kind == "rgba_png":
        rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
        rgba[:64, :64, 3] = 0  # a transparent corner
        path = tmp_path / "portrait.png"
        Image.fromarray(rgba, mode="RGBA").save(path)
        return path, ref
    if kind == "webp_file":
        path = tmp_path / "portrait.webp"
        Image.fromarray(astronaut).save(path, quality=90)
        return path, ref
    assert kind == "str_path"
    path = tmp_path / "portrait.png"
    Image.fromarray(astronaut).save(path)
    return str(path), ref


@pytest.mark.parametrize(
    "kind",
    [
        "exif6_jpeg",
        "exif8_jpeg",
        "rot90_array",
        "tiny_64",
        "huge_4000",
        "greyscale_pil",
        "rgba_png",
        "webp_file",
        "str_path",
    ],
)
def test_crop_is_square_rgb_with_the_face_centred_at_45_percent_width(kind, astronaut, tmp_path):
    image, reference = _portrait_input(kind, astronaut, tmp_path)
    crop = face.crop_face(image, size=256)

    assert crop.image.size == (256, 256) and crop.image.mode == "RGB"
    assert crop.box.iou(reference) > 0.6
    x0, y0, x1, y1 = crop.crop_box
    assert x1 - x0 == y1 - y0
    # The face is really in the crop: detect it again there.
    again = face.detect_face(crop.image)
    cx, cy = again.center
    assert abs(cx - 128) < 0.06 * 256 and abs(cy - 128) < 0.06 * 256
    assert 0.35 < again.width / 256 < 0.55
    assert crop.face_box_in_crop.iou(again) > 0.5  # 0.6 for the sideways face, > 0.9 otherwise


def test_crop_pads_by_repeating_the_border_where_the_square_leaves_the_photo(astronaut):
    crop = face.crop_face(astronaut, margin=1.5)  # side 4 x the face: past the top of the photo
    x0, y0, x1, y1 = crop.crop_box
    assert y0 < 0 and x0 > 0
    rows_outside = round(-y0 * 512 / (y1 - y0))
    pixels = np.asarray(crop.image).astype(int)
    assert np.abs(pixels[: rows_outside - 2] - pixels[rows_outside - 2]).max() <= 3


@pytest.mark.parametrize(
    "image", [data.coffee(), np.full((300, 400, 3), 127, np.uint8)], ids=["coffee", "flat"]
)
def test_photo_without_face_raises_no_face_error(image):
    with pytest.raises(NoFaceError, match="No face") as error:
        face.crop_face(image)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    assert face.detect_faces(image) == []


def test_corrupt_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "broken_portrait.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="broken_portrait.png") as error:
        face.crop_face(path)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# Boxes and masks
# --------------------------------------------------------------------------------------------------


def test_face_box_geometry():
    box = FaceBox(10, 20, 50, 100, score=0.9)
    assert (box.width, box.height, box.center) == (40, 80, (30, 60))
    assert box.scaled(1.5) == FaceBox(0, 0, 60, 120, score=0.9)
    assert FaceBox(-5, 10, 70, 30).clipped(64, 32) == FaceBox(0, 10, 64, 30)
    assert box.iou(box) == 1 and box.iou(FaceBox(60, 0, 70, 10)) == 0


def test_union_box_spans_all_boxes_with_the_lowest_score():
    union = face.union_box([FaceBox(10, 20, 30, 40, 0.9), FaceBox(15, 5, 50, 35, 0.7)])
    assert union == FaceBox(10, 5, 50, 40, 0.7)
    with pytest.raises(ValueError):
        face.union_box([])


def test_face_mask_is_one_inside_the_expanded_box():
    mask = face.face_mask(FaceBox(20, 10, 60, 50), (100, 80), expand=1.5)  # -> x 10..70, y 0..60
    assert mask.shape == (80, 100) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert mask.sum() == 60 * 60
    assert mask[0, 10] == 1 and mask[59, 69] == 1 and mask[60, 69] == 0 and mask[30, 9] == 0


def test_face_mask_is_clipped_to_the_image():
    mask = face.face_mask(FaceBox(-20, -20, 20, 20), (64, 48), expand=1.0)
    assert mask.sum() == 20 * 20 and mask[0, 0] == 1


# --------------------------------------------------------------------------------------------------
# Paste back
# --------------------------------------------------------------------------------------------------


def test_pasting_the_unchanged_crop_reproduces_the_photo(astronaut, astronaut_crop):
    out = face.paste_back(astronaut_crop.image, astronaut_crop, astronaut)
    assert out.size == (512, 512)
    difference = np.abs(np.asarray(out).astype(int) - astronaut)
    r = REFERENCE_BOX
    assert difference[int(r.y0) : int(r.y1), int(r.x0) : int(r.x1)].mean() < 2.0
    assert difference.mean() < 0.5


def test_pasting_a_black_frame_blackens_the_face_and_keeps_the_far_corners(astronaut, astronaut_crop):
    paster = face.PasteBack(astronaut_crop, Image.fromarray(astronaut), feather=0.1)
    out = paster(np.zeros((64, 64, 3), np.uint8))  # any square size
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    cx, cy = (round(v) for v in astronaut_crop.box.center)
    assert out[cy - 20 : cy + 20, cx - 20 : cx + 20].max() == 0
    assert np.array_equal(out[-60:, -60:], astronaut[-60:, -60:])
    assert np.array_equal(out[-60:, :60], astronaut[-60:, :60])
    # The edge is feathered: halfway into the 10% ramp the photo and the frame mix about evenly.
    x0, y0, x1, y1 = astronaut_crop.crop_box
    x, y = x0 + round(0.05 * (x1 - x0)), (y0 + y1) // 2
    assert 0.3 < out[y, x].mean() / astronaut[y, x].mean() < 0.7


def test_paste_back_works_when_the_crop_leaves_the_photo(astronaut):
    crop = face.crop_face(astronaut, margin=1.5)
    out = np.asarray(face.paste_back(np.zeros((512, 512, 3), np.uint8), crop, astronaut))
    assert out.shape == (512, 512, 3)
    assert out[:20, 210:240].max() == 0  # the part of the square inside the top border is pasted
    assert np.array_equal(out[-5:, :5], astronaut[-5:, :5])


def test_paste_back_rejects_an_original_of_another_size(astronaut, astronaut_crop):
    with pytest.raises(ValueError, match="512x512"):
        face.paste_back(astronaut_crop.image, astronaut_crop, astronaut[:256])


# --------------------------------------------------------------------------------------------------
# Head pose and speed
# --------------------------------------------------------------------------------------------------


def _projected_landmarks(pose: HeadPose, width: int = 512, height: int = 512) -> np.ndarray:
    """Fake FaceMesh landmarks: the generic head model with ``pose``, 500 mm in front of the camera."""
    landmarks = np.zeros((468, 2))
    indices = list(face._POSE_MODEL_POINTS)
    model = np.array([face._POSE_MODEL_POINTS[i] for i in indices])
    camera = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], dtype=np.float64)
    rvec = cv2.Rodrigues(pose.matrix)[0]
    projected = cv2.projectPoints(model, rvec, np.array([0.0, 0.0, 500.0]), camera, None)[0]
    landmarks[indices] = projected.reshape(-1, 2)
    return landmarks


def test_head_pose_recovers_a_known_pose_and_its_signs():
    image = np.zeros((512, 512, 3), np.uint8)
    truth = HeadPose(yaw=20.0, pitch=-10.0, roll=5.0)
    landmarks = _projected_landmarks(truth)
    pose = face.head_pose(image, landmarks=landmarks)
    assert pose.yaw == pytest.approx(20, abs=0.1)
    assert pose.pitch == pytest.approx(-10, abs=0.1)
    assert pose.roll == pytest.approx(5, abs=0.1)
    # Documented signs: yaw > 0 turns the nose towards the image's left; pitch < 0 looks up.
    eyes = landmarks[[33, 263]].mean(axis=0)
    assert landmarks[1, 0] < eyes[0]
    frontal = _projected_landmarks(HeadPose(0.0, 0.0, 0.0))
    assert landmarks[1, 1] - eyes[1] < frontal[1, 1] - frontal[[33, 263], 1].mean()


def test_head_pose_matrix_matches_opencv_decomposition():
    rotation = cv2.Rodrigues(np.array([0.3, -0.5, 0.2]))[0]
    pitch, yaw, roll = cv2.RQDecomp3x3(rotation)[0]
    assert np.allclose(HeadPose(yaw=yaw, pitch=pitch, roll=roll).matrix, rotation, atol=1e-9)


def test_head_pose_ignores_jaw_and_mouth(astronaut):
    landmarks = face.face_landmarks(astronaut)
    assert landmarks.shape == (468, 2)
    talking = landmarks.copy()
    talking[[152, 17, 61, 291]] += (0, 8)  # chin, lower lip and mouth corners drop 8 px
    closed, opened = (face.head_pose(astronaut, landmarks=lm) for lm in (landmarks, talking))
    assert closed == opened


def test_astronaut_is_near_frontal_and_mirroring_flips_yaw_and_roll(astronaut):
    """Measured: yaw -3.0, pitch 11.4 (she is above the image centre), roll 2.5 degrees."""
    pose = face.head_pose(astronaut)
    assert abs(pose.yaw) < 10 and abs(pose.roll) < 10 and abs(pose.pitch) < 25
    mirrored = face.head_pose(astronaut[:, ::-1])
    assert mirrored.yaw == pytest.approx(-pose.yaw, abs=1.5)
    assert mirrored.roll == pytest.approx(-pose.roll, abs=1.5)
    assert np.sign(mirrored.yaw) == -np.sign(pose.yaw)


@pytest.mark.parametrize("degrees", [10, -10])
def test_in_plane_rotation_changes_roll_by_the_angle_within_3_degrees(astronaut, degrees):
    upright, turned = face.head_pose(astronaut), face.head_pose(rotate_about_face(astronaut, degrees))
    # Counter-clockwise in the image is negative roll.
    assert turned.roll - upright.roll == pytest.approx(-degrees, abs=3)


def test_head_pose_is_none_without_a_face():
    assert face.head_pose(data.coffee()) is None


def test_head_speed_of_a_head_turning_2_degrees_per_frame_is_2_within_0_6(astronaut):
    """Measured: median 2.3 degrees per frame over 12 frames (landmark jitter only adds speed)."""
    frames = [rotate_about_face(astronaut, 2.0 * i) for i in range(12)]
    speed = face.head_rotation_speed(face.head_poses(frames))
    assert speed.shape == (12,) and speed.dtype == np.float32
    assert np.median(speed) == pytest.approx(2.0, abs=0.6)


def test_head_speed_of_a_still_head_is_below_0_3_degrees_per_frame_in_every_frame(astronaut):
    """Measured: median 0.06, max 0.11 degrees per frame (landmark jitter), first frames included."""
    speed = face.head_rotation_speed(face.head_poses([astronaut] * 12))
    assert speed.max() < 0.3


def test_head_rotation_speed_uses_the_relative_rotation_angle():
    # Yaw 3 then pitch 4 from rest: 3 and ~4 degrees (not a sum of Euler differences);
    # a 3-frame gap spreads the 6 degree turn evenly; the first frame copies the second.
    poses = [
        HeadPose(0, 0, 0),
        HeadPose(3, 0, 0),
        HeadPose(3, 4, 0),
        None,
        None,
        HeadPose(9, 4, 0),
    ]
    speed = face.head_rotation_speed(poses)
    assert speed == pytest.approx([3, 3, 4, 2, 2, 2], abs=0.01)
    diagonal = face.head_rotation_speed([HeadPose(0, 0, 0), HeadPose(3, 4, 0)])
    assert diagonal == pytest.approx([4.99, 4.99], abs=0.01)  # ~5, the combined rotation


def test_head_rotation_speed_with_missing_ends_or_no_poses():
    poses = [None, HeadPose(0, 0, 0), HeadPose(0, 0, 1.5), None]
    assert face.head_rotation_speed(poses) == pytest.approx([1.5] * 4)
    assert face.head_rotation_speed([None, None]).tolist() == [0, 0]
    assert face.head_rotation_speed([]).shape == (0,)


def test_face_boxes_per_frame_with_none_where_there_is_no_face(astronaut):
    blank = np.full_like(astronaut, 90)
    boxes = face.face_boxes([astronaut, blank, rotate_about_face(astronaut, 5)])
    assert boxes[1] is None
    assert boxes[0].iou(REFERENCE_BOX) > 0.7 and boxes[2].iou(REFERENCE_BOX) > 0.6
    union = face.union_box([b for b in boxes if b is not None])
    assert union.width >= boxes[0].width


def test_no_warning_for_a_single_face(astronaut):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        face.detect_face(astronaut)

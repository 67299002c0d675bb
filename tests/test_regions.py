"""Tests of pipeline.regions (Hallo's face/lip boxes and region masks) and pipeline.identity_embedding."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import identity_embedding, regions
from pipeline.face import NoFaceError, detect_face
from pipeline.regions import (
    LIP_LANDMARKS,
    SILHOUETTE_LANDMARKS,
    blur_region,
    box_mask,
    expand_box,
    hallo_region_masks,
    landmark_box,
    level_masks,
    region_masks_from_landmarks,
    split_regions,
)

PORTRAIT = Path(__file__).resolve().parents[1] / "assets" / "examples" / "portrait.png"


# --------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "ratio", "size", "expected"),
    [
        # centre (150, 110); sides 100*1.2 = 120.00000000000001 and 120*1.2 = 144 -> halves 60 and 72
        ((100, 50, 200, 170), 1.2, (512, 512), (90, 38, 210, 182)),
        # odd sum: centre 301 // 2 = 150; side 99 * 1.2 = 118.8 -> half 59
        ((101, 50, 200, 170), 1.2, (512, 512), (91, 38, 209, 182)),
        # past the left edge: (-15, 135) slides forwards to (0, 150); y: centre 50, half 45
        ((10, 20, 110, 80), 1.5, (512, 512), (0, 5, 150, 95)),
        # past the right edge of a 200-wide image: (130, 210) slides back to (120, 200); y: (-20, 60) -> (0, 80)
        ((150, 0, 190, 40), 2.0, (200, 200), (120, 0, 200, 80)),
        # a negative midpoint floors towards -inf: (-5 + 4) // 2 = -1, half 9 // 2 = 4 -> (-5, 3) -> (0, 8)
        ((-5, 10, 4, 19), 1.0, (100, 100), (0, 10, 8, 18)),
        # larger than the image: (-10, 110) -> (0, 120) -> (-20, 100), clamped to the whole side
        ((0, 0, 100, 100), 1.2, (100, 100), (0, 0, 100, 100)),
    ],
)
def test_expand_box_follows_hallos_integer_rule(box, ratio, size, expected):
    rect = expand_box(box, ratio, *size)
    assert rect == expected
    assert all(isinstance(v, int) for v in rect)


def test_landmark_box_rounds_halves_to_even_and_box_mask_fills_it():
    points = np.zeros((468, 2))
    points[list(SILHOUETTE_LANDMARKS)] = [30.2, 40.5]  # every silhouette point at one spot...
    points[10] = [10.5, 20.4]  # ...but two: np.round(10.5) = 10, np.round(20.4) = 20
    points[152] = [60.5, 71.6]  # np.round(60.5) = 60, np.round(71.6) = 72
    points[5] = [0.0, 500.0]  # not a silhouette landmark: ignored
    assert landmark_box(points, SILHOUETTE_LANDMARKS) == (10.0, 20.0, 60.0, 72.0)
    mask = box_mask((2, 1, 5, 3), width=6, height=4)
    assert mask.dtype == np.uint8 and mask.shape == (4, 6)
    assert mask.sum() == 255 * 3 * 2 and (mask[1:3, 2:5] == 255).all()
    with pytest.raises(
        ValueError, match=r"landmarks must be \(N > 454, 2\) pixel coordinates, got shape \(100, 2\)"
    ):
        landmark_box(np.zeros((100, 2)), SILHOUETTE_LANDMARKS)
    with pytest.raises(ValueError, match="expand ratio must be > 0, got 0"):
        expand_box((0, 0, 1, 1), 0, 10, 10)


# --------------------------------------------------------------------------------------------------
# Soft masks
# --------------------------------------------------------------------------------------------------


def test_blur_region_is_a_symmetric_0_to_255_bump_for_a_centred_box():
    mask = box_mask((32, 32, 96, 96), 128, 128)  # 64 x 64 box in the middle of 128 x 128
    soft = blur_region(mask, 51)
    assert soft.dtype == np.uint8 and soft.shape == (64, 64)
    assert soft.min() == 0 and soft.max() == 255
    np.testing.assert_array_equal(soft, soft[::-1])
    np.testing.assert_array_equal(soft, soft[:, ::-1])
    np.testing.assert_array_equal(soft, soft.T)
    assert soft[31, 31] == 255 and soft[0, 0] == 0
    # same steps by hand with OpenCV
    expected = cv2.normalize(
        cv2.GaussianBlur(cv2.resize(mask, (64, 64)), (51, 51), 0), None, 0, 255, cv2.NORM_MINMAX
    )
    np.testing.assert_array_equal(soft, expected)
    # a constant image has no range to stretch: OpenCV's min-max gives all zeros
    assert not blur_region(np.full((10, 10), 255, np.uint8), 31).any()
    with pytest.raises(ValueError, match="kernel must be a positive odd number of pixels, got 50"):
        blur_region(mask, 50)
    with pytest.raises(
        ValueError, match=r"mask must be a non-empty \(H, W\) uint8 array, got float32 \(4, 4\)"
    ):
        blur_region(np.zeros((4, 4), np.float32), 31)


def test_split_regions_inverts_the_face_and_cuts_out_the_lips():
    face = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lip = np.full((16, 16), 100, np.uint8)
    full, face_only, lip_only = split_regions(face, lip)
    # full is Hallo's float inversion, truncated: 255 - face, or one less where floats land under it
    np.testing.assert_array_equal(full, ((1.0 - face / 255.0) * 255).astype(np.uint8))
    off = (255 - face.astype(int)) - full
    assert set(np.unique(off)) == {0, 1} and off.sum() == 50
    assert full[0, 0] == 255 and full.flat[43] == 211 and full.flat[255] == 0
    # face saturates at 0 where the lip mask is brighter
    np.testing.assert_array_equal(face_only, np.clip(face.astype(int) - 100, 0, 255))
    assert (face_only.flat[:101] == 0).all() and face_only.flat[255] == 155
    np.testing.assert_array_equal(lip_only, lip)


def test_region_masks_from_landmarks_on_a_synthetic_face():
    width, height = 200, 160
    points = np.zeros((468, 2))
    points[:] = [100, 80]
    points[list(SILHOUETTE_LANDMARKS)] = [100, 80]
    points[10], points[152] = [70, 40], [130, 120]  # silhouette box (70, 40)-(130, 120)
    points[list(LIP_LANDMARKS)] = [100, 100]
    points[61], points[291] = [90, 95], [110, 105]  # lip box (90, 95)-(110, 105)
    masks = region_masks_from_landmarks(points, width, height)
    # face: centres 100, 80; halves (60 * 1.2) // 2 = 36, (80 * 1.2) // 2 = 48
    assert masks.face_rect == (64, 32, 136, 128)
    # lips: centres 100, 100; halves 20, 10
    assert masks.lip_rect == (80, 90, 120, 110)
    assert masks.face_box.shape == (height, width) and masks.face_box.dtype == np.uint8
    np.testing.assert_array_equal(masks.face_box, box_mask((64, 32, 136, 128), width, height))
    blurred_face = blur_region(masks.face_box, 51)
    blurred_lip = blur_region(box_mask(masks.lip_rect, width, height), 31)
    np.testing.assert_array_equal(masks.lip, blurred_lip)
    np.testing.assert_array_equal(masks.face, cv2.subtract(blurred_face, blurred_lip))
    np.testing.assert_array_equal(masks.full, ((1.0 - blurred_face / 255.0) * 255).astype(np.uint8))
    for mask in (masks.full, masks.face, masks.lip):
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
    # the lip mask peaks inside the face mask, lower than its centre
    lip_peak = np.unravel_index(np.argmax(masks.lip), masks.lip.shape)
    assert lip_peak[0] > 32 and masks.full[lip_peak] < 30
    assert set(masks.as_dict()) == {"full", "face", "lip"}


# --------------------------------------------------------------------------------------------------
# level_masks
# --------------------------------------------------------------------------------------------------


def _ramp_masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:64, :64]
    return {
        "full": (xx * 4).astype(np.uint8),
        "face": (yy * 4).astype(np.uint8),
        "lip": ((xx + yy) * 2).astype(np.uint8),
    }


def test_level_masks_matches_pil_bilinear_by_hand():
    masks = _ramp_masks()
    out = level_masks(masks, [(16, 8), (4, 4)])
    assert set(out) == {(16, 8), (4, 4)}
    level = out[(16, 8)]
    assert level.shape == (1, 16 * 8, 3) and level.dtype == torch.float32
    for channel, name in enumerate(("full", "face", "lip")):
        by_hand = np.asarray(Image.fromarray(masks[name]).resize((8, 16), Image.BILINEAR), np.float32) / 255
        np.testing.assert_array_equal(level[0, :, channel].numpy(), by_hand.reshape(-1))
    # row-major: element r * w + c is pixel (r, c); the "face" ramp grows down the rows only
    grid = level[0, :, 1].reshape(16, 8)
    assert (grid[:, 0] == grid[:, 7]).all() and (grid[1:, 0] > grid[:-1, 0]).all()


def test_level_masks_input_rules():
    masks = _ramp_masks()
    reference = level_masks(masks, [(8, 8)])[(8, 8)]
    # PIL "L" images, RGB colour arrays, (H, W, 1), integer and float [0, 1] arrays all give the same result
    same = {
        "full": Image.fromarray(masks["full"]),
        "face": np.repeat(masks["face"][:, :, None], 3, axis=2),
        "lip": masks["lip"].astype(np.int64)[:, :, None],
    }
    torch.testing.assert_close(level_masks(same, [(8, 8)])[(8, 8)], reference, rtol=0, atol=0)
    floats = {name: mask / 255.0 for name, mask in masks.items()}
    torch.testing.assert_close(level_masks(floats, [(8, 8)])[(8, 8)], reference, rtol=0, atol=0)
    colour = level_masks({**masks, "full": np.zeros((64, 64, 3), np.uint8) + [255, 0, 0]}, [(2, 2)])[(2, 2)]
    assert torch.allclose(colour[0, :, 0], torch.tensor(76 / 255))  # PIL's L = R * 299/1000 -> 76
    bools = level_masks({**masks, "lip": np.eye(64, dtype=bool)}, [(64, 64)])[(64, 64)]
    assert bools[0, 0, 2] == 1.0 and bools[0, 1, 2] == 0.0

    with pytest.raises(ValueError, match="region masks need the keys 'full', 'face', 'lip'; missing 'lip'"):
        level_masks({"full": masks["full"], "face": masks["face"]}, [(8, 8)])
    with pytest.raises(
        ValueError, match="region masks take only the keys 'full', 'face', 'lip'; got also 'lips'"
    ):
        level_masks({**masks, "lips": masks["lip"]}, [(8, 8)])
    with pytest.raises(
        ValueError, match=r"region mask 'face' is float, so it must lie in \[0, 1\]; got 0.0..252.0"
    ):
        level_masks({**masks, "face": masks["face"].astype(np.float32)}, [(8, 8)])
    with pytest.raises(ValueError, match=r"region mask 'lip' must be 8-bit \(0..255\), got values 4..256"):
        level_masks({**masks, "lip": masks["lip"].astype(np.int32) + 4}, [(8, 8)])
    with pytest.raises(
        ValueError, match=r"region mask 'full' must be \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"
    ):
        level_masks({**masks, "full": np.zeros((2, 64, 64), np.uint8)}, [(8, 8)])
    with pytest.raises(ValueError, match="region mask 'full' must be uint8, bool or float in"):
        level_masks({**masks, "full": np.zeros((8, 8), np.complex64)}, [(8, 8)])
    with pytest.raises(ValueError, match=r"each size must be \(h, w\) with positive integers, got \(0, 8\)"):
        level_masks(masks, [(0, 8)])


# --------------------------------------------------------------------------------------------------
# identity_embedding (insightface is optional; a stand-in module plays it here)
# --------------------------------------------------------------------------------------------------


def test_importing_identity_embedding_does_not_import_insightface():
    code = "import sys, pipeline.identity_embedding; print('insightface' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_face_embedding_without_insightface_names_the_package_and_the_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # makes `import insightface...` fail
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError) as info:
        identity_embedding.face_embedding(np.zeros((8, 8, 3), np.uint8))
    message = str(info.value)
    assert "\n" not in message
    assert "pip install insightface onnxruntime" in message
    assert "glintr100.onnx" in message and "scrfd_10g_bnkps.onnx" in message
    assert "face_embedding=" in message


@pytest.fixture(autouse=True)
def _fresh_analyser_cache():
    """The stand-in FaceAnalysis objects must not leak between tests through the analyser cache."""
    identity_embedding._analyser.cache_clear()
    yield
    identity_embedding._analyser.cache_clear()


class _FakeFace(dict):
    """insightface's Face is a dict whose keys also read as attributes."""


def _install_fake_insightface(monkeypatch, faces):
    calls = {}

    class FaceAnalysis:
        def __init__(self, name, root, providers):
            calls["init"] = dict(name=name, root=root, providers=providers)

        def prepare(self, ctx_id, det_size):
            calls["prepare"] = dict(ctx_id=ctx_id, det_size=det_size)

        def get(self, image):
            calls["image"] = image
            return faces

    package = types.ModuleType("insightface")
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FaceAnalysis
    package.app = app
    monkeypatch.setitem(sys.modules, "insightface", package)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    return calls


def test_face_embedding_takes_the_raw_embedding_of_the_largest_face(monkeypatch, tmp_path):
    small = _FakeFace(
        bbox=np.array([0, 0, 10, 10.0]), embedding=np.full(512, 1.0), normed_embedding=np.zeros(512)
    )
    large = _FakeFace(
        bbox=np.array([5, 5, 40, 30.0]), embedding=np.arange(512) * 2.0, normed_embedding=np.zeros(512)
    )
    calls = _install_fake_insightface(monkeypatch, [small, large])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "glintr100.onnx").write_bytes(b"")
    image = np.zeros((6, 4, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    emb = identity_embedding.face_embedding(Image.fromarray(image), tmp_path)
    assert emb.dtype == np.float32 and emb.shape == (512,)
    np.testing.assert_array_equal(emb, np.arange(512) * 2.0)
    assert calls["init"] == dict(
        name="", root=str(tmp_path.resolve()), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert calls["prepare"] == dict(ctx_id=0, det_size=(640, 640))
    assert calls["image"].shape == (6, 4, 3) and (calls["image"][..., 2] == 200).all()  # BGR
    assert not calls["image"][..., 0].any()


def test_face_embedding_with_no_face_is_zero_and_warns(monkeypatch, tmp_path, caplog):
    _install_fake_insightface(monkeypatch, [])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="pipeline.identity_embedding"):
        emb = identity_embedding.face_embedding(np.zeros((8, 8, 3), np.uint8), tmp_path)
    assert emb.dtype == np.float32 and emb.shape == (512,) and not emb.any()
    assert "zero identity embedding" in caplog.text


def test_face_embedding_without_the_model_folder_is_a_file_not_found(monkeypatch, tmp_path):
    _install_fake_insightface(monkeypatch, [])
    with pytest.raises(
        FileNotFoundError, match=r"No insightface models in .*models: put Hallo's face_analysis/models/"
    ):
        identity_embedding.face_embedding(np.zeros((8, 8, 3), np.uint8), tmp_path / "absent")


# --------------------------------------------------------------------------------------------------
# End to end on the example portrait (MediaPipe FaceMesh on the CPU, ~2 s)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return Image.open(PORTRAIT).convert("RGB")


def test_hallo_region_masks_on_the_example_portrait(portrait):
    masks = hallo_region_masks(portrait)
    width, height = portrait.size
    assert masks.face_box.shape == (height, width) and set(np.unique(masks.face_box)) == {0, 255}
    x0, y0, x1, y1 = masks.face_rect
    assert (masks.face_box[y0:y1, x0:x1] == 255).all() and masks.face_box.sum() == 255 * (x1 - x0) * (y1 - y0)
    # the expanded landmark box covers most of MediaPipe's detected face box
    detected = detect_face(portrait)
    inter_w = max(0.0, min(x1, detected.x1) - max(x0, detected.x0))
    inter_h = max(0.0, min(y1, detected.y1) - max(y0, detected.y0))
    assert inter_w * inter_h / detected.area > 0.85
    # the lips sit in the lower half of the face box, horizontally inside it
    lx0, ly0, lx1, ly1 = masks.lip_rect
    assert (y0 + y1) / 2 < (ly0 + ly1) / 2 < y1
    assert x0 < (lx0 + lx1) / 2 < x1
    assert (lx1 - lx0) < (x1 - x0)
    for mask in (masks.full, masks.face, masks.lip):
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert masks.full.max() == 255 and masks.lip.max() == 255
    assert masks.face.max() > 100  # the face minus the lips: its peak is cut down by the wide lip mask


def test_hallo_region_masks_without_a_face_raises_no_face_error():
    blank = np.full((128, 128, 3), 128, np.uint8)
    with pytest.raises(NoFaceError, match="pass region_masks=") as info:
        hallo_region_masks(blank)
    assert "\n" not in str(info.value)
    assert regions.NO_FACE_FOR_REGIONS == str(info.value)

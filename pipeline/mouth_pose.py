"""The mouth pose: a portrait with its mouth opened by an image warp, frame by frame.

`open_mouth` opens the mouth of a photo by a number of pixels, on its FaceMesh landmarks: the lower lip and the
jaw move down by the opening (fading out below the chin and past the mouth corners), and the gap between the
lips is filled with the dark inside of a mouth, an upper row of teeth when it is wide. `training.talking_photos`
makes its clips with it; a model with `behaviour.posed_reference` (the small embedded model) is given, for every
frame, the portrait's latents with its mouth opened as far as the voice asks (`AudioProjection.mouth_opening`)
instead of the one still portrait: a pose it learns to follow, as EMO's face locator gives it where the face is.
"""

from __future__ import annotations

import numpy as np

from .metrics import CHIN, FOREHEAD, LOWER_LIP, UPPER_LIP

# FaceMesh landmarks: inner mouth corners, outer mouth corners, the lower lip's outer edge
INNER_LEFT, INNER_RIGHT, OUTER_LEFT, OUTER_RIGHT, LOWER_LIP_OUTER = 78, 308, 61, 291, 17
MOUTH_INSIDE = np.array([70.0, 25.0, 30.0], np.float32)
TEETH = np.array([215.0, 205.0, 195.0], np.float32)


def open_mouth(image: np.ndarray, landmarks: np.ndarray, opening: float) -> np.ndarray:
    """The photo with its mouth opened by `opening` pixels more (see the module doc); uint8 in and out."""
    import cv2

    if opening <= 0:
        return image.copy()
    h, w = image.shape[:2]
    lm = landmarks
    centre = (lm[INNER_LEFT, 0] + lm[INNER_RIGHT, 0]) / 2
    inner_half = max(abs(lm[INNER_RIGHT, 0] - lm[INNER_LEFT, 0]) / 2, 1.0)
    outer_half = max(abs(lm[OUTER_RIGHT, 0] - lm[OUTER_LEFT, 0]) / 2, 1.0)
    lips = lm[LOWER_LIP, 1]  # the lower lip's inner edge: a mouth already open opens further from there
    lower_lip, chin = lm[LOWER_LIP_OUTER, 1], lm[CHIN, 1]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # across: 1 at the mouth's centre, 0 a little past its outer corners
    across = 0.5 * (1 + np.cos(np.pi * np.clip(np.abs(xs - centre) / (outer_half * 1.2), 0, 1)))
    # down: the lower lip moves by the full opening, the jaw below it less and less, nothing well below the chin
    end = chin + 0.4 * (chin - lower_lip) + opening
    down = np.where(
        ys <= lower_lip + opening, 1.0, np.clip((end - ys) / max(end - lower_lip - opening, 1.0), 0, 1)
    )
    shift = opening * across * down * (ys >= lips)
    source_y = np.where(
        (ys >= lips) & (ys < lips + shift), lips, ys - shift
    )  # the gap: lip colour, painted over
    out = cv2.remap(image, xs, source_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # the inside of the mouth: an ellipse between the lips, teeth along the top when it is wide
    ellipse = np.sqrt(np.clip(1 - ((xs - centre) / inner_half) ** 2, 0, 1))
    inside = cv2.GaussianBlur(
        ((ys >= lips) & (ys < lips + 0.95 * shift * ellipse)).astype(np.float32), (0, 0), 0.7
    )
    teeth = np.zeros_like(inside)
    if opening > 3 and lm[LOWER_LIP, 1] - lm[UPPER_LIP, 1] < 1.5:  # a closed mouth shows its upper teeth
        teeth = cv2.GaussianBlur(
            ((ys >= lips) & (ys < lips + min(0.3 * opening, 2.5))).astype(np.float32), (0, 0), 0.7
        )
    fill = MOUTH_INSIDE * (1 - teeth[..., None]) + TEETH * teeth[..., None]
    out = out.astype(np.float32) * (1 - inside[..., None]) + fill * inside[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def face_height(landmarks: np.ndarray) -> float:
    """Forehead-to-chin distance of FaceMesh `landmarks` (pixels): the unit of a mouth opening."""
    return float(np.hypot(*(landmarks[FOREHEAD] - landmarks[CHIN])))


def posed_frames(
    image: np.ndarray, landmarks: np.ndarray, openings: np.ndarray, step: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """`image` (H, W, 3) uint8 with its mouth opened by each of `openings` (pixels; NaN and negatives: 0) ->
    (the distinct frames (k, H, W, 3) uint8, the index (n,) of each opening's frame among them).

    Openings are rounded to `step` pixels, so a still mouth costs one warp (and its caller one encoding)."""
    rounded = np.round(np.clip(np.nan_to_num(np.asarray(openings, np.float64)), 0, None) / step) * step
    values, index = np.unique(rounded, return_inverse=True)
    return np.stack([open_mouth(image, landmarks, float(v)) for v in values]), index.reshape(-1)

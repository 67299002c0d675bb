"""The mouth pose: a portrait with its mouth opened by an image warp, frame by frame.

`open_mouth` opens the mouth of a photo by a number of pixels, on its FaceMesh landmarks: the lower lip and the
jaw move down by the opening (fading out below the chin and past the mouth corners), and the gap between the
lips is filled with the dark inside of a mouth, an upper row of teeth when it is wide. `training.talking_photos`
makes its clips with it; a model with `behaviour.posed_reference` (the small embedded model) is given, for every
frame, the portrait's latents with its mouth opened as far as the voice asks (`AudioProjection.mouth_opening`)
instead of the one still portrait: a pose it learns to follow, as EMO's face locator gives it where the face is.
At inference the portrait's lips are first brought together (`close_mouth`), so that silence is a closed mouth
and each opening counts from there, whatever the photo's own mouth does (a smile with its teeth showing).
"""

from __future__ import annotations

import numpy as np

from .metrics import CHIN, FOREHEAD, LOWER_LIP, UPPER_LIP

# FaceMesh landmarks: inner mouth corners, outer mouth corners, the lower lip's outer edge
INNER_LEFT, INNER_RIGHT, OUTER_LEFT, OUTER_RIGHT, LOWER_LIP_OUTER = 78, 308, 61, 291, 17
# the lips' inner edges, corner to corner (FaceMesh's lipsUpperInner and lipsLowerInner contours)
UPPER_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
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


def close_mouth(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The photo with its lips brought together, and its landmarks moved with them; uint8 in and out.

    A portrait that smiles with its teeth showing, or speaks, has a gap between the lips: in each column the
    lower lip and the jaw move up by that column's gap (fading out below the chin), so the teeth between the lips
    are covered. `open_mouth` then opens it from a closed mouth, as the small model saw its references in training
    (one of the most closed mouths of each clip). A closed mouth is returned as it is."""
    import cv2

    lm = np.asarray(landmarks, np.float32)
    upper, lower = lm[UPPER_INNER], lm[LOWER_INNER]
    order_u, order_l = np.argsort(upper[:, 0]), np.argsort(lower[:, 0])
    h, w = image.shape[:2]
    columns = np.arange(w, dtype=np.float32)
    top = np.interp(columns, upper[order_u, 0], upper[order_u, 1])
    gap = np.interp(columns, lower[order_l, 0], lower[order_l, 1]) - top
    inside = (columns >= lm[UPPER_INNER, 0].min()) & (columns <= lm[UPPER_INNER, 0].max())
    gap = np.where(inside, np.clip(gap, 0, None), 0.0)  # 0 at the corners, where the edges meet
    if gap.max() < 0.5:
        return image.copy(), lm.copy()
    lower_lip, chin = lm[LOWER_LIP_OUTER, 1], lm[CHIN, 1]
    end = max(chin + 0.4 * (chin - lower_lip), lower_lip + 1.0)
    ys = np.mgrid[0:h, 0:w][0].astype(np.float32)
    g = np.broadcast_to(gap[None], (h, w))
    # each row below the upper lip's edge shows the row `gap` lower: all of the lower lip, then less and less
    # of the jaw, nothing from `end` on (the warp stays monotonic: no row is shown twice)
    fade = np.clip((end - ys) / (end - lower_lip + g), 0, 1)
    down = np.where(ys >= top[None], np.where(ys <= lower_lip - g, 1.0, fade), 0.0)
    source_y = (ys + g * down).astype(np.float32)
    xs = np.broadcast_to(columns[None], (h, w)).astype(np.float32)
    out = cv2.remap(image, xs, source_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # the landmarks below the upper lip's edge move up with the pixels (the warp's inverse)
    moved = lm.copy()
    column = np.clip(np.round(lm[:, 0]).astype(int), 0, w - 1)
    gc, y = gap[column], lm[:, 1]
    span = end - lower_lip + gc
    in_fade = (y - gc * end / span) / np.maximum(1 - gc / span, 1e-6)
    new_y = np.where(y <= lower_lip, y - gc, np.where(y >= end, y, in_fade))
    moved[:, 1] = np.where(y > top[column] + 0.25, np.maximum(new_y, top[column]), y)
    return out, moved


def face_height(landmarks: np.ndarray) -> float:
    """Forehead-to-chin distance of FaceMesh `landmarks` (pixels): the unit of a mouth opening."""
    return float(np.hypot(*(landmarks[FOREHEAD] - landmarks[CHIN])))


def posed_frames(
    image: np.ndarray,
    landmarks: np.ndarray,
    openings: np.ndarray,
    step: float = 0.25,
    close_first: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`image` (H, W, 3) uint8 with its mouth opened by each of `openings` (pixels; NaN and negatives: 0) ->
    (the distinct frames (k, H, W, 3) uint8, the index (n,) of each opening's frame among them).

    Openings are rounded to `step` pixels, so a still mouth costs one warp (and its caller one encoding).
    `close_first`: the lips are brought together first (`close_mouth`), so an opening of 0 is a closed mouth
    and every opening counts from there, whatever the photo's own mouth does."""
    if close_first:
        image, landmarks = close_mouth(image, landmarks)
    rounded = np.round(np.clip(np.nan_to_num(np.asarray(openings, np.float64)), 0, None) / step) * step
    values, index = np.unique(rounded, return_inverse=True)
    return np.stack([open_mouth(image, landmarks, float(v)) for v in values]), index.reshape(-1)

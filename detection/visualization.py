"""Drawing boxes, labels, masks and keypoints onto images, for the demo and for checking
data."""

from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A fixed palette (tab20-like) so a class keeps its colour from picture to picture.
_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)


def class_colour(label: int) -> tuple:
    return tuple(int(c) for c in _PALETTE[int(label) % len(_PALETTE)])


def draw_instances(
    image: np.ndarray, boxes: np.ndarray, labels: Sequence[int], *,
    class_names: Optional[Sequence[str]] = None, scores: Optional[Sequence[float]] = None,
    masks: Optional[np.ndarray] = None, mask_alpha: float = 0.45, line_width: int = 2,
    keypoints: Optional[np.ndarray] = None, keypoint_scores: Optional[np.ndarray] = None,
    skeleton: Sequence[Tuple[int, int]] = (), keypoint_threshold: float = 0.0,
) -> np.ndarray:
    """Return a copy of ``image`` (H, W, 3 uint8 RGB) with each instance drawn: its mask
    (N, H, W) blended in its class colour, its box (N, 4 xyxy), a "name score" label, and
    its keypoints (N, K, 3: x, y, visibility) as dots joined by the ``skeleton``'s limbs
    (0-based keypoint pairs). A keypoint is drawn where its visibility is positive and, with
    ``keypoint_scores`` (N, K), its score exceeds ``keypoint_threshold``."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_instances expects an (H, W, 3) image, got {image.shape}")
    out = image.astype(np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if masks is not None and len(masks):
        masks = np.asarray(masks).astype(bool)
        for m, lab in zip(masks, labels):
            colour = np.array(class_colour(lab), np.float32)
            out[m] = out[m] * (1 - mask_alpha) + colour * mask_alpha
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (box, lab) in enumerate(zip(boxes, labels)):
        colour = class_colour(lab)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line_width)
        name = class_names[int(lab)] if class_names is not None else str(int(lab))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 2], fill=colour)
        draw.text((x0 + 2, ty), text, fill=(255, 255, 255), font=font)
    if keypoints is not None:
        _draw_keypoints(draw, np.asarray(keypoints, np.float32), keypoint_scores, labels,
                        skeleton, keypoint_threshold, line_width)
    return np.asarray(canvas)


def _draw_keypoints(draw: "ImageDraw.ImageDraw", keypoints: np.ndarray,
                    scores: Optional[np.ndarray], labels: Sequence[int],
                    skeleton: Sequence[Tuple[int, int]], threshold: float,
                    line_width: int) -> None:
    if keypoints.ndim != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be (N, K, 3), got {keypoints.shape}")
    shown = keypoints[..., 2] > 0
    if scores is not None:
        shown &= np.asarray(scores, np.float32) > threshold
    radius = max(2, line_width + 1)
    for kps, ok, lab in zip(keypoints, shown, labels):
        colour = class_colour(lab)
        for a, b in skeleton:
            if a < len(kps) and b < len(kps) and ok[a] and ok[b]:
                draw.line([tuple(kps[a, :2]), tuple(kps[b, :2])], fill=colour, width=line_width)
        for (x, y, _), visible in zip(kps, ok):
            if visible:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour,
                             outline=(255, 255, 255))

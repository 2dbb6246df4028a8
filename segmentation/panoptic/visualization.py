"""Drawing a panoptic segmentation: each segment blended in its own colour (things in their
class colour, brightened per instance; stuff in its label's), with its name written at its
centre of mass."""

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detection.visualization import class_colour

__all__ = ["draw_panoptic"]


def draw_panoptic(image: np.ndarray, panoptic_seg: np.ndarray,
                  segments_info: Sequence[Mapping[str, Any]], *,
                  thing_names: Optional[Sequence[str]] = None,
                  stuff_names: Optional[Sequence[str]] = None, alpha: float = 0.55) -> np.ndarray:
    """``image`` (H, W, 3) uint8 RGB with the (H, W) segment-id map blended in; void pixels are
    left as they are. ``stuff_names[s]`` names semantic label ``s`` (0 is "things")."""
    out = image.astype(np.float32)
    ids = np.asarray(panoptic_seg)
    labels = []
    for k, s in enumerate(segments_info):
        m = ids == int(s["id"])
        if not m.any():
            continue
        cat = int(s["category_id"])
        if s.get("isthing", False):
            colour = np.array(class_colour(cat), np.float32)
            colour = np.clip(colour * (0.75 + 0.25 * (k % 3)), 0, 255)  # instances apart
            name = thing_names[cat] if thing_names is not None else f"thing {cat}"
            if "score" in s:
                name = f"{name} {float(s['score']):.2f}"
        else:
            colour = np.array(class_colour(10 + cat), np.float32)
            name = stuff_names[cat] if stuff_names is not None else f"stuff {cat}"
        out[m] = out[m] * (1 - alpha) + colour * alpha
        ys, xs = np.nonzero(m)
        labels.append((float(xs.mean()), float(ys.mean()), name))
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for x, y, name in labels:
        draw.text((x, y), name, fill=(255, 255, 255), font=font, anchor="mm")
    return np.asarray(canvas)

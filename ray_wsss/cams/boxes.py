"""Object boxes from class maps (weakly supervised localisation) and their accuracy.

Following the WSOL evaluation of Choe et al. ("Evaluating Weakly Supervised Object
Localization Methods Right", CVPR 2020), as the CAM paper's localisation experiment:

- predicted box of (image, class): min-max normalise the map, keep the pixels above
  `threshold` (0.2 by default), take the largest 8-connected region, and its tight box;
  no box when no pixel is above the threshold.
- ground-truth boxes of (image, class): the tight box of every 8-connected component of
  the class's pixels in the mask (instances that touch merge into one box: a semantic
  mask cannot tell them apart); ignore (255) pixels belong to no class.
- box accuracy (CorLoc): the share of (image, labelled class) pairs whose predicted box
  has IoU >= 0.5 with at least one ground-truth box of its class.

Boxes are [x0, y0, x1, y1] in pixel-edge coordinates: the box covers the pixels
x0 <= x < x1, y0 <= y < y1, so its width is x1 - x0 and areas need no "+ 1".
"""
from __future__ import annotations

import json
from typing import Iterable, Sequence

import cv2
import numpy as np

from .. import storage

Box = tuple[int, int, int, int]


def _components(binary: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count including background, labels, stats) of the 8-connected regions."""
    return cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)[:3]


def _box(stats_row: np.ndarray) -> Box:
    x, y, w, h = (int(v) for v in stats_row[:4])
    return (x, y, x + w, y + h)


def map_box(cam: np.ndarray, threshold: float = 0.2) -> Box | None:
    """The box of the largest connected region of the min-max normalised map (H, W)
    above `threshold`; None when the map is flat or nothing is above it."""
    lo, hi = float(cam.min()), float(cam.max())
    if not hi > lo:
        return None
    n, _, stats = _components((cam - lo) / (hi - lo) > threshold)
    if n < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return _box(stats[largest])


def mask_boxes(mask: np.ndarray, value: int) -> list[Box]:
    """Tight boxes of the 8-connected components of `mask == value` (H, W)."""
    n, _, stats = _components(mask == value)
    return [_box(stats[i]) for i in range(1, n)]


def box_iou(a: Box, b: Box) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def localisation_hits(maps: np.ndarray, classes: Sequence[int], mask: np.ndarray,
                      threshold: float = 0.2, iou: float = 0.5) -> tuple[int, int]:
    """(correct boxes, pairs) of one image: maps (|C|, H, W) of its 0-based classes C,
    mask (H, W) with class c at value c + 1. A class the mask does not contain (a label
    without pixels) is not counted."""
    hits = pairs = 0
    for m, c in zip(maps, classes):
        truth = mask_boxes(mask, int(c) + 1)
        if not truth:
            continue
        pairs += 1
        box = map_box(m, threshold)
        hits += box is not None and max(box_iou(box, t) for t in truth) >= iou
    return hits, pairs


def box_records(image_id: str, maps: np.ndarray, classes: Sequence[int],
                class_names: Sequence[str], scores: Sequence[float] | None = None,
                threshold: float = 0.2) -> list[dict]:
    """One record per class of the image: {"image_id", "class", "box": [x0, y0, x1, y1]
    or None, "score"}. maps (|C|, H, W) of the 0-based classes C (the CAM stage's `cam`
    column: the image's classes in increasing order); `class_names` indexed by 0-based
    class (no background); `scores` (K,) the class probabilities (the `probs` column),
    else the score is None."""
    out = []
    for m, c in zip(maps, classes):
        box = map_box(np.asarray(m, np.float32), threshold)
        out.append({"image_id": str(image_id), "class": class_names[int(c)],
                    "box": list(box) if box is not None else None,
                    "score": float(scores[int(c)]) if scores is not None else None})
    return out


def write_box_records(records: Iterable[dict], path: str) -> int:
    """Write records as one JSON array (a local path or a URI), atomically; returns how
    many were written."""
    rows = list(records)
    storage.write_bytes_atomic(path, json.dumps(rows, indent=1).encode())
    return len(rows)

"""Seeds from CAMs: each pixel takes the class of its strongest map, or background where
no map reaches the background score (AffinityNet / IRN).

The background score is a constant threshold t, or (1 - max_c M_c) ** power when
`power` > 0 (AffinityNet's alpha). For a constant t the seed is simply
`classes[argmax M]` where `max M > t`, else 0, which makes a sweep over many thresholds
cost one argmax.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def background_score(cams: np.ndarray, threshold: float, power: float = 0.0) -> np.ndarray:
    """cams: (n, H, W) in [0, 1] -> background score (H, W)."""
    if power > 0:
        peak = cams.max(0) if len(cams) else np.zeros(cams.shape[1:], np.float32)
        return np.power(1 - peak, power).astype(np.float32)
    return np.full(cams.shape[1:], threshold, np.float32)


def seed_mask(cams: np.ndarray, classes: Sequence[int], threshold: float,
              power: float = 0.0, background: bool = True) -> np.ndarray:
    """cams (n, H, W) of `classes` (1..K) -> label map uint8 (H, W).

    Without a background class (every pixel is an object/stuff class) the seed is the
    argmax over the image's classes alone.
    """
    classes = np.asarray(classes, np.uint8)
    if len(classes) == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    if not background:
        return classes[cams.argmax(0)]
    scores = np.concatenate([background_score(cams, threshold, power)[None], cams])
    return np.concatenate([[0], classes]).astype(np.uint8)[scores.argmax(0)]


def seed_sweep(cams: np.ndarray, classes: Sequence[int], thresholds: Sequence[float]
               ) -> np.ndarray:
    """Seeds for every constant threshold at once: (T, H, W) uint8."""
    classes = np.asarray(classes, np.uint8)
    peak = cams.max(0)
    arg = classes[cams.argmax(0)]
    t = np.asarray(thresholds, np.float32)[:, None, None]
    # ties go to background, as argmax over [t, cams] picks the first maximum
    return np.where(peak[None] > t, arg[None], 0).astype(np.uint8)

"""Multi-scale + flip test-time augmentation of class maps (as IRN's make_cam).

For every scale s the batch is resized by s (and mirrored when `flip`), the method's maps
are computed, un-mirrored, resized back to the image and summed; each class's sum is then
divided by its maximum, so maps lie in [0, 1]. `scale_maps` keeps the per-scale, per-flip
sums apart, so that any subset of scales can be combined later (the threshold sweep
tries TTA settings without recomputing maps).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .methods import Method, MethodOptions


def scale_maps(model, method: Method, images: torch.Tensor, class_sets: Sequence[np.ndarray],
               scales: Sequence[float] = (1.0,), flip: bool = False,
               opts: MethodOptions = MethodOptions()) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Unnormalised maps per scale and flip, at image size.

    images: (B, 3, H, W) float 0..255, all of one size; class_sets[b]: 0-based classes.
    Returns raw (S, 1 + flip, B, U, H, W) for the union U of the batch's classes (sorted),
    the class probabilities (B, K) of the unaugmented images, and U as a list."""
    b, _, h, w = images.shape
    wanted = torch.zeros(b, model.num_classes, dtype=torch.bool, device=images.device)
    for i, cs in enumerate(class_sets):
        wanted[i, torch.as_tensor(np.asarray(cs, np.int64), device=images.device)] = True
    union = torch.nonzero(wanted.any(0)).flatten()
    raw = torch.zeros(len(scales), 2 if flip else 1, b, len(union), h, w, device=images.device)
    probs = None
    for si, s in enumerate(scales):
        x = images if s == 1.0 else F.interpolate(
            images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
            align_corners=False)
        cls = wanted.float()
        if flip:
            x = torch.cat([x, x.flip(-1)])
            cls = torch.cat([cls, cls])
        maps, logits = method(model, x, cls, opts)
        maps = F.interpolate(maps[:, union], size=(h, w), mode="bilinear", align_corners=False)
        raw[si, 0] = maps[:b]
        if flip:
            raw[si, 1] = maps[b:].flip(-1)
        if s == 1.0 and probs is None:
            probs = torch.sigmoid(logits[:b].detach())
    if probs is None:
        with torch.no_grad():
            probs = torch.sigmoid(model(images))
    return raw.detach(), probs.detach(), union.tolist()


def normalise(summed: np.ndarray) -> np.ndarray:
    """Divide each map (..., H, W) by its maximum (+ 1e-5, as IRN)."""
    return summed / (summed.max(axis=(-2, -1), keepdims=True) + 1e-5)


def tta_maps(model, method: Method, images: torch.Tensor, class_sets: Sequence[np.ndarray],
             scales: Sequence[float] = (1.0,), flip: bool = False,
             opts: MethodOptions = MethodOptions()) -> tuple[list[np.ndarray], np.ndarray]:
    """Per image a float32 array (len(class_sets[b]), H, W) in [0, 1] (the sum over
    scales and flips, normalised), and the class probabilities (B, K)."""
    raw, probs, union = scale_maps(model, method, images, class_sets, scales, flip, opts)
    acc = normalise(raw.sum(dim=(0, 1)).cpu().numpy().astype(np.float32))
    pos = {c: j for j, c in enumerate(union)}
    out = [acc[i, [pos[int(c)] for c in cs]] for i, cs in enumerate(class_sets)]
    return out, probs.cpu().numpy().astype(np.float32)

"""Multi-scale + flip test-time augmentation of class maps (as IRN's make_cam).

For every scale s the batch is resized by s (and mirrored when `flip`), the method's maps
are computed, un-mirrored, resized back to the image and summed; each class's sum is then
divided by its maximum, so maps lie in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .methods import Method, MethodOptions


def tta_maps(model, method: Method, images: torch.Tensor, class_sets: Sequence[np.ndarray],
             scales: Sequence[float] = (1.0,), flip: bool = False,
             opts: MethodOptions = MethodOptions()) -> tuple[list[np.ndarray], np.ndarray]:
    """images: (B, 3, H, W) float 0..255, all of one size; class_sets[b]: 0-based classes.

    Returns per image a float32 array (len(class_sets[b]), H, W) in [0, 1], and the class
    probabilities (B, K) of the unaugmented image (sigmoid of the logits at scale 1).
    """
    b, _, h, w = images.shape
    k = model.num_classes
    wanted = torch.zeros(b, k, dtype=torch.bool, device=images.device)
    for i, cs in enumerate(class_sets):
        wanted[i, torch.as_tensor(np.asarray(cs, np.int64), device=images.device)] = True
    union = torch.nonzero(wanted.any(0)).flatten()
    acc = torch.zeros(b, len(union), h, w, device=images.device)
    probs = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(
            images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
            align_corners=False)
        n = b
        cls = wanted.float()
        if flip:
            x = torch.cat([x, x.flip(-1)])
            cls = torch.cat([cls, cls])
        maps, logits = method(model, x, cls, opts)
        maps = maps[:, union]
        if flip:
            maps = maps[:n] + maps[n:].flip(-1)
        acc += F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        if s == 1.0 and probs is None:
            probs = torch.sigmoid(logits[:n].detach())
    if probs is None:
        with torch.no_grad():
            probs = torch.sigmoid(model(images))
    acc = acc / (acc.amax(dim=(2, 3), keepdim=True) + 1e-5)
    acc = acc.detach().cpu().numpy().astype(np.float32)
    pos = {int(c): j for j, c in enumerate(union.tolist())}
    out = [acc[i, [pos[int(c)] for c in cs]] for i, cs in enumerate(class_sets)]
    return out, probs.cpu().numpy().astype(np.float32)

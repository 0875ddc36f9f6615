"""XAI metrics of explaining maps (as used to compare MinMax-CAM with the CAM family).

For image i, each class c of its set C_i (its detected classes), Y_i^c = sigma(s_c(x_i)),
O_ic^d = sigma(s_d(x_i o psi(M_c))) and Obar_ic^d the same with 1 - psi(M_c), psi = min-max
normalise and resize to the image. Percentages over all N = sum_i |C_i| pairs:

- Increase in Confidence  IC  = 100/N sum [Y^c < O^c]
- Average Drop            AD  = 100/N sum max(0, Y^c - O^c) / Y^c
- Average Retention       AR  = 100/N sum max(0, Y^c - Obar^c) / Y^c
- Average Drop of Others  ADO = 100/N sum 1/max(1, |C_i|-1) sum_{d != c} max(0, Y^d - O^d) / Y^d
- Average Retention of Others ARO: ADO with Obar.

Masking keeps what the map covers and replaces the rest by the model's input mean (the
masked input is mean + (x - mean) * psi(M)): removing content means showing "nothing",
as zeroing a normalised input does in the reference implementations.

A batch yields sums (`xai_sums`) that add up over a dataset; `xai_metrics` divides.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

KEYS = ("pairs", "increase", "drop", "retention", "drop_others", "retention_others")
NAMES = {"increase": "increase_in_confidence", "drop": "average_drop",
         "retention": "average_retention", "drop_others": "average_drop_of_others",
         "retention_others": "average_retention_of_others"}


def minmax_normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@torch.no_grad()
def xai_sums(model, images: torch.Tensor, maps: Sequence[np.ndarray],
             class_sets: Sequence[np.ndarray], batch: int = 32) -> np.ndarray:
    """images (B, 3, H, W) float 0..255; maps[b]: (|C_b|, H, W) for the 0-based classes
    class_sets[b]. Returns the sums of KEYS over this batch's pairs: float64 (6,)."""
    probs = torch.sigmoid(model(images)).double().cpu().numpy()
    masked, owners = [], []
    for b, (m, cs) in enumerate(zip(maps, class_sets)):
        for j in range(len(cs)):
            psi = torch.from_numpy(minmax_normalise(m[j]).astype(np.float32)).to(images)
            masked.append(model.mean[0] + (images[b] - model.mean[0]) * psi)
            masked.append(model.mean[0] + (images[b] - model.mean[0]) * (1 - psi))
            owners.append((b, j))
    out = np.zeros(len(KEYS))
    if not owners:
        return out
    scores = []
    for i in range(0, len(masked), batch):
        scores.append(torch.sigmoid(model(torch.stack(masked[i:i + batch]))).double().cpu())
    scores = torch.cat(scores).numpy()
    keep, drop = scores[0::2], scores[1::2]            # O and Obar per pair: (P, K)
    for p, (b, j) in enumerate(owners):
        cs = np.asarray(class_sets[b])
        c = cs[j]
        y = probs[b]
        rel_drop = np.maximum(0, y - keep[p]) / y
        rel_kept = np.maximum(0, y - drop[p]) / y
        others = cs[cs != c]
        denom = max(1, len(cs) - 1)
        out += (1, float(y[c] < keep[p, c]), rel_drop[c], rel_kept[c],
                rel_drop[others].sum() / denom, rel_kept[others].sum() / denom)
    return out


def xai_metrics(sums: np.ndarray) -> dict:
    """Sums of KEYS -> the five metrics in percent (and the number of pairs)."""
    n = sums[0]
    out = {"pairs": int(n)}
    for i, key in enumerate(KEYS[1:], start=1):
        out[NAMES[key]] = float(100 * sums[i] / n) if n else float("nan")
    return out

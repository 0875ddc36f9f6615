"""Dense CRF refinement (Kraehenbuehl and Koltun, NIPS 2011) with pydensecrf.

The labels are background plus the image's own classes only (fewer labels: faster, and
no class the image does not hold can appear). The unary is -log of the softmax of the
scores [background score, CAMs] / temperature; the pairwise terms are a Gaussian
smoothness kernel and a bilateral appearance kernel, with the strengths in CrfConfig.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import CrfConfig
from .seeds import background_score


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax over axis 0 of scores / temperature."""
    z = scores / max(temperature, 1e-6)
    z = z - z.max(0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """image (H, W, 3) uint8 RGB, probs (L, H, W) summing to 1 over L -> marginals
    (L, H, W) float32 after `cfg.iterations` mean-field steps."""
    import pydensecrf.densecrf as dcrf

    n, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, n)
    # pydensecrf needs C-contiguous, writable float32 and uint8 buffers.
    unary = np.ascontiguousarray(-np.log(np.clip(probs, 1e-8, 1.0)).reshape(n, -1),
                                 dtype=np.float32)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                           rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
                           compat=cfg.bilateral_compat)
    q = d.inference(cfg.iterations)
    return np.asarray(q, np.float32).reshape(n, h, w)


def crf_mask(image: np.ndarray, cams: np.ndarray, classes: Sequence[int], cfg: CrfConfig,
             threshold: float, power: float = 0.0, background: bool = True) -> np.ndarray:
    """CAMs (n, H, W) of `classes` (1..K) -> refined label map uint8 (H, W)."""
    classes = np.asarray(classes, np.uint8)
    if background:
        scores = np.concatenate([background_score(cams, threshold, power)[None], cams])
        labels = np.concatenate([[0], classes]).astype(np.uint8)
    else:
        scores, labels = cams, classes
    if len(labels) == 1:
        return np.full(image.shape[:2], labels[0], np.uint8)
    q = dense_crf(image, softmax(scores.astype(np.float32), cfg.score_temperature), cfg)
    return labels[q.argmax(0)]


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, cfg: CrfConfig,
                    gt_prob: float = 0.7) -> np.ndarray:
    """Dense CRF whose unary comes from a hard label map (IRN's `crf_inference_label`).

    image (H, W, 3) uint8 RGB, labels (H, W) ints in 0..n_labels-1 -> refined labels
    (H, W) int64 in 0..n_labels-1. Each pixel's unary puts probability `gt_prob` on its
    label and spreads the rest evenly (pydensecrf's `unary_from_labels`, no unsure label),
    so the CRF can move boundaries to image edges but not invent labels from scores.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = labels.shape
    if n_labels < 2:
        return np.zeros((h, w), np.int64)
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = unary_from_labels(np.ascontiguousarray(labels, dtype=np.int64), n_labels,
                              gt_prob=gt_prob, zero_unsure=False)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                           rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
                           compat=cfg.bilateral_compat)
    q = np.asarray(d.inference(cfg.iterations), np.float32).reshape(n_labels, h, w)
    return q.argmax(0)

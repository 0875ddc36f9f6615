"""Affinity labels and pixel pairs for learning inter-pixel affinities from CAMs.

Follows IRN (Ahn, Cho and Kwak, "Weakly Supervised Learning of Instance Segmentation with
Inter-pixel Relations", CVPR 2019), which refines AffinityNet (Ahn and Kwak, "Learning
Pixel-level Semantic Affinity with Image-level Supervision", CVPR 2018):

- `affinity_labels`: confident foreground where a class map beats a high constant
  (`fg_threshold`, IRN's `conf_fg_thres` 0.30), confident background where no class map
  beats a low constant (`bg_threshold`, IRN's `conf_bg_thres` 0.05); each of the two
  label maps is cleaned by a dense CRF from labels; everything in between is unsure (255).
- `saliency_affinity_labels`: the same with a saliency map (C²AM-H, P-NOC) in place of
  the low CAM threshold: background where the CRF'd saliency says so.
- `pair_offsets`: the forward half-disk of radius r, so every unordered pair of pixels
  closer than r appears once (34 offsets at r = 5).
- `segment_pixels`: which pixels lie on the segment between the two ends of a pair (the
  boundary map is max-pooled over them to give the pair's affinity).
- `pair_labels`: positive background / positive foreground / negative pairs from a label
  map at stride 4.

Shapes: label maps (H, W) uint8 with 0 = background, 1..K = classes, 255 = unsure.
Pair tensors are laid out per offset at the source pixel: `x[p, y, x]` is about the pair
((y, x), (y + dy_p, x + dx_p)); entries whose destination falls outside the image are
never used (False / 0).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import CrfConfig
from .crf import crf_from_labels

UNSURE = 255

# IRN's crf_inference_label: 10 iterations, Gaussian sxy 3 compat 3, bilateral sxy 50
# srgb 5 compat 10 (the project's CrfConfig default has srgb 10, for score unaries).
IRN_LABEL_CRF = CrfConfig(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0,
                          bilateral_sxy=50.0, bilateral_srgb=5.0, bilateral_compat=10.0)


def affinity_labels(image: np.ndarray, cams: np.ndarray, classes: Sequence[int],
                    fg_threshold: float = 0.30, bg_threshold: float = 0.05,
                    crf_cfg: CrfConfig | None = None, background: bool = True,
                    gt_prob: float = 0.7) -> np.ndarray:
    """Confident foreground / background / unsure labels for training affinities (IRN).

    image: (H, W, 3) uint8 RGB; cams: (n, H, W) float in [0, 1], one map per entry of
    `classes` (n ints in 1..K). Returns (H, W) uint8: a class where the CRF-refined
    argmax over [fg_threshold, cams] says that class; 0 where that map and the
    CRF-refined argmax over [bg_threshold, cams] both say background; 255 elsewhere.
    `crf_cfg` defaults to IRN's label CRF (`IRN_LABEL_CRF`); `gt_prob` is the
    probability the CRF unary gives each pixel's own label.

    Without a background class (`background=False`: every pixel belongs to some class)
    there are no confident-background pixels: the foreground map's class where it is
    confident, 255 elsewhere.
    """
    cfg = crf_cfg or IRN_LABEL_CRF
    cams = np.asarray(cams, np.float32)
    keys = np.concatenate([[0], np.asarray(classes, np.int64)]).astype(np.uint8)

    def confident(threshold: float) -> np.ndarray:
        scores = np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32),
                                 cams])
        # argmax takes the first maximum, so a tie with the constant is background (IRN)
        return keys[crf_from_labels(image, scores.argmax(0), len(keys), cfg, gt_prob)]

    fg = confident(fg_threshold)
    out = np.where(fg > 0, fg, UNSURE).astype(np.uint8)
    if background:
        bg = confident(bg_threshold)
        out[(fg == 0) & (bg == 0)] = 0
    return out


def saliency_affinity_labels(image: np.ndarray, cams: np.ndarray, classes: Sequence[int],
                             saliency: np.ndarray, saliency_threshold: float = 0.10,
                             fg_threshold: float = 0.40, crf_cfg: CrfConfig | None = None,
                             gt_prob: float = 0.7) -> np.ndarray:
    """Affinity labels with a saliency map in place of the low CAM threshold (P-NOC's
    `make_affinity_labels` with saliency, C²AM-H).

    image (H, W, 3) uint8, cams (n, H, W) in [0, 1] of `classes`, saliency S (H, W) in
    [0, 1]. salient = CRF(S > saliency_threshold) (2 labels); foreground =
    CRF(salient ⊙ argmax over [fg_threshold, cams]) (background + the classes). Returns
    (H, W) uint8: the foreground's class where it has one; 0 where both the foreground and
    the salient map say background; 255 (unsure) where the CRF'd saliency keeps a pixel
    that no class map claims confidently.
    """
    cfg = crf_cfg or IRN_LABEL_CRF
    cams = np.asarray(cams, np.float32)
    saliency = np.asarray(saliency, np.float32)
    if saliency.shape != cams.shape[1:] or saliency.shape != image.shape[:2]:
        raise ValueError(f"saliency {saliency.shape}, cams {cams.shape[1:]} and image "
                         f"{image.shape[:2]} differ in size")
    keys = np.concatenate([[0], np.asarray(classes, np.int64)]).astype(np.uint8)
    salient = crf_from_labels(image, (saliency > saliency_threshold).astype(np.int64), 2,
                              cfg, gt_prob)
    scores = np.concatenate([np.full((1,) + cams.shape[1:], fg_threshold, np.float32), cams])
    fg = keys[crf_from_labels(image, salient * scores.argmax(0), len(keys), cfg, gt_prob)]
    out = np.where(fg > 0, fg, UNSURE).astype(np.uint8)
    out[(fg == 0) & (salient == 0)] = 0
    return out


def labels_at_stride(label_map: np.ndarray, stride: int = 4) -> np.ndarray:
    """Nearest downsampling of a label map (H, W) to (ceil(H/s), ceil(W/s)), the size of a
    backbone's stride-s features, sampling each cell's centre pixel (labels must not be
    interpolated: 0 and 255 would blend into a class)."""
    h, w = label_map.shape
    ys = np.minimum(np.arange(0, h, stride) + stride // 2, h - 1)
    xs = np.minimum(np.arange(0, w, stride) + stride // 2, w - 1)
    return label_map[np.ix_(ys, xs)]


def pair_offsets(radius: int) -> np.ndarray:
    """The forward half-disk of `radius`: (P, 2) int64 offsets (dy, dx).

    (0, x) for 1 <= x < r, then (y, x) for 1 <= y < r, -r < x < r, row by row, with
    x² + y² < r² (IRN's search directions; 34 at r = 5). Each unordered pair of pixels
    closer than r is the pair (i, i + offset) for exactly one pixel i and offset: the
    opposite offset is never listed. (IRN stores the same set regrouped by path length;
    the order only has to agree between the label, affinity and walk tensors.)
    """
    offsets = [(0, x) for x in range(1, radius)]
    offsets += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius)
                if x * x + y * y < radius * radius]
    return np.asarray(offsets, np.int64).reshape(-1, 2)


def segment_pixels(offset: Sequence[int]) -> np.ndarray:
    """Pixels on the segment from (0, 0) to `offset` = (dy, dx): (L, 2) int64, source
    first, destination last.

    A pixel (y, x) is on the segment when it lies in the bounding box of the two ends and
    its distance to the straight line through them is below one pixel:
    (dy·x − dx·y)² / (dy² + dx²) < 1 (IRN's PathIndex). Horizontal and vertical offsets
    give the straight run of pixels; a diagonal (1, 1) gives all four pixels of its box.
    """
    dy, dx = int(offset[0]), int(offset[1])
    length_sq = dy * dy + dx * dx
    pixels = [(y, x)
              for y in range(min(0, dy), max(0, dy) + 1)
              for x in range(min(0, dx), max(0, dx) + 1)
              if (dy * x - dx * y) ** 2 < length_sq]
    pixels.sort(key=lambda p: abs(p[0]) + abs(p[1]))
    return np.asarray(pixels, np.int64)


def destination_inside(shape: tuple[int, int], offsets: np.ndarray) -> np.ndarray:
    """(P, h, w) bool: whether pixel (y, x) + offsets[p] lies inside an (h, w) image."""
    h, w = shape
    ys = np.arange(h)[None, :, None] + offsets[:, 0, None, None]
    xs = np.arange(w)[None, None, :] + offsets[:, 1, None, None]
    return (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)


def shifted(values: np.ndarray, offset: Sequence[int], fill) -> np.ndarray:
    """values (..., h, w) -> out with out[..., y, x] = values[..., y + dy, x + dx], `fill`
    where that lies outside."""
    dy, dx = int(offset[0]), int(offset[1])
    h, w = values.shape[-2:]
    out = np.full_like(values, fill)
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        values[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def pair_labels(label_map: np.ndarray, offsets: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair labels from a label map at the affinity resolution (stride 4).

    label_map: (h, w) uint8 (0 background, classes, 255 unsure); offsets: (P, 2).
    Returns (bg_pos, fg_pos, neg), each (P, h, w) bool, at the source pixel of each pair
    (i, i + offset): bg_pos where both ends are 0, fg_pos where both are the same class
    > 0, neg where the labels differ; all False where either end is 255 or the
    destination is outside the image (sources are not cropped: the full (h, w) grid is
    kept so the tensors line up with `path_max_affinity`).
    """
    src = np.asarray(label_map)[None]
    dst = np.stack([shifted(src[0], o, UNSURE) for o in offsets])
    valid = (src != UNSURE) & (dst != UNSURE)
    same = valid & (src == dst)
    return same & (src == 0), same & (src > 0), valid & (src != dst)

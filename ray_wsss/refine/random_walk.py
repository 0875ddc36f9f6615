"""Random walk of class maps over learned affinities, and its masks.

AffinityNet (Ahn and Kwak, "Learning Pixel-level Semantic Affinity with Image-level
Supervision", CVPR 2018) and IRN (Ahn, Cho and Kwak, "Weakly Supervised Learning of
Instance Segmentation with Inter-pixel Relations", CVPR 2019) spread each class map over
the pixels it is related to. With the N pixels at stride 4 and the pairs of
`refine.affinity.pair_offsets(r)`:

    A    (N, N) symmetric: A_ij = a_ij for every pair, A_ii = 1, 0 elsewhere
    A_β  = A ** β element-wise (β = 10 sharpens: weak affinities stop conducting)
    T    = A_β D⁻¹, D = diag of the column sums (each column of T sums to 1)
    rw_c = v_c T^t, t = 256 steps

so each step replaces a pixel's value by the A_β-weighted mean over its neighbourhood.
IRN builds T densely and squares it log2(t) times (`dense_random_walk`: N² memory, N³
work per squaring: 0.5 GiB and ~26 TFLOP for a 500×375 photo). `random_walk` does the
same t steps as a gather over the 2P + 1 neighbours of each pixel (P offsets each way and
the pixel itself), done as 2P + 1 multiply-adds of shifted views: O((2P + 1) N) work per
step and memory, never an N×N matrix, with the same result up to rounding.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _weights(affinity: torch.Tensor, offsets: np.ndarray, beta: float) -> torch.Tensor:
    """A_β per pair at its source pixel: (..., P, h, w), 0 where the destination is
    outside."""
    h, w = affinity.shape[-2:]
    inside = torch.zeros(affinity.shape[-3:], dtype=torch.bool, device=affinity.device)
    for p, (dy, dx) in enumerate(offsets):
        inside[p, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = True
    return torch.where(inside, affinity.clamp(0, 1) ** beta, torch.zeros_like(affinity))


def transition_weights(affinity: torch.Tensor, offsets, beta: float = 10.0
                       ) -> tuple[np.ndarray, torch.Tensor]:
    """The non-zeros of T as planes: (shifts (2P + 1, 2) int, weights (..., 2P + 1, h, w))
    with T[j + shifts[k], j] = weights[..., k, j] for every pixel j = (y, x).

    affinity: (..., P, h, w) with affinity[..., p, y, x] = a between (y, x) and
    (y, x) + offsets[p] (a leading batch dimension: one T per image). Column j of T holds
    the pixel itself (shift (0, 0), A_jj = 1), its P forward neighbours j + o_p
    (a(j, j + o_p)^β) and its P backward neighbours j − o_p (the same pair seen from its
    other end, a(j − o_p, j)^β, which is what makes A symmetric), all divided by the
    column sum (D⁻¹). Neighbours outside the image have weight 0.
    """
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    h, w = affinity.shape[-2:]
    fwd = _weights(affinity, offsets, beta)                      # A(j, j + o) at j
    # A(j - o, j) is stored at source j - o: move each plane forward by its offset
    bwd = torch.zeros_like(fwd)
    for p, (dy, dx) in enumerate(offsets):
        bwd[..., p, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
            fwd[..., p, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    weights = torch.cat([torch.ones_like(fwd[..., :1, :, :]), fwd, bwd], -3)
    shifts = np.concatenate([np.zeros((1, 2), np.int64), offsets, -offsets])
    return shifts, weights / weights.sum(-3, keepdim=True)


@torch.no_grad()
def random_walk(maps: torch.Tensor, affinity: torch.Tensor, offsets, beta: float = 10.0,
                steps: int = 256, boundary: torch.Tensor | None = None) -> torch.Tensor:
    """Walk class maps over the affinities: rw_c = v_c T^steps, sparsely.

    maps: (n, h, w) float (the n classes, and a background map if you walk one);
    affinity: (P, h, w) in [0, 1] over `offsets` (P, 2) (`models.affinity.path_max_affinity`
    for one image); boundary: optional (h, w) boundary map, IRN's v_c = M_c ⊙ (1 − B).
    Or a batch of images of one size: maps (B, n, h, w), affinity (B, P, h, w), boundary
    (B, h, w), each image walked over its own T (images with fewer classes padded with
    zero maps, which stay zero): one pass of 2P + 1 operations per step for the batch,
    where a GPU would otherwise wait on the launches of many small ones.
    Returns maps' shape, dtype and device (CPU or CUDA). Not differentiable.

    Each step is (v T)_j = Σ_k weights[k, j] · v_{j + shifts[k]} (`transition_weights`):
    2P + 1 multiply-adds of shifted views of a zero-padded copy of the n maps, all maps
    at once, like a convolution whose kernel changes from pixel to pixel. Work
    O((2P + 1) n N) per step, memory O((2P + 1) N + n N).
    """
    batched = maps.dim() == 4
    if not batched:
        maps, affinity = maps[None], affinity[None]
        boundary = None if boundary is None else boundary[None]
    if affinity.dim() != 4 or affinity.shape[0] != maps.shape[0]:
        raise ValueError(f"affinity {tuple(affinity.shape)} does not match maps "
                         f"{tuple(maps.shape)}")
    b, n, h, w = maps.shape
    v = maps if boundary is None else maps * (1 - boundary.to(maps)[:, None])
    shifts, weights = transition_weights(affinity.to(maps), offsets, beta)
    weights = weights[:, :, None]                                 # (B, K, 1, h, w)
    r = int(np.abs(shifts).max()) if len(shifts) else 0
    padded = v.new_zeros(b, n, h + 2 * r, w + 2 * r)             # pad stays 0: weight 0 there
    inner = padded[..., r:r + h, r:r + w]
    inner.copy_(v)
    views = [padded[..., r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in shifts]
    out = torch.empty_like(v)
    for _ in range(steps):
        # in place: one (B, n, h, w) buffer each, no per-step allocation
        torch.mul(weights[:, 0], views[0], out=out)
        for k in range(1, len(views)):
            out.addcmul_(weights[:, k], views[k])
        inner.copy_(out)
    walked = inner.clone()
    return walked if batched else walked[0]


@torch.no_grad()
def dense_random_walk(maps: torch.Tensor, affinity: torch.Tensor, offsets,
                      beta: float = 10.0, steps: int = 256,
                      boundary: torch.Tensor | None = None) -> torch.Tensor:
    """IRN's formulation, for tests and benchmarks only: the dense (N, N) A with self-loops,
    A ** β, T = A_β / column sums, T squared log2(steps) times (any other `steps`: a
    matrix power), then v T. Same arguments and result as `random_walk`; N² memory."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    n, h, w = maps.shape
    v = maps if boundary is None else maps * (1 - boundary.to(maps))
    fwd = _weights(affinity.to(maps), offsets, beta)
    pixels = h * w
    a = torch.eye(pixels, dtype=maps.dtype, device=maps.device)
    src = torch.arange(pixels, device=maps.device).view(h, w)
    for p, (dy, dx) in enumerate(offsets):
        ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
        i = src[ys, xs].reshape(-1)
        j = (src[ys, xs] + dy * w + dx).reshape(-1)
        a[i, j] = fwd[p, ys, xs].reshape(-1)
        a[j, i] = fwd[p, ys, xs].reshape(-1)
    trans = a / a.sum(0, keepdim=True)
    del a
    if steps > 0 and steps & (steps - 1) == 0:
        for _ in range(steps.bit_length() - 1):
            trans = trans @ trans
    else:
        trans = torch.linalg.matrix_power(trans, steps)
    return (v.reshape(n, pixels) @ trans).reshape(n, h, w)


def walk_to_mask(walked: torch.Tensor, classes: Sequence[int],
                 background_threshold: float = 0.25, walked_background: bool = False,
                 background: bool = True, size: tuple[int, int] | None = None,
                 stride: int = 4) -> np.ndarray:
    """Label map from walked maps.

    walked: (n, h, w) from `random_walk` at stride `stride`, one map per entry of
    `classes` (ints 1..K), preceded by the walked background map when
    `walked_background`. size: the image's (H, W): the maps are upsampled ×stride
    (bilinear) and cropped to it; None keeps (h, w). Returns (H, W) uint8.

    - IRN (default): the maps are divided by their global maximum over classes and
      pixels, and a pixel is background unless some class beats the constant
      `background_threshold` (0.25).
    - `walked_background`: walked[0] is a background map that was walked with the classes
      (AffinityNet's (1 − max_c M_c)^α, `refine.seeds.background_score(cams, 0, α)`); it
      competes in the argmax directly, no threshold.
    - `background=False` (no background class): the argmax over the classes.
    """
    classes = np.asarray(classes, np.int64)
    walked = torch.as_tensor(walked).float()
    if size is not None:
        walked = F.interpolate(walked[None], scale_factor=stride, mode="bilinear",
                               align_corners=False)[0, :, :size[0], :size[1]]
    shape = tuple(walked.shape[-2:])
    if not background:
        if len(classes) == 0:
            raise ValueError("walk_to_mask: background=False needs at least one class")
        return classes[walked.argmax(0).cpu().numpy()].astype(np.uint8)
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    if walked_background:
        if len(walked) != len(classes) + 1:
            raise ValueError(f"walk_to_mask: walked_background needs {len(classes) + 1} "
                             f"maps (background + classes), got {len(walked)}")
        return keys[walked.argmax(0).cpu().numpy()]
    if len(classes) == 0:
        return np.zeros(shape, np.uint8)
    walked = walked / walked.max().clamp(min=1e-12)
    plane = torch.full((1,) + shape, background_threshold, dtype=walked.dtype,
                       device=walked.device)
    # argmax keeps the first maximum: a tie with the threshold is background, as in IRN
    return keys[torch.cat([plane, walked]).argmax(0).cpu().numpy()]

"""Faithfulness of explaining maps by removing pixels in the order a map ranks them.

- ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution
  Methods", ICML 2022): at each percentage p of `road_percentiles`, the p% most relevant
  pixels (MoRF) or the p% least relevant (LeRF) are replaced by the noisy linear
  imputation of their neighbours: each removed pixel equals the weighted mean of its 8
  neighbours inside the image (weights 1/6 for the 4 direct ones, 1/12 for the
  diagonals; neighbours that are removed too are unknowns of the same linear system),
  plus N(0, (`road_noise` * 255)^2). Replacing by neighbours instead of a constant keeps
  the removed region's shape from telling the classifier where it was ("debias").
  Reported: the class probability after removal, averaged over the percentages, for MoRF
  (lower is more faithful) and LeRF (higher is more faithful), and their difference
  (LeRF - MoRF) / 2 (higher is better; pytorch-grad-cam's ROADCombined).
- Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018): the class probability as the
  most relevant pixels are replaced by the model's input mean (deletion; the same
  "nothing" as the XAI metrics of xai.py), or are put back into a copy blurred with a
  Gaussian of `insertion_blur` pixels (insertion), at fractions 0, 1/n, ..., 1
  (n = `curve_steps`); the area under each curve (trapezoids; lower is better for
  deletion, higher for insertion).

Every number is over (image, class) pairs, the class's sigmoid probability in percent.
Pixels are ranked by the map (the map of one class, at the image's size); ties are
broken by a fixed random order (seeded), so a flat map removes pixels in a scattered
order rather than row by row.

The imputation solves, for all removed pixels of many masks at once, the sparse
system with conjugate gradients in torch (no SciPy; it runs on the GPU too), started from
the solution at half resolution (recursively), which leaves few iterations at full size.
It stops at a root-mean-square residual of 0.01 grey level; on 160 x 160 images with
CAM-shaped holes that is about 0.4 grey level on average (a few at worst) from the exact
solution, well below the noise ROAD then adds (std 2.55).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass(frozen=True)
class FaithfulnessOptions:
    road_percentiles: tuple[float, ...] = (10, 30, 50, 70, 90)   # empty: no ROAD
    road_noise: float = 0.01       # imputation noise std, fraction of the 0..255 range
    curve_steps: int = 10          # deletion / insertion at fractions 0, 1/n, ..., 1
    insertion_blur: float = 5.0    # Gaussian sigma (pixels) of insertion's start image
    seed: int = 0                  # tie-breaking order and imputation noise
    forward_batch: int = 32        # images per forward pass

    def check(self) -> None:
        if not all(0 < p < 100 for p in self.road_percentiles):
            raise ConfigError(f"explain.road_percentiles: each must lie in (0, 100), got "
                              f"{list(self.road_percentiles)}")
        if self.curve_steps < 1:
            raise ConfigError(f"explain.curve_steps: must be >= 1, got {self.curve_steps}")


# ---------------------------------------------------------------- noisy linear imputation

def _neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """sum_j w_j v(neighbour j) over the 8 neighbours inside the image: (..., H, W).
    The weights are ([1 2 1]^T [1 2 1] - 4 delta) / 12, so two [1 2 1] passes do it."""
    q = F.pad(v, (1, 1, 1, 1))
    a = q[..., :-2, :] + q[..., 2:, :] + 2 * q[..., 1:-1, :]                  # (..., H, W + 2)
    b = a[..., :-2] + a[..., 2:] + 2 * a[..., 1:-1]
    return b.sub_(v, alpha=4).div_(12)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (image, channel) dot product over the pixels: (N, C, H, W) -> (N, C, 1, 1)."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[:, :, None, None]


def _conjugate_gradients(x: torch.Tensor, known: torch.Tensor, start: torch.Tensor,
                         tol: float, max_iter: int) -> torch.Tensor:
    """Solve d_i v_i - sum_{j removed} w_ij v_j = sum_{j known} w_ij x_j for the removed
    pixels i of every (image, channel), d_i the sum of i's neighbour weights inside the
    image (symmetric positive definite when each removed region touches a known pixel).
    Stops when every system's root-mean-square residual is below `tol` (grey levels)."""
    removed = 1 - known
    d = _neighbour_sum(torch.ones_like(known))

    def apply(p):  # p is 0 on known pixels
        return (d * p).sub_(_neighbour_sum(p)).mul_(removed)

    v = removed * start
    r = (removed * _neighbour_sum(known * x)).sub_(apply(v))
    rs = _dot(r, r)
    limit = tol * tol * x.shape[2] * x.shape[3]
    active = rs > limit
    p = r * active
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # a converged system stops moving (p = 0) while the others go on
        ap = apply(p)
        pap = _dot(p, ap)
        ok = active & (pap > 0)
        alpha = torch.where(ok, rs / torch.where(ok, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        v.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        rs_new = _dot(r, r)
        beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        active = ok & (rs_new > limit)
        p.mul_(beta).add_(r).mul_(active)
        rs = rs_new
    return v


def linear_imputation(images: torch.Tensor, known: torch.Tensor, tol: float = 0.01,
                      max_iter: int = 2000, min_side: int = 8) -> torch.Tensor:
    """images (N, C, H, W) float, known (N, 1, H, W) 1 where kept, 0 where removed ->
    images with every removed pixel the weighted mean of its neighbours (no noise)."""
    x = images.to(torch.float64) if images.dtype == torch.float64 else images.float()
    known = known.to(x.dtype).expand(-1, 1, -1, -1)
    h, w = x.shape[2:]
    if min(h, w) >= 2 * min_side:
        # a coarse pixel is known where any of its 2x2 children is, at their mean
        kc = F.avg_pool2d(known, 2, ceil_mode=True)
        xc = F.avg_pool2d(known * x, 2, ceil_mode=True) / kc.clamp(min=1e-12)
        coarse = linear_imputation(xc, (kc > 0).to(x.dtype), tol, max_iter, min_side)
        start = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    else:
        start = torch.zeros_like(x)
    v = _conjugate_gradients(x, known, start, tol, max_iter)
    return (known * x + (1 - known) * v).to(images.dtype)


def noisy_linear_imputation(images: torch.Tensor, known: torch.Tensor, noise: float,
                            generator: torch.Generator | None = None,
                            normal: torch.Tensor | None = None) -> torch.Tensor:
    """ROAD's imputation: `linear_imputation` plus N(0, (noise * 255)^2) on removed pixels
    (`normal`: the standard normal draws to use, shaped as images; else drawn here)."""
    out = linear_imputation(images, known)
    if noise > 0:
        if normal is None:
            normal = torch.randn(out.shape, generator=generator, device=out.device,
                                 dtype=out.dtype)
        out = out + (1 - known.to(out.dtype)) * normal.to(out.dtype) * (noise * 255)
    return out


# ---------------------------------------------------------------- ranking and curves

def relevance_rank(m: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rank (H, W) int64 of every pixel, 0 = most relevant; ties in a fixed random order."""
    flat = np.asarray(m, np.float64).ravel()
    tiebreak = np.random.default_rng(seed).permutation(flat.size)
    order = np.lexsort((tiebreak, -flat))
    rank = np.empty(flat.size, np.int64)
    rank[order] = np.arange(flat.size)
    return rank.reshape(np.shape(m))


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian, kernel 2 ceil(3 sigma) + 1, reflected borders (OpenCV's default)."""
    if sigma <= 0:
        return images
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    c = images.shape[1]
    pad_h, pad_w = min(radius, images.shape[2] - 1), min(radius, images.shape[3] - 1)
    x = images
    if pad_w:
        x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect")
        kw = k[radius - pad_w: radius + pad_w + 1]
        kw = kw / kw.sum()          # an image narrower than the kernel: truncated, renormalised
        x = F.conv2d(x, kw.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    if pad_h:
        x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect")
        kh = k[radius - pad_h: radius + pad_h + 1]
        kh = kh / kh.sum()
        x = F.conv2d(x, kh.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return x


def curve_area(values: np.ndarray) -> np.ndarray:
    """Trapezoid area over fractions 0..1 of curves sampled at equal steps (..., n + 1)."""
    n = values.shape[-1] - 1
    return (values.sum(-1) - (values[..., 0] + values[..., -1]) / 2) / n


def _probs(model, x: torch.Tensor, batch: int) -> np.ndarray:
    """Sigmoid outputs (N, K) float64 of images (N, 3, H, W), `batch` per forward."""
    if len(x) == 0:
        return np.zeros((0, model.num_classes))
    return torch.cat([torch.sigmoid(model(x[i:i + batch])) for i in range(0, len(x), batch)]
                     ).double().cpu().numpy()


def sums_length(opts: FaithfulnessOptions) -> int:
    """Length of `faithfulness_sums`'s vector."""
    return 1 + 2 * len(opts.road_percentiles) + 2 * (opts.curve_steps + 1)


@torch.no_grad()
def faithfulness_sums(model, image: torch.Tensor, maps: np.ndarray, classes: np.ndarray,
                      opts: FaithfulnessOptions = FaithfulnessOptions()) -> np.ndarray:
    """One image (1, 3, H, W) float 0..255, its maps (|C|, H, W) of the 0-based classes C.
    Returns float64 sums over its pairs: [pairs, MoRF probability per percentage, LeRF per
    percentage, deletion curve (n + 1 points), insertion curve (n + 1)]."""
    out = np.zeros(sums_length(opts))
    classes = np.asarray(classes, np.int64)
    if len(classes) == 0:
        return out
    _, _, h, w = image.shape
    n_pix = h * w
    device = image.device
    percents = torch.tensor([p / 100 for p in opts.road_percentiles], device=device)
    steps = opts.curve_steps
    fractions = torch.arange(steps + 1, device=device, dtype=torch.float64) / steps
    removed_road = torch.round(percents.double() * n_pix).long()             # (P,)
    removed_curve = torch.round(fractions * n_pix).long()                     # (n + 1,)
    ranks = torch.from_numpy(np.stack([relevance_rank(m, opts.seed) for m in maps])
                             ).to(device).view(len(classes), 1, h, w)
    # ROAD: MoRF removes rank < n, LeRF removes rank >= N - n; 1 = kept
    morf = (ranks[:, None] >= removed_road[None, :, None, None, None]).flatten(0, 1)
    lerf = (ranks[:, None] < (n_pix - removed_road)[None, :, None, None, None]).flatten(0, 1)
    known = torch.cat([morf, lerf]).to(image.dtype)                           # (2 P |C|, 1, H, W)
    # one noise draw per (order, percentage), the same for every class: a pair's numbers
    # do not depend on the image's other classes
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    normal = torch.randn((2, 1, len(percents), *image.shape[1:]), generator=gen,
                         device=device, dtype=image.dtype)
    normal = normal.expand(-1, len(classes), -1, -1, -1, -1).flatten(0, 2)
    step = opts.forward_batch
    road = [_probs(model, noisy_linear_imputation(
        image.expand(len(known[i:i + step]), -1, -1, -1), known[i:i + step], opts.road_noise,
        normal=normal[i:i + step]), step) for i in range(0, len(known), step)]
    road = np.concatenate(road) if road else np.zeros((0, model.num_classes))
    # deletion / insertion: the interior fractions per pair, the ends once per image
    inner = removed_curve[1:-1]
    top = (ranks[:, None] < inner[None, :, None, None, None]).flatten(0, 1).to(image.dtype)
    mean = model.mean[:, :image.shape[1]].to(image.dtype)
    blurred = _gaussian_blur(image, opts.insertion_blur)
    ends = _probs(model, torch.cat([image, mean.expand_as(image), blurred]), step)
    deleted = _probs(model, image + top * (mean - image), step)
    inserted = _probs(model, blurred + top * (image - blurred), step)
    full, empty, start = ends
    k, p, m = len(classes), len(opts.road_percentiles), steps - 1
    n_out = full.shape[-1]   # explicit: with 1 curve step or no percentage a part is empty
    road_p = road.reshape(2, k, p, n_out)
    del_p = deleted.reshape(k, m, n_out)
    ins_p = inserted.reshape(k, m, n_out)
    for j, c in enumerate(classes):
        deletion = np.concatenate([[full[c]], del_p[j, :, c], [empty[c]]])
        insertion = np.concatenate([[start[c]], ins_p[j, :, c], [full[c]]])
        out += np.concatenate([[1], road_p[0, j, :, c], road_p[1, j, :, c], deletion,
                               insertion])
    return out


def faithfulness_metrics(sums: np.ndarray, opts: FaithfulnessOptions = FaithfulnessOptions()
                         ) -> dict:
    """Sums of `faithfulness_sums` -> percentages: road_morf, road_lerf, road_combined,
    deletion_auc, insertion_auc, and the mean curves (deletion_curve, insertion_curve,
    road_morf_curve, road_lerf_curve)."""
    n = sums[0]
    p, s = len(opts.road_percentiles), opts.curve_steps + 1
    if not n:
        nan = float("nan")
        return {k: nan for k in ("road_morf", "road_lerf", "road_combined", "deletion_auc",
                                 "insertion_auc")}
    mean = 100 * sums[1:] / n
    morf, lerf = mean[:p], mean[p:2 * p]
    deletion, insertion = mean[2 * p:2 * p + s], mean[2 * p + s:2 * p + 2 * s]
    nan = float("nan")
    morf_mean = float(morf.mean()) if p else nan   # no percentages: ROAD is off
    lerf_mean = float(lerf.mean()) if p else nan
    return {"road_morf": morf_mean, "road_lerf": lerf_mean,
            "road_combined": (lerf_mean - morf_mean) / 2,
            "deletion_auc": float(curve_area(deletion)),
            "insertion_auc": float(curve_area(insertion)),
            "road_morf_curve": morf.tolist(), "road_lerf_curve": lerf.tolist(),
            "deletion_curve": deletion.tolist(), "insertion_curve": insertion.tolist()}


def faithfulness_options(section, seed: int = 0) -> FaithfulnessOptions:
    """FaithfulnessOptions from a config section (explain): the fields it has, defaults
    for the others."""
    names = FaithfulnessOptions.__dataclass_fields__
    values = {k: getattr(section, k) for k in names if hasattr(section, k)}
    values.setdefault("seed", seed)
    if "road_percentiles" in values:
        values["road_percentiles"] = tuple(values["road_percentiles"])
    opts = FaithfulnessOptions(**values)
    opts.check()
    return opts


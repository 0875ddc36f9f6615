"""Explaining methods: class maps of a batch at one scale, all classes at once.

A method is `fn(model, images, classes, opts) -> (maps, logits)`: images (B, 3, h, w)
float 0..255, classes (B, K) 0/1: the maps wanted, which are also the set D of the
MinMax methods (the image's labels in the CAM stage, its detected classes when
explaining predictions); maps (B, K, h', w') >= 0, zero where not wanted; logits (B, K).
Test-time augmentation and normalisation are `tta.py`'s job.

- `cam` (Zhou et al., CVPR 2016): M_c = ReLU(sum_k W_ck A_k).
- `gradcam` (Selvaraju et al., ICCV 2017): alpha_k^c = mean_xy ds_c/dA_k(x, y).
- `gradcampp` (Chattopadhay et al., WACV 2018): alpha_k^c = sum_xy a ReLU(g),
  a = g^2 / (2 g^2 + sum_ab A_k(a, b) g^3), g = ds_c/dA_k.
- `scorecam` (Wang et al., CVPRW 2020): the weight of A_k is the softmax over k of s_c on
  the input masked by the min-max normalised, upsampled A_k.
- `minmax`, `d-minmax`, `minmax-gradcam` (David, Pedrini and Dias, 2022): the weights of
  class u minus those of the other classes in D (and, for D-MinMax, a background term).

Gradient methods need ds/dA only, so the backbone runs once without autograd and only
the head is differentiated, for all requested classes in one batched backward
(`is_grads_batched`). CAM and the MinMax family need no backward at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MethodOptions:
    lambda_pos: float = 1.0
    lambda_neg: float = 1.0
    lambda_bg: float = 1.0
    scorecam_batch: int = 64      # masked images per forward pass
    grad_chunk: int = 8           # classes per batched backward (bounds memory)


Method = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _features(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.features(images)


def _maps(feats: torch.Tensor, weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k w_{b,u,k} A_{b,k}) for weights (K, C) shared or (B, K, C) per image."""
    eq = "bchw,kc->bkhw" if weights.dim() == 2 else "bchw,bkc->bkhw"
    return F.relu(torch.einsum(eq, feats, weights)) * classes[:, :, None, None]


def cam(model, images, classes, opts: MethodOptions = MethodOptions()):
    feats = _features(model, images)
    with torch.no_grad():
        return _maps(feats, model.head_weight(), classes), model.logits_from_features(feats)


def _others(classes: torch.Tensor) -> torch.Tensor:
    """max(|D| - 1, 1) per image: (B, 1, 1)."""
    return (classes.sum(1) - 1).clamp(min=1)[:, None, None]


def minmax(model, images, classes, opts: MethodOptions = MethodOptions()):
    """w_u = l_pos W_u - l_neg / max(|D|-1, 1) * sum_{d in D, d != u} W_d."""
    feats = _features(model, images)
    with torch.no_grad():
        w = model.head_weight()                                   # (K, C)
        total = classes @ w                                       # (B, C): sum over D
        weights = (opts.lambda_pos * w[None]
                   - opts.lambda_neg * (total[:, None] - w[None] * classes[:, :, None])
                   / _others(classes))
        return _maps(feats, weights, classes), model.logits_from_features(feats)


def d_minmax(model, images, classes, opts: MethodOptions = MethodOptions()):
    """w_u = l_pos ReLU(W_u) - l_neg ReLU(sum_{D \\ u} W_d) / max(|D|-1, 1)
    + l_bg min(0, sum_D W_d) / max(|D|, 1)."""
    feats = _features(model, images)
    with torch.no_grad():
        w = model.head_weight()
        total = classes @ w                                       # (B, C)
        rest = total[:, None] - w[None] * classes[:, :, None]     # (B, K, C): D without u
        n = classes.sum(1).clamp(min=1)[:, None, None]
        weights = (opts.lambda_pos * F.relu(w)[None]
                   - opts.lambda_neg * F.relu(rest) / _others(classes)
                   + opts.lambda_bg * torch.clamp(total, max=0)[:, None] / n)
        return _maps(feats, weights, classes), model.logits_from_features(feats)


def head_weights(model, feats: torch.Tensor, coeffs: torch.Tensor, weights_fn,
                 chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel weights from d(sum_j coeffs[j, b, :] . s_b)/dA_b for every job j, in
    batched backwards of `chunk` jobs; each chunk's gradients are turned into weights
    by `weights_fn(grads, feats)` and dropped, so memory holds one chunk of gradients.

    feats (B, C, h, w), coeffs (J, B, K) -> weights (J, B, C), logits (B, K)."""
    f = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.logits_from_features(f)
        parts = []
        for i in range(0, coeffs.shape[0], chunk):
            c = coeffs[i:i + chunk]
            (g,) = torch.autograd.grad(logits, f, grad_outputs=c, is_grads_batched=True,
                                       retain_graph=True)
            parts.append(weights_fn(g, feats))
            del g
    weights = torch.cat(parts) if parts else f.new_zeros((0, *f.shape[:2]))
    return weights, logits.detach()


def _grad_method(weights_fn, objective: str = "plain"):
    def method(model, images, classes, opts: MethodOptions = MethodOptions()):
        feats = _features(model, images)
        wanted = torch.nonzero(classes.any(0)).flatten()          # the classes to explain
        b, k = classes.shape
        coeffs = torch.zeros(len(wanted), b, k, device=images.device, dtype=feats.dtype)
        for j, u in enumerate(wanted.tolist()):
            if objective == "minmax":
                # J_u = l_pos s_u - l_neg / max(|D|-1, 1) * sum_{d in D, d != u} s_d
                others = classes.clone()
                others[:, u] = 0
                coeffs[j] = -opts.lambda_neg * others / _others(classes)[:, :, 0]
            coeffs[j, :, u] = opts.lambda_pos if objective == "minmax" else 1.0
        alpha, logits = head_weights(model, feats, coeffs, weights_fn, opts.grad_chunk)
        maps = torch.zeros(b, k, *feats.shape[2:], device=images.device, dtype=feats.dtype)
        if len(wanted):
            m = F.relu(torch.einsum("bchw,jbc->jbhw", feats, alpha))
            maps[:, wanted] = m.permute(1, 0, 2, 3)
        return maps * classes[:, :, None, None], logits
    return method


def _gradcam_weights(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return grads.mean(dim=(3, 4))


def _gradcampp_weights(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    g2 = grads.pow(2)
    denom = 2 * g2 + feats.sum(dim=(2, 3))[None, :, :, None, None] * g2 * grads
    a = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                    torch.zeros_like(g2))
    return (a * F.relu(grads)).sum(dim=(3, 4))


gradcam = _grad_method(_gradcam_weights)
gradcampp = _grad_method(_gradcampp_weights)
minmax_gradcam = _grad_method(_gradcam_weights, objective="minmax")


def scorecam(model, images, classes, opts: MethodOptions = MethodOptions()):
    feats = _features(model, images)
    b, c = feats.shape[:2]
    h, w = images.shape[2:]
    k = classes.shape[1]
    maps = torch.zeros(b, k, *feats.shape[2:], device=images.device, dtype=feats.dtype)
    with torch.no_grad():
        logits = model.logits_from_features(feats)
        for i in range(b):
            wanted = torch.nonzero(classes[i]).flatten()
            if len(wanted) == 0:
                continue
            up = F.interpolate(feats[i:i + 1], size=(h, w), mode="bilinear",
                               align_corners=False)[0]            # (C, H, W)
            lo = up.amin(dim=(1, 2), keepdim=True)
            hi = up.amax(dim=(1, 2), keepdim=True)
            masks = torch.where(hi > lo, (up - lo) / (hi - lo).clamp(min=1e-12),
                                torch.zeros_like(up))
            scores = []
            for j in range(0, c, opts.scorecam_batch):
                m = masks[j:j + opts.scorecam_batch, None]        # (n, 1, H, W)
                masked = model.mean + (images[i:i + 1] - model.mean) * m
                scores.append(model(masked)[:, wanted])           # (n, |wanted|)
            weights = torch.softmax(torch.cat(scores), dim=0)     # over channels k
            maps[i, wanted] = F.relu(torch.einsum("chw,cu->uhw", feats[i], weights))
    return maps, logits


METHODS: dict[str, Method] = {
    "cam": cam,
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "scorecam": scorecam,
    "minmax": minmax,
    "d-minmax": d_minmax,
    "minmax-gradcam": minmax_gradcam,
}


def get_method(name: str) -> Method:
    from ..errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"cams.method: unknown {name!r} (choose one of {', '.join(METHODS)})")
    return METHODS[name]

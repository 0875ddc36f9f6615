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
- `hirescam` (Draelos and Carin, 2020): M_c = ReLU(sum_k ds_c/dA_k (.) A_k), element-wise,
  no spatial averaging of the gradient.
- `xgradcam` (Fu et al., BMVC 2020): alpha_k^c = sum_xy A_k(x, y) / (sum_ab A_k(a, b))
  ds_c/dA_k(x, y).
- `layercam` (Jiang et al., TIP 2021): M_c = ReLU(sum_k ReLU(ds_c/dA_k) (.) A_k) at the last
  stage; `layercam-fused` fuses it over every backbone stage (`gradients.py`).
- `eigencam` (Muhammad and Yeasin, IJCNN 2020): the projection of the centred features
  (positions x channels) on their first principal direction; the same map for every
  class. `eigengradcam`: the same on A (.) ds_c/dA, so per class.
- `ablationcam` (Desai and Ramaswamy, WACV 2020): alpha_k^c = (s_c - s_c(A with A_k = 0))
  / s_c.
- `gradient`, `smoothgrad`, `fullgrad`: maps from gradients with respect to the input
  pixels (`gradients.py`).

Gradient methods on A need ds/dA only, so the backbone runs once without autograd and
only the head is differentiated, for all requested classes in one batched backward
(`is_grads_batched`): job j of that backward gives every image the gradient of its own
j-th wanted class (`class_objectives`), so a batch needs as many jobs as the most
classes one image wants. CAM and the MinMax family need no backward at all. Eigen-CAM's
principal directions come from one batched SVD over the images (and, for Eigen-Grad-CAM,
the classes); Ablation-CAM runs the head on `ablation_batch` copies of the features at a
time, each with one channel of one image zeroed, and reads every class's score change
from the same forward.

The sign of a principal direction is arbitrary; Eigen-CAM and Eigen-Grad-CAM orient it
so that its channel weights sum to >= 0, which makes the projection correlate positively
with the total activation (sum_k A_k, or for Eigen-Grad-CAM the HiResCAM map before its
ReLU); the ReLU then keeps its positive side. Reference code leaves the sign to the SVD,
so a map can come out inverted. Ablation-CAM sets the ablated channel to zero, as the
paper does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import gradients


@dataclass(frozen=True)
class MethodOptions:
    lambda_pos: float = 1.0
    lambda_neg: float = 1.0
    lambda_bg: float = 1.0
    scorecam_batch: int = 64      # masked images per forward pass
    grad_chunk: int = 8           # classes per batched backward (bounds memory)
    ablation_batch: int = 256     # Ablation-CAM: feature copies per forward of the head
    layercam_gamma: float = 2.0   # fused LayerCAM: tanh(gamma M / max M) per stage (eq. 9)
    smoothgrad_samples: int = 16  # noisy copies per image (the paper uses up to 50)
    smoothgrad_noise: float = 0.15  # noise std / (max - min) of the image (paper: 0.1-0.2)
    seed: int = 0                 # SmoothGrad's noise


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
    """What `weights_fn(grads, feats)` makes of d(sum_j coeffs[j, b, :] . s_b)/dA_b for
    every job j (channel weights (j, B, C), or maps (j, B, h, w)), in batched backwards of
    `chunk` jobs; each chunk's gradients are dropped once reduced, so memory holds one
    chunk of gradients.

    feats (B, C, h, w), coeffs (J, B, K) -> weights (J, B, ...), logits (B, K)."""
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


def class_objectives(classes: torch.Tensor, objective: str = "plain",
                     opts: MethodOptions = MethodOptions()) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward jobs for the (image, class) pairs wanted, packed: job j of image b explains
    the j-th class that image b wants, so J = the most classes one image wants (not the
    number of classes the batch wants: an image's rows for the others' classes would be
    differentiated for nothing). Images are independent, so one backward of
    sum_b coeffs[j, b] . s_b gives every image its own class's gradient.

    Returns index (J, B) long, the class of each job (-1: none), and coeffs (J, B, K) of
    the objective whose gradient explains class u of image b: s_u, or for `minmax`
    J_u = l_pos s_u - l_neg / max(|D|-1, 1) * sum_{d in D, d != u} s_d."""
    wants = classes > 0
    b, k = classes.shape
    n = int(wants.sum(1).max()) if b else 0
    index = torch.full((n, b), -1, dtype=torch.long, device=classes.device)
    coeffs = torch.zeros(n, b, k, device=classes.device, dtype=classes.dtype)
    for i in range(b):
        cs = torch.nonzero(wants[i]).flatten()
        index[:len(cs), i] = cs
        for j, u in enumerate(cs.tolist()):
            if objective == "minmax":
                others = wants[i].to(classes.dtype)
                others[u] = 0
                coeffs[j, i] = -opts.lambda_neg * others / max(int(wants[i].sum()) - 1, 1)
                coeffs[j, i, u] = opts.lambda_pos
            else:
                coeffs[j, i, u] = 1.0
    return index, coeffs


def scatter_maps(per_job: torch.Tensor, index: torch.Tensor, classes: torch.Tensor
                 ) -> torch.Tensor:
    """ReLU'd maps of the jobs of `class_objectives` (J, B, h, w) -> (B, K, h, w), zero
    where an image does not want the class."""
    b, k = classes.shape
    maps = per_job.new_zeros((b, k, *per_job.shape[2:]))
    j, i = torch.nonzero(index >= 0, as_tuple=True)
    maps[i, index[j, i]] = F.relu(per_job[j, i])
    return maps


def _grad_method(weights_fn, objective: str = "plain"):
    """Methods with channel weights from ds/dA: M = ReLU(sum_k alpha_k A_k)."""
    def method(model, images, classes, opts: MethodOptions = MethodOptions()):
        feats = _features(model, images)
        index, coeffs = class_objectives(classes.to(feats.dtype), objective, opts)
        alpha, logits = head_weights(model, feats, coeffs, weights_fn, opts.grad_chunk)
        m = torch.einsum("bchw,jbc->jbhw", feats, alpha)
        return scatter_maps(m, index, classes), logits
    return method


def _grad_map_method(maps_fn):
    """Methods whose map comes from ds/dA and A position by position (before the ReLU):
    `maps_fn(grads (j, B, C, h, w), feats (B, C, h, w)) -> (j, B, h, w)`."""
    def method(model, images, classes, opts: MethodOptions = MethodOptions()):
        feats = _features(model, images)
        index, coeffs = class_objectives(classes.to(feats.dtype))
        if not len(index):
            with torch.no_grad():
                return (feats.new_zeros((*classes.shape, *feats.shape[2:])),
                        model.logits_from_features(feats))
        m, logits = head_weights(model, feats, coeffs, maps_fn, opts.grad_chunk)
        return scatter_maps(m, index, classes), logits
    return method


def _gradcam_weights(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return grads.mean(dim=(3, 4))


def _gradcampp_weights(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    g2 = grads.pow(2)
    denom = 2 * g2 + feats.sum(dim=(2, 3))[None, :, :, None, None] * g2 * grads
    a = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                    torch.zeros_like(g2))
    return (a * F.relu(grads)).sum(dim=(3, 4))


def _xgradcam_weights(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """sum_xy A_k / sum_ab A_k * g; a channel that sums to 0 gets weight 0 (the reference
    adds 1e-7 to the sum instead)."""
    total = feats.sum(dim=(2, 3))                                 # (B, C)
    num = (grads * feats[None]).sum(dim=(3, 4))                   # (j, B, C)
    return torch.where(total != 0, num / torch.where(total != 0, total, torch.ones_like(total)),
                       torch.zeros_like(num))


def _hirescam_maps(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return (grads * feats[None]).sum(dim=2)


def _layercam_maps(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return (F.relu(grads) * feats[None]).sum(dim=2)


def first_component(x: torch.Tensor) -> torch.Tensor:
    """Per map set (N, C, h, w): the projection (N, h, w) of the centred (hw, C) matrix on
    its first right singular vector, oriented so that the vector's entries sum to >= 0."""
    n, c, h, w = x.shape
    m = x.flatten(2).transpose(1, 2)                              # (N, hw, C)
    m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    v = vh[:, 0]                                                  # (N, C)
    v = torch.where(v.sum(dim=1, keepdim=True) < 0, -v, v)
    return (m @ v[:, :, None]).view(n, h, w)


def _eigengradcam_maps(grads: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    prod = grads * feats[None]                                    # (j, B, C, h, w)
    return first_component(prod.flatten(0, 1)).view(*prod.shape[:2], *prod.shape[3:])


gradcam = _grad_method(_gradcam_weights)
gradcampp = _grad_method(_gradcampp_weights)
minmax_gradcam = _grad_method(_gradcam_weights, objective="minmax")
xgradcam = _grad_method(_xgradcam_weights)
hirescam = _grad_map_method(_hirescam_maps)
layercam = _grad_map_method(_layercam_maps)
eigengradcam = _grad_map_method(_eigengradcam_maps)


def eigencam(model, images, classes, opts: MethodOptions = MethodOptions()):
    feats = _features(model, images)
    with torch.no_grad():
        m = F.relu(first_component(feats))[:, None]               # (B, 1, h, w)
        return m * classes[:, :, None, None].to(m.dtype), model.logits_from_features(feats)


def ablationcam(model, images, classes, opts: MethodOptions = MethodOptions()):
    """All classes' score drops from the same ablated forwards: the head runs on
    `ablation_batch` copies of the features at a time, copy (b, k) with channel k of
    image b zeroed (images that want no class are skipped)."""
    feats = _features(model, images)
    b, c = feats.shape[:2]
    with torch.no_grad():
        logits = model.logits_from_features(feats)
        drops = feats.new_zeros((b, c, logits.shape[1]))          # s - s(A_k = 0)
        pairs = torch.cartesian_prod(torch.nonzero(classes.any(1)).flatten(),
                                     torch.arange(c)).to(feats.device)
        for i in range(0, len(pairs), opts.ablation_batch):
            img, ch = pairs[i:i + opts.ablation_batch].unbind(1)
            ablated = feats[img].clone()
            ablated[torch.arange(len(img), device=feats.device), ch] = 0
            drops[img, ch] = logits[img] - model.logits_from_features(ablated)
        score = logits[:, None, :]
        alpha = torch.where(score != 0, drops / torch.where(score != 0, score,
                                                            torch.ones_like(score)),
                            torch.zeros_like(drops))              # (B, C, K)
        maps = F.relu(torch.einsum("bchw,bck->bkhw", feats, alpha))
        return maps * classes[:, :, None, None].to(maps.dtype), logits


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
    "hirescam": hirescam,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "layercam-fused": gradients.layercam_fused,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
    "ablationcam": ablationcam,
    "gradient": gradients.gradient,
    "smoothgrad": gradients.smoothgrad,
    "fullgrad": gradients.fullgrad,
}


def get_method(name: str) -> Method:
    from ..errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"cams.method: unknown {name!r} (choose one of {', '.join(METHODS)})")
    return METHODS[name]

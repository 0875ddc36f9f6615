"""Losses of the semi-weak mode: class-aware cross entropy, the tag loss on the global max
pooling of class maps, and the pseudo net's running IoU that weighs what the hybrid net
learns from it.

Following "Learning pseudo labels for semi-and-weakly supervised semantic segmentation"
(Pattern Recognition 2022):

    CCE:   p_c = y_c e^{z_c} / Σ_k y_k e^{z_k}   (y: 1 for background and the image's
           classes, 0 otherwise),   loss = −log p_target, pixels of 255 ignored
    tags:  BCE(max_{x,y} z_c(x, y), t_c) over the foreground classes c = 1..K
    J_c:   TP_c / (T_c + P_c − TP_c), counters TP, T (target pixels), P (predicted
           pixels) decayed as n ← m n + n_batch (m = 0.99) and summed over all workers
    w_i:   (min over the classes c of image i of J_c) ** 8

The decay's scale cancels in the ratio J_c, so `m n + n_batch` and the exponential
average `m n + (1 − m) n_batch` give the same J.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def allowed_labels(label_vector: torch.Tensor, background: bool) -> torch.Tensor:
    """label_vector (B, K) multi-hot -> (B, K + 1) bool: the labels an image may take,
    background (label 0) where the dataset has one, and its classes 1..K."""
    lv = label_vector > 0
    bg = torch.full((lv.shape[0], 1), background, dtype=torch.bool, device=lv.device)
    return torch.cat([bg, lv], dim=1)


def _with_target_labels(allowed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`allowed` plus every label the target holds (a ground-truth mask may hold a class
    its tags lack; its pixels must not get probability 0, an infinite loss)."""
    b, n = allowed.shape
    t = target.reshape(b, -1).long()
    valid = t != IGNORE
    idx = torch.where(valid, t, torch.zeros_like(t)).clamp(max=n - 1)
    present = torch.zeros(b, n, device=t.device, dtype=torch.float32)
    present.scatter_add_(1, idx, valid.float())
    return allowed | (present > 0)


def restrict(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits (B, L, H, W) with the labels an image may not take set to -inf."""
    return logits.masked_fill(~allowed[:, :, None, None], float("-inf"))


def class_aware_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                              allowed: torch.Tensor,
                              image_weights: torch.Tensor | None = None,
                              class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """CCE: cross entropy of the softmax restricted to each image's `allowed` labels.

    logits (B, L, H, W), target (B, H, W) in 0..L-1 or 255 (ignored), allowed (B, L)
    bool. Without `image_weights`: the mean over the valid pixels of the batch (as
    `F.cross_entropy`). With image_weights (B,): each image's mean over its valid pixels,
    times its weight, averaged over the images (an image without a valid pixel adds 0).
    `class_weights` (L,): each pixel weighs its target's weight, and the means are
    weighted means (as `F.cross_entropy(weight=...)`)."""
    target = target.long()
    masked = restrict(logits, _with_target_labels(allowed, target))
    if image_weights is None:
        return F.cross_entropy(masked, target, weight=class_weights, ignore_index=IGNORE)
    per_pixel = F.cross_entropy(masked, target, weight=class_weights, ignore_index=IGNORE,
                                reduction="none")
    # per_pixel is 0 on ignored pixels and carries its class weight on the others
    valid = (target != IGNORE).flatten(1).float()
    if class_weights is not None:
        valid = valid * class_weights[torch.where(target == IGNORE, 0, target)].flatten(1)
    per_image = per_pixel.flatten(1).sum(1) / valid.sum(1).clamp(min=1e-12)
    return (per_image * image_weights.to(per_image.dtype)).mean()


def restricted_argmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The label-restricted prediction: (B, L, H, W) -> (B, H, W) int64, the argmax over
    each image's allowed labels only."""
    return restrict(logits, allowed).argmax(1)


def tag_loss(logits: torch.Tensor, label_vector: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE on the global max pooling of the class maps: logits (B, K + 1, H,
    W) (label 0 = background, left out), label_vector (B, K)."""
    pooled = logits[:, 1:].amax(dim=(2, 3))
    return F.binary_cross_entropy_with_logits(pooled, label_vector.float())


class RunningIoU:
    """J_c of the pseudo net on the pixel-labelled half: per label, decayed counters of
    true positives, target pixels and predicted pixels, each batch's counts summed over
    the workers of the process group (when one is initialised) before they are added,
    so every worker holds the same J and the weights agree across DDP ranks."""

    def __init__(self, num_labels: int, momentum: float = 0.99, device="cpu"):
        self.num_labels, self.momentum = num_labels, momentum
        # float64: the decayed sums of many pixels keep their precision
        self.counts = torch.zeros(3, num_labels, dtype=torch.float64, device=device)

    def to(self, device) -> "RunningIoU":
        self.counts = self.counts.to(device)
        return self

    def batch_counts(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(3, L) float64: TP, target and predicted pixels per label (pixels whose
        target is 255 left out) of this process's batch."""
        n = self.num_labels
        valid = target != IGNORE
        t, p = target[valid].long(), pred[valid].long()
        tp = torch.bincount(t[t == p], minlength=n)[:n]
        return torch.stack([tp, torch.bincount(t, minlength=n)[:n],
                            torch.bincount(p, minlength=n)[:n]]).to(torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch (pred, target: (B, H, W)); a collective call under DDP: every
        worker must call it the same number of times."""
        import torch.distributed as dist

        counts = self.batch_counts(pred, target).to(self.counts.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.counts = self.momentum * self.counts + counts

    def iou(self) -> torch.Tensor:
        """J (L,) float64; 0 for a label not seen yet (no evidence: no trust)."""
        tp, t, p = self.counts
        union = t + p - tp
        return torch.where(union > 0, tp / union.clamp(min=1e-12), torch.zeros_like(tp))

    def image_weights(self, label_vector: torch.Tensor, power: float) -> torch.Tensor:
        """(B,) float32: (min over each image's classes of J_c) ** power; label_vector
        (B, K) over the classes 1..K. An image without a class gets 0."""
        j = self.iou()[1:].to(label_vector.device)
        has = label_vector > 0
        worst = torch.where(has, j[None, :].expand_as(has), torch.full_like(j, 2.0)[None])
        worst = worst.min(1).values
        return torch.where(worst <= 1, worst.clamp(min=0) ** power,
                           torch.zeros_like(worst)).float()

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu(), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].to(self.counts.device, torch.float64)

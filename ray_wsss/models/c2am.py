"""C²AM: a class-agnostic activation map learned contrastively, with CAM hints (C²AM-H).

Xie, Xiang, Chen, Zeng and Shen, "C2AM: Contrastive learning of Class-agnostic
Activation Map for Weakly Supervised Object Localization and Semantic Segmentation"
(CVPR 2022); the hints are P-NOC's (David, Pedrini and Dias 2024, `ccam/train_hints`).

A one-channel head (3x3 conv, BatchNorm) over backbone features f (B, C, h, w) gives
A = σ(logits) (B, 1, h, w); per image

    v_fg = mean over pixels of A f,    v_bg = mean over pixels of (1 − A) f     (B, C).

Across the batch, with s the cosine similarity clamped to [0.0005, 0.9995]:

    L_pull(x) = mean over pairs i ≠ j of  w_ij · (−log s(x_i, x_j)),
                w_ij = exp(−α · rank_i(j))   (rank 0: the most similar j to i),
    L_push    = mean over fg–bg pairs of  −log(1 − s(v_fg_i, v_bg_j)),
    L         = L_pull(fg) + L_pull(bg) + L_push.

CCAM computes the same ranks with i itself in the row (its similarity 0.9995 always
ranks first, and `rank − 1` makes the next one 0): the weights of the other pairs are
the same here, and the self-pair's constant term is left out. Both sides learn without
labels, so which of A and 1 − A is the object is arbitrary; the hint term fixes it:

    L_hint = mean over pixels with max CAM ≥ t_fg of BCE(A, 1 − ε/2)

(ε = 0.1, binary label smoothing y(1 − ε) + ε/2; P-NOC's final recipe uses foreground
hints only, an earlier script of theirs also pulled A to 0 where the CAM is < 0.1:
`bg_threshold` here, off by default). Without hints, CCAM picks the polarity after
training by its border rule: objects rarely fill the border, so a map whose mean on
the border exceeds 0.5 is inverted (`polarity` −1, saved with the weights).

A memory of past embeddings (`EmbeddingMemory`, detached, as MoCo's queue) gives the
pull and push terms more pairs than a small CPU batch has.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .classifier import build_backbone
from .registry import save_model

SIM_MIN, SIM_MAX = 0.0005, 0.9995   # CCAM's clamp: keeps both logs finite


class C2AM(nn.Module):
    """Backbone + one-channel activation head.

    `forward(images: (B, 3, H, W) float RGB 0..255) -> (fg (B, C), bg (B, C),
    logits (B, 1, h, w))`; `activation(images)` -> A (B, 1, h, w) in [0, 1].
    f is the last two backbone stages concatenated (CCAM: ResNet layer3 + layer4), the
    earlier one area-pooled to the last one's size where they differ. The backbone
    learns (CCAM fine-tunes it) but its BatchNorm statistics stay frozen: the batches
    here can be a handful of images."""

    def __init__(self, backbone: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        channels = sum(backbone.stage_channels[-2:])
        self.head = nn.Conv2d(channels, 1, 3, padding=1, bias=False)
        self.head_norm = nn.BatchNorm2d(1)
        # +1, or −1 where the fitted map came out inverted (no hints): saved with weights
        self.register_buffer("polarity", torch.ones(1))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "C2AM":
        super().train(mode)
        self.backbone.eval()   # frozen BatchNorm statistics; the weights still learn
        return self

    def parameter_groups(self, head_lr_multiplier: float) -> list[dict]:
        """The optimizer's groups: backbone at the base rate, the head (from scratch) at
        `head_lr_multiplier` times it (CCAM: x10)."""
        return [{"params": list(self.backbone.parameters()), "lr_scale": 1.0},
                {"params": list(self.head.parameters()) + list(self.head_norm.parameters()),
                 "lr_scale": head_lr_multiplier}]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        stages = self.backbone.forward_stages((images[:, :3] - self.mean) / self.std)
        early, last = stages[-2], stages[-1]
        if early.shape[-2:] != last.shape[-2:]:
            early = F.adaptive_avg_pool2d(early, last.shape[-2:])
        return torch.cat([last, early], 1)

    def logits_of(self, feats: torch.Tensor) -> torch.Tensor:
        return self.polarity * self.head_norm(self.head(feats))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_of(self.features(images))

    def forward(self, images: torch.Tensor):
        feats = self.features(images)
        logits = self.logits_of(feats)
        return (*pooled_embeddings(feats, torch.sigmoid(logits)), logits)

    def activation(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(images))


def pooled_embeddings(feats: torch.Tensor, a: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """feats (B, C, h, w), A (B, 1, h, w) -> (v_fg, v_bg), each (B, C): the means over
    the pixels of A f and of (1 − A) f."""
    return (a * feats).mean((2, 3)), ((1 - a) * feats).mean((2, 3))


def build_c2am(cfg: ModelConfig, pretrained: bool = True) -> C2AM:
    """A C2AM on the backbone that `cfg` names (ImageNet weights when `pretrained` and
    `cfg.pretrained` say so)."""
    backbone, mean, std = build_backbone(cfg, 3, pretrained)
    return C2AM(backbone, mean, std)


def save_c2am(model: C2AM, cfg: ModelConfig, directory: str, extra: dict | None = None
              ) -> None:
    """Write model.pt + model.json (kind "c2am") into `directory`."""
    spec = {"backbone": cfg.backbone, "output_stride": cfg.output_stride, **(extra or {})}
    spec["kind"] = "c2am"  # what load_model dispatches on: extra must not change it
    save_model(model, directory, spec)


# ---------------------------------------------------------------- losses

def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (N, C) x (M, C) -> (N, M), clamped to [SIM_MIN, SIM_MAX]."""
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).clamp(SIM_MIN, SIM_MAX)


def rank_weights(sim: torch.Tensor, alpha: float, valid: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """exp(−alpha · rank) per row: rank 0 for the row's most similar entry, 1 for the
    next... Entries outside `valid` (bool, same shape) rank after every valid one."""
    key = sim.detach() if valid is None else sim.detach().masked_fill(~valid, float("-inf"))
    order = key.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    return torch.exp(-alpha * rank.to(sim.dtype))


def pull_loss(x: torch.Tensor, memory: torch.Tensor | None = None, alpha: float = 0.25
              ) -> torch.Tensor:
    """Rank-weighted −log s over the pairs (x_i, y) with y any other row of x or any row
    of `memory` (detached past embeddings). x (N, C), memory (M, C). 0 without pairs."""
    keys = x if memory is None or not len(memory) else torch.cat([x, memory.to(x)])
    n = x.shape[0]
    if keys.shape[0] < 2:
        return x.sum() * 0
    sim = similarity(x, keys)
    valid = torch.ones_like(sim, dtype=torch.bool)
    valid[torch.arange(n), torch.arange(n)] = False   # i with itself
    loss = -torch.log(sim) * rank_weights(sim, alpha, valid)
    return loss[valid].mean()


def push_loss(fg: torch.Tensor, bg: torch.Tensor, fg_memory: torch.Tensor | None = None,
              bg_memory: torch.Tensor | None = None) -> torch.Tensor:
    """Mean −log(1 − s) over fg–bg pairs with at least one side from the batch: every
    v_fg_i with every v_bg (batch and memory), every v_bg_i with every remembered v_fg."""
    bgs = bg if bg_memory is None or not len(bg_memory) else torch.cat([bg, bg_memory.to(bg)])
    terms = [-torch.log(1 - similarity(fg, bgs)).flatten()]
    if fg_memory is not None and len(fg_memory):
        terms.append(-torch.log(1 - similarity(bg, fg_memory.to(bg))).flatten())
    return torch.cat(terms).mean()


def contrastive_loss(fg: torch.Tensor, bg: torch.Tensor, fg_memory: torch.Tensor | None = None,
                     bg_memory: torch.Tensor | None = None, alpha: float = 0.25
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """C²AM's loss: (total, {"fg_pull", "bg_pull", "push"}), total their sum."""
    parts = {"fg_pull": pull_loss(fg, fg_memory, alpha),
             "bg_pull": pull_loss(bg, bg_memory, alpha),
             "push": push_loss(fg, bg, fg_memory, bg_memory)}
    return parts["fg_pull"] + parts["bg_pull"] + parts["push"], parts


def hint_loss(logits: torch.Tensor, hints: torch.Tensor, fg_threshold: float = 0.4,
              smoothing: float = 0.1, bg_threshold: float | None = None) -> torch.Tensor:
    """C²AM-H's hint term. logits (B, 1, h, w) before the sigmoid; hints (B, 1, H, W): the
    classifier's max CAM in [0, 1], area-resized to (h, w). BCE towards 1 − smoothing/2
    where hints >= fg_threshold (and towards smoothing/2 where hints < bg_threshold, if
    given), averaged over those pixels; 0 where there are none."""
    if hints.shape[-2:] != logits.shape[-2:]:
        hints = F.interpolate(hints.to(logits.dtype), size=logits.shape[-2:], mode="area")
    fg = hints >= fg_threshold
    target = torch.zeros_like(logits)
    target[fg] = 1 - smoothing / 2
    chosen = fg
    if bg_threshold is not None:
        bg = hints < bg_threshold
        target[bg] = smoothing / 2
        chosen = fg | bg
    if not chosen.any():
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits[chosen], target[chosen])


def border_activation(a: torch.Tensor) -> torch.Tensor:
    """Mean of A (B, 1, h, w) over the outermost rows and columns of each map (CCAM's
    polarity check: an object map is low on the border)."""
    border = torch.ones(a.shape[-2:], dtype=torch.bool, device=a.device)
    border[1:-1, 1:-1] = False
    return a[..., border].mean()


class EmbeddingMemory:
    """The last `size` (detached) fg and bg embeddings of this worker, oldest dropped
    first: extra partners for the pull and push terms."""

    def __init__(self, size: int):
        self.size = size
        self._fg: deque = deque(maxlen=max(size, 1))
        self._bg: deque = deque(maxlen=max(size, 1))

    def add(self, fg: torch.Tensor, bg: torch.Tensor) -> None:
        if self.size <= 0:
            return
        for f, b in zip(fg.detach(), bg.detach()):
            self._fg.append(f)
            self._bg.append(b)

    def get(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self._fg:
            return None, None
        return torch.stack(list(self._fg)), torch.stack(list(self._bg))

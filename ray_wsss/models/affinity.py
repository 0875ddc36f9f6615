"""IRN's class-boundary branch and the affinities it implies.

Ahn, Cho and Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
Relations" (CVPR 2019), the successor of AffinityNet (Ahn and Kwak, CVPR 2018). A frozen
backbone's stage features go through small trainable heads to a boundary map
B (B, 1, h, w) in [0, 1] at stride 4. The affinity of two pixels i, j is
a_ij = 1 − max of B over the pixels on the segment from i to j
(`ray_wsss.refine.affinity.segment_pixels`), so two pixels are related unless a boundary
separates them. Training needs only pair labels (`refine.affinity.pair_labels`):

    L = ¼ L_bg+ + ¼ L_fg+ + ½ L_neg,
    L_+ = −mean log(a_ij) over its positive pairs,  L_neg = −mean log(1 − a_ij).

IRN's displacement branch (instances) is left out: semantic masks need only B.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..refine.affinity import segment_pixels
from .classifier import build_backbone
from .registry import save_model

EPS = 1e-5  # IRN's: keeps log finite at a = 0 or 1 without moving its optimum


class AffinityNet(nn.Module):
    """Boundary network on a frozen backbone.

    `forward(images: (B, 3, H, W) float RGB 0..255) -> boundary (B, 1, h, w)` in [0, 1]
    with (h, w) the size of the backbone's stride-4 stage (ceil(H/4), ceil(W/4) for the
    ResNets); `boundary_logits` gives the values before the sigmoid.

    Every stage that `backbone.forward_stages` returns gets a 1x1 conv to 32 channels,
    GroupNorm(4) and ReLU; the results are upsampled (bilinear) to the first stage's size,
    concatenated and mapped to one channel by a 1x1 conv. IRN uses five ResNet-50 stages
    (the stem at stride 4 as well, 160 channels); this package's backbones expose four
    (ResNets: strides 4, 8, 16|8, output stride) or three (EfficientNet-Lite: 4, 8,
    output stride), so the concatenation has 32 × that many channels. As in IRN the
    upsampling comes before the ReLU.

    The backbone is frozen: no gradients, BatchNorm always in eval mode (its statistics
    stay those of its pretraining); `train()` only switches the heads.
    """

    def __init__(self, backbone: nn.Module, mean, std, channels: int = 32, groups: int = 4):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.stage_heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), nn.GroupNorm(groups, channels))
            for c in backbone.stage_channels)
        self.fuse = nn.Conv2d(channels * len(backbone.stage_channels), 1, 1, bias=True)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def boundary_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            stages = self.backbone.forward_stages((images - self.mean) / self.std)
        size = stages[0].shape[-2:]
        feats = []
        for head, x in zip(self.stage_heads, stages):
            x = head(x)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            feats.append(F.relu(x))
        return self.fuse(torch.cat(feats, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.boundary_logits(images))


def build_affinity_net(cfg: ModelConfig, pretrained: bool = True,
                       channels: int = 32) -> AffinityNet:
    """An AffinityNet on the backbone that `cfg` names (ImageNet weights when
    `cfg.pretrained` says so; IRN starts from ImageNet, not from the CAM classifier)."""
    backbone, mean, std = build_backbone(cfg, 3, pretrained)
    return AffinityNet(backbone, mean, std, channels)


def save_affinity_net(model: AffinityNet, cfg: ModelConfig, directory: str,
                      extra: dict | None = None) -> None:
    """Write model.pt + model.json (kind "affinity") into `directory` (a path or URI).
    The state dict holds the frozen backbone too: the saved model needs nothing else."""
    model = getattr(model, "module", model)  # unwrap DDP
    spec = {"kind": "affinity", "backbone": cfg.backbone, "output_stride": cfg.output_stride,
            "channels": model.fuse.in_channels // len(model.stage_heads)}
    spec.update(extra or {})
    spec["kind"] = "affinity"  # what load_model dispatches on: extra must not change it
    save_model(model, directory, spec)


def path_max_affinity(boundary: torch.Tensor, offsets) -> torch.Tensor:
    """Affinities from a boundary map: boundary (B, 1, h, w) in [0, 1], offsets (P, 2)
    -> (B, P, h, w) with out[b, p, y, x] = 1 − max of boundary[b, 0] over the pixels on the
    segment from (y, x) to (y + dy_p, x + dx_p), both ends included
    (`refine.affinity.segment_pixels`); 0 where the destination is outside the image.

    Differentiable in `boundary` (the max passes its gradient to the maximal pixels).
    Offsets are processed in groups of equal segment length, one gather and one max per
    group, as IRN's path indices do.
    """
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    b, _, h, w = boundary.shape
    r = int(np.abs(offsets).max()) if len(offsets) else 0
    # Padding with 1 (a certain boundary) makes every pair that leaves the image get
    # affinity 0, as IRN's padding does, with no separate mask.
    padded = F.pad(boundary[:, 0], (r, r, r, r), value=1.0)
    paths = [segment_pixels(o) for o in offsets]
    # every distinct relative pixel once: shifted views of the padded map
    coords = sorted({tuple(p) for path in paths for p in path})
    where = {c: i for i, c in enumerate(coords)}
    views = torch.stack([padded[:, r + y:r + y + h, r + x:r + x + w] for y, x in coords], 1)
    out = boundary.new_zeros(b, len(offsets), h, w)
    by_length: dict[int, list[int]] = {}
    for p, path in enumerate(paths):
        by_length.setdefault(len(path), []).append(p)
    for members in by_length.values():
        index = torch.tensor([[where[tuple(q)] for q in paths[p]] for p in members],
                             device=boundary.device)
        gathered = views[:, index.flatten()].view(b, len(members), index.shape[1], h, w)
        out[:, members] = 1 - gathered.amax(2)
    return out


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
                  neg: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IRN's affinity loss. aff: (B, P, h, w) in [0, 1]; bg_pos, fg_pos, neg: bool masks of
    the same shape (`refine.affinity.pair_labels`, batched).

    Returns (total, parts) with parts {"bg_pos", "fg_pos", "neg"} the three means and
    total = ¼ bg_pos + ¼ fg_pos + ½ neg. A term whose pair set is empty is 0.
    """
    def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(values.dtype)
        return (values * mask).sum() / mask.sum().clamp(min=1)

    pos = -torch.log(aff + EPS)
    negative = -torch.log(1 + EPS - aff)
    parts = {"bg_pos": masked_mean(pos, bg_pos), "fg_pos": masked_mean(pos, fg_pos),
             "neg": masked_mean(negative, neg)}
    total = parts["bg_pos"] / 4 + parts["fg_pos"] / 4 + parts["neg"] / 2
    return total, parts

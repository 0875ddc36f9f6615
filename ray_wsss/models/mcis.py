"""Cross-image co-attention (Sun et al., "Mining Cross-Image Semantics for Weakly Supervised
Semantic Segmentation", ECCV 2020).

For a pair of images (m, n) with features F_m (C x HW_m) and F_n (C x HW_n):

    P = F_m^T W_P F_n                      (HW_m x HW_n), W_P learnable (C x C)
    A = softmax of P over m's positions    (each column sums to 1)
    B = softmax of P over n's positions    (each row sums to 1)
    F'_n = F_m A      (what of m is at n's positions)     C x HW_n
    F'_m = F_n B^T    (what of n is at m's positions)     C x HW_m

A separate 1x1 head classifies co-attended features (against the classes the two images
share), and a gate h = sigmoid(conv1x1(F')) gives the complementary features
F'' = F (1 - h), classified against the classes one image has and the other lacks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CoAttention(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.W_P = nn.Linear(channels, channels, bias=False)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        self.gate = nn.Conv2d(channels, 1, 1, bias=False)
        nn.init.eye_(self.W_P.weight)  # start from plain feature similarity
        nn.init.kaiming_normal_(self.classifier.weight)
        nn.init.zeros_(self.gate.weight)

    def affinity(self, fm: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        """P = F_m^T W_P F_n: (B, HW_m, HW_n)."""
        return torch.bmm(self.W_P(fm.flatten(2).transpose(1, 2)), fn.flatten(2))

    def forward(self, fm: torch.Tensor, fn: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """fm (B, C, h_m, w_m), fn (B, C, h_n, w_n) -> co-attended (F'_m, F'_n), each on
        its own image's grid."""
        p = self.affinity(fm, fn)
        a = torch.softmax(p, dim=1)                     # over m's positions
        b = torch.softmax(p, dim=2)                     # over n's positions
        f_n = torch.bmm(fm.flatten(2), a).view_as(fn)   # C x HW_n
        f_m = torch.bmm(fn.flatten(2), b.transpose(1, 2)).view_as(fm)
        return f_m, f_n

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.classifier(feats), 1).flatten(1)

    def complement(self, own: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """F'' = F (1 - sigmoid(gate(F'))): what the other image does not explain."""
        return own * (1 - torch.sigmoid(self.gate(attended)))

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)

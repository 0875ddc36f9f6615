"""Explaining methods: class maps of a batch at one scale.

A method is `fn(model, images, classes) -> (maps, logits)`: images (B, 3, h, w) float
0..255, classes (B, K) bool (which maps are wanted), maps (B, K, h', w') float >= 0
(zero where not wanted), logits (B, K). Methods see one scale of one batch; test-time
augmentation and normalisation are `tta.py`'s job.

- `cam` (Zhou et al. 2016): M_c = ReLU(sum_k W_ck A_k); one forward pass for all classes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Method = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def cam(model, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.features(images)
    maps = F.relu(model.class_maps(feats)) * classes[:, :, None, None]
    return maps, model.logits_from_features(feats)


METHODS: dict[str, Method] = {"cam": cam}


def get_method(name: str) -> Method:
    from ..errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"cams.method: unknown {name!r} (choose one of {', '.join(METHODS)})")
    return METHODS[name]

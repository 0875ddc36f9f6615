"""Decoding and augmentation of image batches, run by Ray Data on CPU workers so that
training workers (GPUs) receive ready uint8 tensors.

Batches are Ray Data numpy batches: {"image": object array of encoded bytes,
"label_vector": (B, K) uint8, ...}. Outputs: {"image": (B, S, S, 3) uint8 RGB,
"label_vector": (B, K) uint8}.
"""
from __future__ import annotations

import cv2
import numpy as np

from .codecs import decode_image
from .dataset import label_matrix

PAD_VALUE = (124, 116, 104)  # about the ImageNet mean: padding looks like "nothing"


def random_scale_crop(img: np.ndarray, size: int, scale: float, rng: np.random.Generator
                      ) -> np.ndarray:
    """Rescale by `scale`, then take a random size x size crop (padding when smaller)."""
    h, w = img.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = np.empty((size, size, 3), np.uint8)
    out[:] = PAD_VALUE
    # crop window in the image and its place in the output
    cy = int(rng.integers(0, nh - size + 1)) if nh > size else 0
    cx = int(rng.integers(0, nw - size + 1)) if nw > size else 0
    oy = int(rng.integers(0, size - nh + 1)) if nh < size else 0
    ox = int(rng.integers(0, size - nw + 1)) if nw < size else 0
    ch, cw = min(size, nh), min(size, nw)
    out[oy:oy + ch, ox:ox + cw] = img[cy:cy + ch, cx:cx + cw]
    return out


def color_jitter(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], random order."""
    if strength <= 0:
        return img
    x = img.astype(np.float32)
    for op in rng.permutation(3):
        f = rng.uniform(1 - strength, 1 + strength)
        if op == 0:
            x = x * f
        elif op == 1:
            x = (x - x.mean()) * f + x.mean()
        else:
            gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
            x = (x - gray[..., None]) * f + gray[..., None]
    return x.clip(0, 255).astype(np.uint8)


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the longer side to `size` and pad to size x size (centred)."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.empty((size, size, 3), np.uint8)
    out[:] = PAD_VALUE
    oy, ox = (size - nh) // 2, (size - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = img
    return out


class TrainTransform:
    """Random scale, crop, horizontal flip and colour jitter (IRN / Puzzle-CAM style)."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.7, 1.3),
                 hflip: bool = True, color_jitter: float = 0.3, seed: int | None = None):
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.hflip = hflip
        self.jitter = color_jitter
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        # A fresh generator per batch: Ray Data ships one pickled copy of this object to
        # every task, so a generator kept on it would repeat the same draws every epoch.
        rng = np.random.default_rng(self.seed)
        out = np.empty((len(batch["image"]), self.crop_size, self.crop_size, 3), np.uint8)
        ids = batch.get("image_id")
        for i, data in enumerate(batch["image"]):
            img = decode_image(data, f"image_id {ids[i]}" if ids is not None else "image")
            scale = rng.uniform(*self.scale_range)
            img = random_scale_crop(img, self.crop_size, scale, rng)
            if self.hflip and rng.random() < 0.5:
                img = img[:, ::-1]
            out[i] = color_jitter(img, self.jitter, rng)
        return {"image": out, "label_vector": label_matrix(batch["label_vector"])}


class EvalTransform:
    """Letterbox to a fixed size, for batched validation."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict) -> dict:
        out = np.stack([letterbox(decode_image(d), self.size) for d in batch["image"]])
        return {"image": out, "label_vector": label_matrix(batch["label_vector"])}

"""Decoding and augmentation of image batches, run by Ray Data on CPU workers so that
training workers (GPUs) receive ready uint8 tensors.

Batches are Ray Data numpy batches: {"image": object array of encoded bytes,
"label_vector": (B, K) uint8, ...}. Outputs: {"image": (B, S, S, 3) uint8 RGB,
"label_vector": (B, K) uint8}.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import DataError
from .codecs import decode_image
from .dataset import label_matrix

PAD_VALUE = (124, 116, 104)  # about the ImageNet mean: padding looks like "nothing"


def pad_value(channels: int) -> np.ndarray:
    """PAD_VALUE for the colour channels, 0 for extra channels (the loop's prior)."""
    return np.array(list(PAD_VALUE) + [0] * (channels - 3), np.uint8)


def with_prior(image: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) image and (C, H, W) uint8 prior -> (H, W, 3 + C): the prior travels
    through every transform as extra channels, so it stays aligned with the image."""
    if prior is None:
        return image
    if prior.shape[1:] != image.shape[:2]:
        raise DataError(f"prior is {prior.shape[2]}x{prior.shape[1]}, the image "
                        f"{image.shape[1]}x{image.shape[0]}")
    return np.ascontiguousarray(np.concatenate([image, prior.transpose(1, 2, 0)], axis=2))


def resize_any(img: np.ndarray, size: tuple[int, int], interpolation) -> np.ndarray:
    """cv2.resize of any channel count: OpenCV drops a single channel's axis, and its
    area interpolation refuses more than 4 channels at a non-integer ratio (an image
    with the loop's per-class prior channels): those go 4 channels at a time."""
    if img.ndim == 3 and img.shape[2] > 4 and interpolation == cv2.INTER_AREA:
        return np.concatenate([resize_any(img[..., i:i + 4], size, interpolation)
                               for i in range(0, img.shape[2], 4)], axis=2)
    out = cv2.resize(img, size, interpolation=interpolation)
    return out[..., None] if out.ndim == 2 and img.ndim == 3 else out


def random_scale_crop(img: np.ndarray, size: int, scale: float, rng: np.random.Generator
                      ) -> np.ndarray:
    """Rescale by `scale`, then take a random size x size crop (padding when smaller).
    img: (H, W, C) with C >= 3 (extra channels padded with 0)."""
    h, w = img.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = resize_any(img, (nw, nh), cv2.INTER_LINEAR)
    out = np.empty((size, size, img.shape[2]), np.uint8)
    out[:] = pad_value(img.shape[2])
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
    if img.shape[2] > 3:  # only the colours: the prior channels are not a picture
        return np.concatenate([color_jitter(img[..., :3], strength, rng), img[..., 3:]], 2)
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
    img = resize_any(img, (nw, nh), cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.empty((size, size, img.shape[2]), np.uint8)
    out[:] = pad_value(img.shape[2])
    oy, ox = (size - nh) // 2, (size - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = img
    return out


class TrainTransform:
    """Random scale, crop, horizontal flip and colour jitter (IRN / Puzzle-CAM style)."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.7, 1.3),
                 hflip: bool = True, color_jitter: float = 0.3, seed: int | None = None,
                 prior_channels: int = 0):
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.hflip = hflip
        self.jitter = color_jitter
        self.seed = seed
        self.prior_channels = prior_channels  # the loop's prior, a `prior` column

    def __call__(self, batch: dict) -> dict:
        # A fresh generator per batch: Ray Data ships one pickled copy of this object to
        # every task, so a generator kept on it would repeat the same draws every epoch.
        rng = np.random.default_rng(self.seed)
        out = np.empty((len(batch["image"]), self.crop_size, self.crop_size,
                        3 + self.prior_channels), np.uint8)
        ids = batch.get("image_id")
        for i, data in enumerate(batch["image"]):
            where = f"image_id {ids[i]}" if ids is not None else "image"
            img = decode_image(data, where)
            if self.prior_channels:
                img = with_prior(img, decode_prior(batch["prior"][i], where))
            scale = rng.uniform(*self.scale_range)
            img = random_scale_crop(img, self.crop_size, scale, rng)
            if self.hflip and rng.random() < 0.5:
                img = img[:, ::-1]
            out[i] = color_jitter(img, self.jitter, rng)
        return {"image": out, "label_vector": label_matrix(batch["label_vector"])}


class EvalTransform:
    """Letterbox to a fixed size, for batched validation."""

    def __init__(self, size: int, prior_channels: int = 0):
        self.size = size
        self.prior_channels = prior_channels

    def __call__(self, batch: dict) -> dict:
        images = [decode_image(d) for d in batch["image"]]
        if self.prior_channels:
            images = [with_prior(img, decode_prior(p, "val image", img.shape[:2],
                                                   self.prior_channels))
                      for img, p in zip(images, batch["prior"])]
        out = np.stack([letterbox(img, self.size) for img in images])
        return {"image": out, "label_vector": label_matrix(batch["label_vector"])}


def decode_prior(data, where: str, size: tuple[int, int] | None = None,
                 channels: int = 1) -> np.ndarray:
    """The stored prior (.npy uint8 (C, H, W)); None (an image without one) reads as
    zeros of `size` when given."""
    from .codecs import decode_array

    if data is None:
        if size is None:
            raise DataError("no prior for this image (the prior step covers the previous "
                            "round's CAM splits)", row=where)
        return np.zeros((channels,) + tuple(size), np.uint8)
    return decode_array(data, f"prior of {where}").astype(np.uint8)


# ---------------------------------------------------------------- segmentation

def joint_scale_crop(image: np.ndarray, planes: list[np.ndarray], size: int, scale: float,
                     rng: np.random.Generator, fill: int = 255
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
    """`random_scale_crop` of an image and of label planes aligned with it (masks:
    nearest-neighbour, padded with `fill` = ignore). The same window for all."""
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    planes = [cv2.resize(p, (nw, nh), interpolation=cv2.INTER_NEAREST) for p in planes]
    out = np.empty((size, size, 3), np.uint8)
    out[:] = PAD_VALUE
    outs = [np.full((size, size), fill, p.dtype) for p in planes]
    cy = int(rng.integers(0, nh - size + 1)) if nh > size else 0
    cx = int(rng.integers(0, nw - size + 1)) if nw > size else 0
    oy = int(rng.integers(0, size - nh + 1)) if nh < size else 0
    ox = int(rng.integers(0, size - nw + 1)) if nw < size else 0
    ch, cw = min(size, nh), min(size, nw)
    out[oy:oy + ch, ox:ox + cw] = image[cy:cy + ch, cx:cx + cw]
    for o, p in zip(outs, planes):
        o[oy:oy + ch, ox:ox + cw] = p[cy:cy + ch, cx:cx + cw]
    return out, outs


def letterbox_mask(mask: np.ndarray, size: int, fill: int = 255) -> np.ndarray:
    """`letterbox` for a label map: nearest resize, padded with ignore."""
    h, w = mask.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    out = np.full((size, size), fill, np.uint8)
    oy, ox = (size - nh) // 2, (size - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = mask
    return out


def unsure_to_ignore(target: np.ndarray, cams: np.ndarray | None,
                     band: tuple[float, float] | None) -> np.ndarray:
    """Pixels whose highest CAM lies in [low, high) become 255: neither confident
    background nor confident foreground (the ignore band of AffinityNet's seeds)."""
    if band is None or cams is None or not len(cams):
        return target
    peak = cams.max(0)
    out = target.copy()
    out[(peak >= band[0]) & (peak < band[1])] = 255
    return out


class SegTrainTransform:
    """Segmentation training batches: the image and its target mask (PNG bytes, plus
    the CAMs for the unsure band when asked) decoded, then random rescale, crop,
    horizontal flip applied to both together, colour jitter to the image. Outputs
    {"image": (B, S, S, 3) uint8, "mask": (B, S, S) uint8, "label_vector": (B, K)}.
    `target` None (images known by their tags only): the mask is 0 on the image's
    pixels and 255 on the padding, so a loss can leave the padding out."""

    def __init__(self, crop_size: int, scale_range=(0.5, 2.0), hflip: bool = True,
                 color_jitter: float = 0.3, target: str | None = "pseudo_mask",
                 unsure_band: tuple[float, float] | None = None, seed: int | None = None):
        self.crop_size, self.scale_range, self.hflip = crop_size, scale_range, hflip
        self.jitter, self.target, self.band, self.seed = color_jitter, target, unsure_band, seed

    def __call__(self, batch: dict) -> dict:
        from .codecs import decode_array, decode_mask

        rng = np.random.default_rng(self.seed)  # a fresh one per batch (see TrainTransform)
        n, s = len(batch["image"]), self.crop_size
        images = np.empty((n, s, s, 3), np.uint8)
        masks = np.empty((n, s, s), np.uint8)
        for i, (data, image_id) in enumerate(zip(batch["image"], batch["image_id"])):
            where = f"image_id {image_id}"
            img = decode_image(data, where)
            if self.target is None:
                target = np.zeros(img.shape[:2], np.uint8)
            else:
                target = decode_mask(batch[self.target][i], f"{self.target} of {where}")
            if target.shape != img.shape[:2]:
                raise DataError(f"{self.target} is {target.shape[1]}x{target.shape[0]}, the "
                                f"image {img.shape[1]}x{img.shape[0]}", row=str(image_id))
            # (no CAM for a pixel-labelled image: its ground truth has no unsure band)
            if self.band is not None and "cam" in batch and batch["cam"][i] is not None:
                cams = decode_array(batch["cam"][i], f"cam of {where}").astype(np.float32)
                target = unsure_to_ignore(target, cams, self.band)
            img, (target,) = joint_scale_crop(img, [target], s, rng.uniform(*self.scale_range),
                                              rng)
            if self.hflip and rng.random() < 0.5:
                img, target = img[:, ::-1], target[:, ::-1]
            images[i] = color_jitter(img, self.jitter, rng)
            masks[i] = target
        return {"image": images, "mask": masks,
                "label_vector": label_matrix(batch["label_vector"])}


class SegEvalTransform:
    """Validation batches with ground truth: image and mask letterboxed to one size."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict) -> dict:
        from .codecs import decode_mask

        images = np.stack([letterbox(decode_image(d), self.size) for d in batch["image"]])
        masks = np.stack([letterbox_mask(decode_mask(m), self.size) for m in batch["mask"]])
        return {"image": images, "mask": masks}

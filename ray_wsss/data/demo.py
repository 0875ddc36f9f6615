"""The bundled demo dataset: seeded synthetic scenes with exact masks.

Six object classes that differ in shape, colour and texture, with colour ranges that
overlap between some classes so that shape and texture matter too. Every image holds 1
to 3 classes with 1 to 3 instances each, drawn in random order (so objects occlude each
other), some cut by the frame, on cluttered textured backgrounds with distractor shapes
that belong to no class. Edges are anti-aliased (objects are rendered at 2x and reduced),
as in a photo, and the mask marks a pixel as an object where the object covers more than
half of it.

Everything is a function of (seed, index): image i is the same on every machine and in
every worker, so the dataset can be generated in parallel and regenerated to check it.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .. import storage
from .codecs import encode_image, encode_mask
from .dataset import DatasetInfo, DatasetWriter

# name: (shape, hue range in degrees, texture)
CLASSES = {
    "ball": ("disc", (0, 25), "shaded"),
    "tile": ("square", (200, 235), "checker"),
    "leaf": ("ellipse", (85, 140), "veins"),
    "star": ("star", (35, 60), "dots"),
    "ring": ("annulus", (270, 320), "solid"),
    "kite": ("triangle", (170, 205), "stripes"),
}
CLASS_NAMES = tuple(CLASSES)
INFO = DatasetInfo(CLASS_NAMES, background=True)

_SS = 2  # supersampling factor for anti-aliased shapes


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    hsv = np.array([[[h / 2.0, s * 255.0, v * 255.0]]], np.float32).clip(0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: (size, size) float32."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cluttered, textured, muted background with distractors: (S, S, 3) float32 0..255."""
    base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.8))
    other = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.85))
    t = (0.6 * _smooth_noise(rng, size, rng.integers(3, 7))
         + 0.4 * _smooth_noise(rng, size, rng.integers(10, 24)))[..., None]
    img = base * (1 - t) + other * t
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:  # wood-like grain
        ang = rng.uniform(0, math.pi)
        u = xx * math.cos(ang) + yy * math.sin(ang)
        grain = np.sin(u / rng.uniform(2.0, 5.0) + 3 * _smooth_noise(rng, size, 6)) * 0.5 + 0.5
        img *= (0.85 + 0.15 * grain)[..., None]
    elif kind == 1:  # fabric-like cross hatching
        p = rng.uniform(3.0, 7.0)
        hatch = (np.sin(xx / p) * np.sin(yy / p)) * 0.5 + 0.5
        img *= (0.88 + 0.12 * hatch)[..., None]
    # distractors: lines and blobs of random (muted) colours, never a class shape
    canvas = img.copy()
    for _ in range(rng.integers(3, 9)):
        col = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.5), rng.uniform(0.2, 0.9))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(canvas, p1, p2, col.tolist(), int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(rng.integers(2, 6)):
        col = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.55), rng.uniform(0.2, 0.9))
        c = rng.integers(0, size, 2)
        n = rng.integers(5, 9)
        r = rng.uniform(4, size / 10) * rng.uniform(0.5, 1.0, n)
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        pts = np.stack([c[0] + r * np.cos(ang), c[1] + r * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(canvas, [pts], col.tolist(), cv2.LINE_AA)
    return canvas


def _shape_alpha(shape: str, h: int, w: int, cx: float, cy: float, r: float, rot: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of one instance in an (h, w) window: float32."""
    canvas = np.zeros((h * _SS, w * _SS), np.uint8)
    cx, cy, r = (cx + 0.5) * _SS - 0.5, (cy + 0.5) * _SS - 0.5, r * _SS

    def poly(points: np.ndarray) -> None:
        rotm = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        pts = points @ rotm.T + np.array([cx, cy])
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255)

    if shape == "disc":
        cv2.circle(canvas, (round(cx), round(cy)), round(r), 255, -1)
    elif shape == "square":
        s = r * 0.85
        poly(np.array([[-s, -s], [s, -s], [s, s], [-s, s]]))
    elif shape == "ellipse":
        cv2.ellipse(canvas, (round(cx), round(cy)), (round(r), round(r * 0.5)),
                    math.degrees(rot), 0, 360, 255, -1)
    elif shape == "star":
        ang = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        poly(np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1))
    elif shape == "annulus":
        cv2.circle(canvas, (round(cx), round(cy)), round(r), 255, -1)
        cv2.circle(canvas, (round(cx), round(cy)), round(r * rng.uniform(0.45, 0.6)), 0, -1)
    elif shape == "triangle":
        ang = np.array([-90, 30, 150]) * math.pi / 180
        poly(np.stack([r * np.cos(ang), r * np.sin(ang)], 1))
    else:
        raise ValueError(shape)
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _texture(kind: str, hue: float, h: int, w: int, cx: float, cy: float, r: float,
             rng: np.random.Generator) -> np.ndarray:
    """Object appearance in an (h, w) window centred at (cx, cy): float32 0..255."""
    sat, val = rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95)
    main = _hsv_to_rgb(hue, sat, val)
    second = _hsv_to_rgb(hue + rng.uniform(-15, 15), sat * rng.uniform(0.3, 0.7),
                         min(1.0, val * rng.uniform(1.1, 1.4)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx - cx, yy - cy
    if kind == "shaded":  # a lit sphere
        lx, ly = rng.uniform(-0.5, 0.5, 2)
        d = np.sqrt((u / r - lx) ** 2 + (v / r - ly) ** 2)
        t = np.clip(1.0 - d * 0.7, 0.25, 1.0)[..., None]
        return main * t + second * (1 - t) * 0.2
    if kind == "checker":
        p = r / rng.uniform(1.5, 2.5)
        t = ((np.floor(u / p) + np.floor(v / p)) % 2)[..., None]
        return main * (1 - t) + second * t
    if kind == "veins":
        ang = rng.uniform(0, math.pi)
        w = u * math.cos(ang) + v * math.sin(ang)
        t = (np.abs(np.sin(w / rng.uniform(1.5, 2.5))) < 0.25)[..., None].astype(np.float32)
        return main * (1 - t) + second * t
    if kind == "dots":
        p = rng.uniform(4.0, 7.0)
        t = (((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 < (p / 4) ** 2)
        t = t[..., None].astype(np.float32)
        return main * (1 - t) + _hsv_to_rgb(hue + 180, 0.6, 0.4) * t
    if kind == "solid":
        t = cv2.resize(rng.random((4, 4)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC).clip(0, 1)[..., None] * 0.3
        return main * (1 - t) + second * t
    if kind == "stripes":
        p = rng.uniform(3.0, 5.0)
        t = ((v // p) % 2)[..., None]
        return main * (1 - t) + second * t
    raise ValueError(kind)


def render(seed: int, index: int, size: int = 160) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Scene `index` of the dataset with `seed`.

    Returns image (S, S, 3) uint8 RGB, mask (S, S) uint8 (0 = background, 1..6 classes)
    and the sorted classes that remain visible.
    """
    rng = np.random.default_rng([seed, index])
    img = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    n_classes = rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25])
    chosen = rng.choice(len(CLASS_NAMES), n_classes, replace=False) + 1
    instances = [int(c) for c in chosen for _ in range(rng.integers(1, 4))]
    rng.shuffle(instances)
    for c in instances:
        shape, (h0, h1), tex = CLASSES[CLASS_NAMES[c - 1]]
        r = rng.uniform(0.08, 0.2) * size
        cx, cy = rng.uniform(0.05 * size, 0.95 * size, 2)
        # work in the instance's bounding window only
        x0, y0 = max(0, int(cx - r) - 2), max(0, int(cy - r) - 2)
        x1, y1 = min(size, int(cx + r) + 3), min(size, int(cy + r) + 3)
        h, w = y1 - y0, x1 - x0
        alpha = _shape_alpha(shape, h, w, cx - x0, cy - y0, r, rng.uniform(0, 2 * math.pi), rng)
        look = _texture(tex, rng.uniform(h0, h1) % 360, h, w, cx - x0, cy - y0, r, rng)
        win = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = win * (1 - alpha[..., None]) + look * alpha[..., None]
        mask[y0:y1, x0:x1][alpha > 0.5] = c
    # sensor noise and a little blur, as a camera would give
    img = img + rng.normal(0, rng.uniform(2, 7), img.shape)
    img = cv2.GaussianBlur(img.clip(0, 255).astype(np.uint8), (3, 3), rng.uniform(0.3, 0.8))
    labels = sorted(int(c) for c in np.unique(mask) if c > 0)
    return img, mask, labels


def generate(path: str, num_train: int = 800, num_val: int = 160, image_size: int = 160,
             seed: int = 0, overwrite: bool = False) -> str:
    """Write the demo dataset to `path` (Parquet + classes.json) and return the path.

    Scenes whose objects were all hidden are skipped (index kept in the id), so every
    row has at least one label. Masks are stored for both splits; training reads only
    the image-level labels.
    """
    with DatasetWriter(path, INFO, overwrite=overwrite) as writer:
        for split, count, offset in (("train", num_train, 0), ("val", num_val, 10**6)):
            for i in range(offset, offset + count):
                img, mask, labels = render(seed, i, image_size)
                if not labels:
                    continue
                writer.add({
                    "image_id": f"demo_{split}_{i - offset:05d}",
                    "image": encode_image(img, ".jpg", quality=92),
                    "height": image_size, "width": image_size, "labels": labels,
                    "mask": encode_mask(mask), "split": split,
                })
        return writer.commit({"source": "ray_wsss.data.demo", "seed": seed})


def ensure(path: str, **kwargs) -> str:
    """Generate the demo dataset at `path` unless it is already there."""
    if storage.exists(storage.join(storage.resolve(path), "classes.json")):
        return storage.resolve(path)
    return generate(path, **kwargs)

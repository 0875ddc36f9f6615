"""Encoding and decoding of what a dataset row holds: images, label maps, dense arrays.

Images stay the encoded file they came as and are decoded with OpenCV where they are
used, always in their stored orientation (an EXIF orientation tag is not applied, as VOC
and COCO annotations assume); the importers validate with the same `decode_image`, so a
file is refused at import exactly when training could not read it. Label maps are PNG;
they are written as palette PNGs with the VOC colour map so that they open as readable
pictures, and read back as indices (Pillow, because OpenCV expands palettes to colours).
Dense float arrays are `.npy` bytes, loaded with `allow_pickle=False`.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from ..errors import DataError

IGNORE_INDEX = 255

# Decoding a 6000x4000 photo is fine; a decompression bomb is not. Pillow only reads
# headers and masks here; the importers check an image's claimed size against their own
# limit (ImportOptions.max_megapixels) before decoding it.
Image.MAX_IMAGE_PIXELS = 20000 * 20000

EXIF_ORIENTATION = 0x0112
# what each EXIF orientation does to the stored picture to display it
ORIENTATION_NAMES = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped upside down",
                     5: "transposed", 6: "rotated 90 degrees clockwise",
                     7: "transversed", 8: "rotated 90 degrees counter-clockwise"}


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, index 255 included."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


PALETTE = voc_palette()


def decode_image(data: bytes | None, where: str = "image", max_side: int | None = None
                 ) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (H, W, 3), in stored orientation.

    Grayscale is expanded to 3 channels, an alpha channel is composited on black
    (as the visible image is what the labels describe), 16-bit is scaled to 8-bit.
    `max_side`: images larger than this are shrunk while decoding (memory stays bounded).
    EXIF orientation is never applied, on either path (IMREAD_UNCHANGED ignores it; the
    reduced decodes are told to): the full and the shrunk decode show the same picture.
    A JPEG whose last scan has no end-of-image marker is refused as truncated (some
    OpenCV builds return such a file half grey instead of failing).
    """
    if data is None or len(data) == 0:
        raise DataError("empty image file (0 bytes)", path=where)
    if _truncated_jpeg(data):
        raise DataError("cannot decode image (truncated JPEG: no end-of-image marker "
                        "after its last scan)", path=where)
    buf = np.frombuffer(data, np.uint8)
    flags = cv2.IMREAD_UNCHANGED
    if max_side is not None:
        info = _peek_size(data)
        if info is not None and max(info) > 2 * max_side:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 size instead of the full array.
            factor = max(f for f in (2, 4, 8) if max(info) / f >= max_side)
            flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                     8: cv2.IMREAD_REDUCED_COLOR_8}[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(buf, flags)
    if img is None:
        raise DataError("cannot decode image (not an image, or truncated/corrupt)", path=where)
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"unsupported pixel type {img.dtype}", path=where)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.uint16)
        img = (img[:, :, :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if max_side is not None and max(img.shape[:2]) > max_side:
        img = resize_image(img, max_side)
    return np.ascontiguousarray(img)


def _truncated_jpeg(data: bytes) -> bool:
    # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so
    # the last SOS (FFDA) and EOI (FFD9) markers found are real ones; an embedded EXIF
    # thumbnail comes before the main image's scans.
    return data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def image_header(data: bytes, where: str = "image") -> tuple[int, int, str, int] | None:
    """(height, width, format, EXIF orientation 1..8) from an encoded image's header,
    without decoding its pixels; None when Pillow cannot parse the header (OpenCV may
    still decode it). The size is the stored picture's (before any EXIF rotation).

    Raises DataError for a header claiming more than twice Pillow's MAX_IMAGE_PIXELS
    (Pillow refuses to open those at all)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = im.format or ""
            try:
                orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
                orientation = 1
    except Image.DecompressionBombError as exc:
        raise DataError(f"refused as a likely decompression bomb: its header claims more "
                        f"than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels ({exc})",
                        path=where) from None
    except Exception:  # noqa: BLE001 - undecodable headers fall through to OpenCV's error
        return None
    return h, w, fmt, orientation if orientation in range(1, 9) else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """A stored (H, W, ...) picture as displayed under EXIF orientation 1..8 (what
    Pillow's ImageOps.exif_transpose and OpenCV's IMREAD_COLOR do)."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.swapaxes(0, 1)
    elif orientation == 6:
        img = img.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        img = img.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        img = img.swapaxes(0, 1)[::-1]
    return np.ascontiguousarray(img)


def _peek_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - undecodable headers fall through to OpenCV's error
        return None


def image_size(data: bytes, where: str = "image") -> tuple[int, int]:
    """(height, width) of an encoded image, from its header when possible."""
    size = _peek_size(data)
    if size is not None:
        return size[1], size[0]
    img = decode_image(data, where)
    return img.shape[0], img.shape[1]


def scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def resize_image(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = scaled_size(img.shape[0], img.shape[1], max_side)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def encode_image(img: np.ndarray, ext: str = ".png", quality: int = 95) -> bytes:
    """RGB uint8 (H, W, 3) -> encoded bytes (PNG by default, JPEG with ext='.jpg')."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {img.shape} image as {ext}")
    return buf.tobytes()


def encode_mask(mask: np.ndarray) -> bytes:
    """Label map uint8 (H, W) -> palette PNG bytes (VOC colours)."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D uint8, got {mask.dtype} {mask.shape}")
    im = Image.fromarray(mask, mode="P")
    im.putpalette(PALETTE.tobytes())
    out = io.BytesIO()
    im.save(out, format="PNG", optimize=False, compress_level=1)
    return out.getvalue()


def decode_mask(data: bytes | None, where: str = "mask") -> np.ndarray:
    """PNG label map -> uint8 (H, W) of class indices.

    Palette PNGs give their indices; 8-bit grayscale its values; 16-bit grayscale is
    accepted when every value fits in 0..255. Colour (RGB) masks are rejected: their
    colours would have to be mapped to classes first.
    """
    if data is None or len(data) == 0:
        raise DataError("empty mask file (0 bytes)", path=where)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L"):
                arr = np.asarray(im, dtype=np.uint8)
            elif mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise DataError(f"16-bit mask holds value {int(arr.max())}, beyond 255",
                                    path=where)
                arr = arr.astype(np.uint8)
            elif mode == "1":
                arr = np.asarray(im, dtype=np.uint8)
            else:
                raise DataError(f"mask is a {mode} image; expected a palette or grayscale "
                                "PNG of class indices", path=where)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DataError(f"cannot decode mask ({exc.__class__.__name__}: {exc})",
                        path=where) from None
    return np.ascontiguousarray(arr)


def encode_array(arr: np.ndarray, dtype=np.float16) -> bytes:
    """Dense array -> `.npy` bytes (float16 by default: CAMs need no more)."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(arr, dtype=dtype), allow_pickle=False)
    return out.getvalue()


def decode_array(data: bytes, where: str = "array") -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot decode .npy array ({exc})", path=where) from None


def colorize(mask: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3) with the VOC palette."""
    return PALETTE[mask]

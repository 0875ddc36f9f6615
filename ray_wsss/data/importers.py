"""Importers: VOC-style folders, plain folders (+ labels CSV and/or masks), COCO JSON.

Each turns a user's files into the Parquet dataset of `dataset.py`. Every image and mask
is decoded once to validate it: an unreadable or truncated image, a mask whose size
differs from its image, a mask value or label beyond the class list, a duplicate
image_id or an empty label list stops the import with an error naming the file, or,
with `skip_bad`, is skipped and listed in the import report. Either way no half-written
dataset is left behind (see `DatasetWriter`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from ..errors import DataError
from .codecs import IGNORE_INDEX, decode_mask, encode_mask, resize_mask, scaled_size
from .dataset import DatasetInfo, DatasetWriter, check_mask_values, labels_from_mask

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Candidate:
    """One image to import, before validation."""
    image_id: str
    image_path: str
    split: str
    mask_path: str | None = None
    labels: list[int] | None = None          # given labels (CSV, XML); else from the mask
    mask_array: np.ndarray | None = None     # already decoded mask (COCO polygons)
    mask_fn: Callable[[int, int], np.ndarray] | None = None  # mask drawn at (h, w)
    error: DataError | None = None           # known bad before reading (e.g. its name)


@dataclass
class ImportOptions:
    mask_offset: int = 0
    ignore_values: tuple[int, ...] = ()
    max_image_side: int | None = None
    skip_bad: bool = False
    overwrite: bool = False
    threads: int = 4


@dataclass
class ImportResult:
    path: str
    counts: dict[str, int]
    skipped: list[dict] = field(default_factory=list)


def _bad_name(name: str, folder: str) -> DataError | None:
    """Image ids are Arrow strings: a file name that is not valid UTF-8 cannot be one."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(os.path.join(folder, name))
        return DataError("file name is not valid UTF-8; rename the file", path=repr(raw)[2:-1])
    return None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror})", path=path) from None


def _check_image(data: bytes, where: str) -> tuple[int, int, str]:
    """Fully decode with Pillow (it detects truncated files that OpenCV half-decodes).

    Returns (height, width, format)."""
    if not data:
        raise DataError("empty image file (0 bytes)", path=where)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.load()
            w, h = im.size
    except Image.DecompressionBombError:
        raise DataError("image too large to decode safely", path=where) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DataError(f"cannot decode image ({exc.__class__.__name__}: {exc})",
                        path=where) from None
    if h < 1 or w < 1:
        raise DataError(f"image has no pixels ({w}x{h})", path=where)
    return h, w, fmt


def _shrink(data: bytes, fmt: str, h: int, w: int, max_side: int, where: str
            ) -> tuple[bytes, int, int]:
    from .codecs import decode_image, encode_image
    img = decode_image(data, where, max_side=max_side)
    nh, nw = scaled_size(h, w, max_side)
    if img.shape[:2] != (nh, nw):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    return encode_image(img, ext), nh, nw


def _process(c: Candidate, info: DatasetInfo, opts: ImportOptions) -> dict:
    if c.error is not None:
        raise c.error
    data = _read(c.image_path)
    h, w, fmt = _check_image(data, c.image_path)
    mask = None
    mask_where = c.mask_path or c.image_path
    if c.mask_path is not None:
        mask = decode_mask(_read(c.mask_path), c.mask_path)
    elif c.mask_array is not None:
        mask = c.mask_array
    elif c.mask_fn is not None:
        mask = c.mask_fn(h, w)
    if mask is not None:
        if mask.shape != (h, w):
            raise DataError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{c.image_path} is {w}x{h}", path=mask_where, row=c.image_id)
        if opts.ignore_values or opts.mask_offset:
            ignore = np.isin(mask, opts.ignore_values) | (mask == IGNORE_INDEX)
            shifted = mask.astype(np.int32) + opts.mask_offset
            if not ignore.all() and shifted[~ignore].max() >= IGNORE_INDEX:
                bad = int(mask[~ignore][shifted[~ignore] >= IGNORE_INDEX][0])
                raise DataError(f"mask value {bad} + offset {opts.mask_offset} does not fit "
                                "in 0..254", path=mask_where, row=c.image_id)
            mask = np.where(ignore, IGNORE_INDEX, shifted).astype(np.uint8)
        check_mask_values(mask, info, mask_where, c.image_id)
    labels = c.labels
    if labels is None:
        if mask is None:
            raise DataError("no labels: give a labels CSV or a mask for this image",
                            path=c.image_path, row=c.image_id)
        labels = labels_from_mask(mask, info)
    if opts.max_image_side is not None and max(h, w) > opts.max_image_side:
        data, h, w = _shrink(data, fmt, h, w, opts.max_image_side, c.image_path)
        if mask is not None:
            mask = resize_mask(mask, h, w)
    return {"image_id": c.image_id, "image": data, "height": h, "width": w,
            "labels": labels, "split": c.split,
            "mask": None if mask is None else encode_mask(mask)}


def write_dataset(candidates: Iterable[Candidate], out: str, info: DatasetInfo,
                  opts: ImportOptions, extra: dict | None = None) -> ImportResult:
    """Validate and write candidates (in order) as a dataset at `out`."""
    skipped: list[dict] = []
    with DatasetWriter(out, info, overwrite=opts.overwrite) as writer, \
            ThreadPoolExecutor(max(1, opts.threads)) as pool:
        def safe(c: Candidate):
            try:
                return _process(c, info, opts), None
            except DataError as exc:
                return None, exc

        for chunk in _chunks(candidates, 32):
            for c, (row, err) in zip(chunk, pool.map(safe, chunk)):
                if err is None:
                    try:
                        writer.add(row, where=c.image_path)
                    except DataError as exc:
                        err = exc
                if err is not None:
                    if not opts.skip_bad:
                        raise err
                    skipped.append({"image_id": c.image_id, "file": err.path,
                                    "reason": err.reason})
        meta = dict(extra or {})
        meta["skipped"] = skipped
        path = writer.commit(meta)
        return ImportResult(path, dict(writer.counts), skipped)


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _find_images(folder: str) -> dict[str, str]:
    """stem -> path for the image files of a folder (non-recursive, sorted)."""
    if not os.path.isdir(folder):
        raise DataError("image folder not found", path=folder)
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS and os.path.isfile(os.path.join(folder, name)):
            if stem in found:
                raise DataError(f"two image files share the id {stem!r} "
                                f"({os.path.basename(found[stem])}, {name})", path=folder)
            found[stem] = os.path.join(folder, name)
    return found


def _read_ids(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.split()[0] for line in fh if line.strip()]
    except OSError as exc:
        raise DataError(f"cannot read id list ({exc.strerror})", path=path) from None


# ---------------------------------------------------------------- VOC

def voc_candidates(root: str, images_dir: str | None = None, masks_dir: str | None = None,
                   splits: Sequence[str] | None = None) -> tuple[list[Candidate], DatasetInfo]:
    """A VOC-style folder: JPEGImages (or images/), SegmentationClass(Aug)/,
    ImageSets/Segmentation/<split>.txt, and optionally Annotations/<id>.xml for the
    image-level labels of images that have no mask."""
    info = DatasetInfo(VOC_CLASSES, background=True)
    if not os.path.isdir(root):
        raise DataError("VOC folder not found", path=root)
    images_dir = images_dir or _first_dir(root, ("JPEGImages", "images"))
    masks_dir = masks_dir or _first_dir(root, ("SegmentationClass", "SegmentationClassAug"),
                                        required=False)
    images = _find_images(images_dir)
    ann_dir = os.path.join(root, "Annotations")
    sets_dir = os.path.join(root, "ImageSets", "Segmentation")
    if os.path.isdir(sets_dir):
        lists = {os.path.splitext(f)[0]: os.path.join(sets_dir, f)
                 for f in sorted(os.listdir(sets_dir)) if f.endswith(".txt")}
    else:
        lists = {}
    if splits:
        missing = [s for s in splits if s not in lists]
        if missing:
            raise DataError(f"no id list for split {missing[0]!r}", path=sets_dir)
        lists = {s: lists[s] for s in splits}
    elif "trainval" in lists and ("train" in lists or "val" in lists):
        lists.pop("trainval")  # the union of train and val: would duplicate ids
    if lists:
        membership = [(split, _read_ids(path)) for split, path in lists.items()]
    else:
        membership = [("train", sorted(images))]
    cands = []
    for split, ids in membership:
        for image_id in ids:
            if image_id not in images:
                raise DataError(f"image {image_id!r} listed for split {split!r} has no file "
                                f"in {images_dir}", path=lists.get(split, images_dir))
            mask_path = os.path.join(masks_dir, image_id + ".png") if masks_dir else None
            if mask_path is not None and not os.path.isfile(mask_path):
                mask_path = None
            labels = None
            if mask_path is None:
                xml = os.path.join(ann_dir, image_id + ".xml")
                if os.path.isfile(xml):
                    labels = _voc_xml_labels(xml, info)
            cands.append(Candidate(image_id, images[image_id], split, mask_path, labels))
    return cands, info


def _first_dir(root: str, names: Sequence[str], required: bool = True) -> str | None:
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    if required:
        raise DataError(f"no {' or '.join(names)} folder", path=root)
    return None


def _voc_xml_labels(path: str, info: DatasetInfo) -> list[int]:
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"cannot parse annotation XML ({exc})", path=path) from None
    labels = set()
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in info.classes:
            raise DataError(f"unknown class {name!r}", path=path)
        labels.add(info.classes.index(name) + 1)
    return sorted(labels)


def import_voc(root: str, out: str, opts: ImportOptions | None = None,
               images_dir: str | None = None, masks_dir: str | None = None,
               splits: Sequence[str] | None = None) -> ImportResult:
    opts = opts or ImportOptions()
    cands, info = voc_candidates(root, images_dir, masks_dir, splits)
    return write_dataset(cands, out, info, opts, {"source": f"voc:{os.path.abspath(root)}"})


# ---------------------------------------------------------------- folder + CSV

def parse_classes(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Class names from a list, a comma-separated string, or a file (one per line)."""
    if spec is None or spec == () or spec == []:
        return None
    if isinstance(spec, str):
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as fh:
                names = [ln.strip() for ln in fh if ln.strip()]
        else:
            names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s) for s in spec]
    if len(set(names)) != len(names):
        raise DataError("class names repeat", path=str(spec))
    return tuple(names)


def read_labels_csv(path: str, classes: tuple[str, ...] | None
                    ) -> tuple[dict[str, tuple[list[int], str | None]], tuple[str, ...]]:
    """CSV with columns `image` (file name or id) and `labels` (class names or 1-based
    indices separated by `;`, `|` or spaces), optionally `split`.

    Returns {image id: (labels as given, split)} and the class list (sorted names when
    none is given)."""
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read labels CSV ({exc.strerror})", path=path) from None
    with fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        key = next((c for c in ("image", "image_id", "filename", "file") if c in cols), None)
        if key is None or "labels" not in cols:
            raise DataError("labels CSV needs an 'image' and a 'labels' column "
                            f"(found {', '.join(cols) or 'none'})", path=path)
        raw: dict[str, tuple[list[str], str | None, int]] = {}
        for lineno, row in enumerate(reader, start=2):
            name = (row.get(key) or "").strip()
            if not name:
                raise DataError("empty image name", path=path, row=str(lineno))
            image_id = os.path.splitext(os.path.basename(name))[0]
            if image_id in raw:
                raise DataError(f"duplicate image_id {image_id!r}", path=path, row=str(lineno))
            tokens = [t for t in re.split(r"[;|\s]+", (row.get("labels") or "").strip()) if t]
            raw[image_id] = (tokens, (row.get("split") or "").strip() or None, lineno)
    if classes is None:
        names = sorted({t for tokens, _, _ in raw.values() for t in tokens
                        if not t.isdigit()})
        if not names:
            raise DataError("labels are numbers: give the class names (--classes)", path=path)
        classes = tuple(names)
    out = {}
    for image_id, (tokens, split, lineno) in raw.items():
        labels = []
        for t in tokens:
            if t in classes:
                labels.append(classes.index(t) + 1)
            elif t.isdigit():
                labels.append(int(t))  # range-checked by the writer, which names the row
            else:
                raise DataError(f"unknown class {t!r} (known: {', '.join(classes)})",
                                path=path, row=str(lineno))
        out[image_id] = (labels, split)
    return out, classes


def folder_candidates(subsets: Sequence[tuple[str, str, str | None]],
                      labels_csv: str | None, classes: tuple[str, ...] | None,
                      background: bool = True, ids_files: Sequence[str | None] | None = None
                      ) -> tuple[list[Candidate], DatasetInfo]:
    """subsets: (split, images folder, masks folder or None)."""
    labels = {}
    if labels_csv is not None:
        labels, classes = read_labels_csv(labels_csv, classes)
    if classes is None:
        raise DataError("no class names: give --classes (or a labels CSV with names)")
    info = DatasetInfo(classes, background)
    cands = []
    for i, (split, images_dir, masks_dir) in enumerate(subsets):
        images = _find_images(images_dir)
        keep = None
        if ids_files and ids_files[i]:
            keep = set(_read_ids(ids_files[i]))
        for image_id, path in images.items():
            if keep is not None and image_id not in keep:
                continue
            bad = _bad_name(os.path.basename(path), images_dir)
            if bad is not None:
                cands.append(Candidate(image_id.encode("utf-8", "backslashreplace").decode(),
                                       path, split, error=bad))
                continue
            given, row_split = labels.get(image_id, (None, None))
            if labels_csv is not None and given is None and masks_dir is None:
                raise DataError(f"image {image_id!r} is not in the labels CSV", path=path)
            mask_path = None
            if masks_dir is not None:
                mask_path = _find_mask(masks_dir, image_id, path)
            cands.append(Candidate(image_id, path, row_split or split, mask_path, given))
    return cands, info


def _find_mask(masks_dir: str, image_id: str, image_path: str) -> str:
    for ext in (".png", ".PNG", ".bmp", ".tif", ".tiff"):
        p = os.path.join(masks_dir, image_id + ext)
        if os.path.isfile(p):
            return p
    raise DataError(f"no mask for this image in {masks_dir} (expected {image_id}.png)",
                    path=image_path)


def import_folder(subsets: Sequence[tuple[str, str, str | None]], out: str,
                  labels_csv: str | None = None, classes: Sequence[str] | str | None = None,
                  background: bool = True, opts: ImportOptions | None = None,
                  ids_files: Sequence[str | None] | None = None) -> ImportResult:
    opts = opts or ImportOptions()
    cands, info = folder_candidates(subsets, labels_csv, parse_classes(classes), background,
                                    ids_files)
    return write_dataset(cands, out, info, opts,
                         {"source": "folder:" + ",".join(os.path.abspath(s[1])
                                                         for s in subsets)})


# ---------------------------------------------------------------- COCO

def _rle_decode(rle: dict, h: int, w: int) -> np.ndarray:
    """COCO RLE (counts as a list, or as the compressed string) -> (h, w) uint8."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _rle_string_to_counts(counts)
    flat = np.zeros(h * w, np.uint8)
    pos, val = 0, 0
    for n in counts:
        if val:
            flat[pos:pos + n] = 1
        pos += n
        val ^= 1
    return flat.reshape(w, h).T  # COCO RLE is column-major


def _rle_string_to_counts(s: str) -> list[int]:
    # The LEB128-like encoding of the COCO API (maskApi.c, rleFrString): 5 bits per
    # character, continuation in bit 6, deltas against the count two places back.
    counts: list[int] = []
    i = 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def coco_candidates(instances_json: str, images_dir: str, split: str
                    ) -> tuple[list[Candidate], DatasetInfo]:
    try:
        with open(instances_json, encoding="utf-8") as fh:
            coco = json.load(fh)
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", path=instances_json) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc})", path=instances_json) from None
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DataError(f"missing {key!r}: not a COCO instances file", path=instances_json)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i + 1 for i, c in enumerate(cats)}
    info = DatasetInfo(tuple(c["name"] for c in cats), background=True)
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    cands = []
    for im in sorted(coco["images"], key=lambda m: m["id"]):
        items = anns.get(im["id"], [])
        for a in items:
            if a["category_id"] not in cat_index:
                raise DataError(f"annotation {a.get('id')} names unknown category "
                                f"{a['category_id']}", path=instances_json,
                                row=str(im["file_name"]))
        labels = sorted({cat_index[a["category_id"]] for a in items if not a.get("iscrowd")})
        cands.append(Candidate(
            os.path.splitext(im["file_name"])[0], os.path.join(images_dir, im["file_name"]),
            split, labels=labels, mask_fn=_coco_mask_fn(items, cat_index, im, instances_json)))
    return cands, info


def _coco_mask_fn(items: list[dict], cat_index: dict, im: dict, where: str):
    def draw(h: int, w: int) -> np.ndarray:
        if (im.get("height"), im.get("width")) not in ((h, w), (None, None)):
            raise DataError(f"annotation says {im['width']}x{im['height']} but the file is "
                            f"{w}x{h}", path=where, row=str(im["file_name"]))
        mask = np.zeros((h, w), np.uint8)
        # Large objects first so that small ones drawn later stay visible.
        for a in sorted(items, key=lambda a: -float(a.get("area", 0))):
            value = IGNORE_INDEX if a.get("iscrowd") else cat_index[a["category_id"]]
            seg = a.get("segmentation")
            if isinstance(seg, list):
                polys = [np.round(np.array(p, np.float64).reshape(-1, 2)).astype(np.int32)
                         for p in seg if len(p) >= 6]
                cv2.fillPoly(mask, polys, int(value))
            elif isinstance(seg, dict):
                mask[_rle_decode(seg, h, w).astype(bool)] = value
        return mask
    return draw


def import_coco(subsets: Sequence[tuple[str, str, str]], out: str,
                opts: ImportOptions | None = None) -> ImportResult:
    """subsets: (split, instances JSON, images folder); all must share one category list."""
    opts = opts or ImportOptions()
    cands: list[Candidate] = []
    info = None
    for split, instances_json, images_dir in subsets:
        part, part_info = coco_candidates(instances_json, images_dir, split)
        if info is not None and part_info != info:
            raise DataError("categories differ from the first annotation file's",
                            path=instances_json)
        info = part_info
        cands += part
    return write_dataset(cands, out, info, opts,
                         {"source": "coco:" + ",".join(os.path.abspath(s[1]) for s in subsets)})

"""Importers: VOC-style folders, plain folders (+ labels CSV and/or masks), COCO JSON.

Each turns a user's files into the Parquet dataset of `dataset.py`. Every image is
decoded fully, with the decoder training uses (`codecs.decode_image`, OpenCV, stored
orientation), so a file is accepted exactly when the pipeline can read it; its header's
claimed size is checked against `max_megapixels` first (decompression bombs). An
unreadable or truncated image, a mask whose size differs from its image, a mask value or
label beyond the class list, a duplicate image_id or an empty label list stops the import
with an error naming the file, or, with `skip_bad`, is skipped and listed in the import
report. Either way no half-written dataset is left behind (see `DatasetWriter`).

With `tiles` (a rows x cols grid) or `tile_size` (pixels), every image becomes tiles, one
row each (`tiles.py`), tagged from its mask or from a CSV of tile tags. The import also
records, per split, the share of rows holding each class, and warns about classes in
more than 90% of the training rows (their CAMs cannot localise them).
"""
from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from ..errors import ConfigError, DataError
from . import tiles as tiling
from .codecs import (IGNORE_INDEX, ORIENTATION_NAMES, apply_orientation, decode_image,
                     decode_mask, encode_image, encode_mask, image_header, resize_mask,
                     scaled_size)
from .dataset import (DatasetInfo, DatasetWriter, check_mask_values, crowded_class_warnings,
                      label_statistics, labels_from_mask)

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
    declared_size: tuple[int, int] | None = None  # (h, w) the annotations say (COCO)
    declared_in: str | None = None           # the file that declares it


@dataclass
class ImportOptions:
    """How images become rows. Tiling: `tiles` (rows, cols) or `tile_size` (height,
    width: the fewest tiles of at most that size, split evenly; see
    `tiles.tile_boxes_by_size`), tagged with the classes covering at least
    `tile_min_fraction` of a tile's labelled pixels, or from `tile_tags` (a CSV like the
    labels CSV whose image column holds tile ids, `<image_id>@r<i>c<j>`); `tile_splits`:
    the splits to tile (None: all). `max_image_side` shrinks the whole image before it is
    tiled. `apply_exif`: rotate images by their EXIF orientation tag (for masks drawn on
    the displayed picture); by default stored pixels are used, as VOC and COCO assume.
    `train_split`: the split whose label statistics warn about crowded classes."""
    mask_offset: int = 0
    ignore_values: tuple[int, ...] = ()
    max_image_side: int | None = None
    skip_bad: bool = False
    overwrite: bool = False
    threads: int = 4
    tiles: tuple[int, int] | None = None
    tile_size: tuple[int, int] | None = None
    tile_min_fraction: float = 0.01
    tile_tags: str | None = None
    tile_splits: tuple[str, ...] | None = None
    apply_exif: bool = False
    max_megapixels: float = 200.0  # a 200 MP phone photo (16320x12240) still passes
    train_split: str = "train"

    @property
    def tiled(self) -> bool:
        return self.tiles is not None or self.tile_size is not None

    def check(self) -> None:
        """Raise ConfigError naming the option that is wrong."""
        if self.tiles is not None and self.tile_size is not None:
            raise ConfigError("tiles (--tiles) and tile_size (--tile-size) exclude each other")
        for name in ("tiles", "tile_size"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ConfigError(f"{name}: expected two positive integers, got {value}")
        if not 0.0 <= self.tile_min_fraction <= 1.0:
            raise ConfigError(f"tile_min_fraction: expected a fraction in [0, 1], got "
                              f"{self.tile_min_fraction}")
        if not self.tiled and (self.tile_tags is not None or self.tile_splits is not None):
            raise ConfigError("tile_tags / tile_splits need tiles or tile_size")
        if self.max_megapixels <= 0:
            raise ConfigError(f"max_megapixels: expected a positive number, got "
                              f"{self.max_megapixels}")

    def tiling_meta(self) -> dict | None:
        """classes.json's `tiling`: how the tiles and their tags were made."""
        if not self.tiled:
            return None
        meta: dict = ({"grid": list(self.tiles)} if self.tiles is not None
                      else {"tile_size": list(self.tile_size), "split": "even"})
        meta["splits"] = None if self.tile_splits is None else list(self.tile_splits)
        if self.tile_tags is not None:
            meta.update(tags="csv", tags_csv=os.path.abspath(self.tile_tags))
        else:
            meta.update(tags="masks", min_fraction=self.tile_min_fraction)
        return meta


@dataclass
class ImportResult:
    path: str
    counts: dict[str, int]
    skipped: list[dict] = field(default_factory=list)
    tiles: int = 0                       # tile rows written
    skipped_tiles: list[str] = field(default_factory=list)  # no class above the threshold
    label_stats: dict = field(default_factory=dict)  # see dataset.label_statistics
    warnings: list[str] = field(default_factory=list)


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


def check_class_names(names: Sequence[str], where: str | None) -> None:
    """Refuse repeated names and names that differ only in case (`A`, `a`): they would
    silently become two classes."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other == name and names.count(name) > 1:
            raise DataError(f"class name {name!r} repeats", path=where)
        if other != name:
            raise DataError(f"class names {other!r} and {name!r} differ only in case: they "
                            "would become two classes; spell them the same", path=where)


def _check_megapixels(h: int, w: int, size: int, where: str, limit: float) -> None:
    if h * w > limit * 1e6:
        raise DataError(f"image claims {w}x{h} pixels ({h * w / 1e6:.3g} megapixels, a "
                        f"{size}-byte file), over the limit of {limit:g} megapixels: refused "
                        "as a possible decompression bomb (raise --max-megapixels, "
                        "ImportOptions.max_megapixels, if it is a real photo)", path=where)


def load_image(data: bytes, where: str, opts: ImportOptions) -> tuple[np.ndarray, str, int]:
    """Validate an encoded image as the pipeline will read it.

    Checks the header's claimed size against `opts.max_megapixels` before decoding, then
    decodes fully with `codecs.decode_image` (the decoder training uses). Returns the
    RGB pixels (H, W, 3) uint8 in stored orientation, the format ("JPEG", "PNG", ...; ""
    when Pillow cannot read the header) and the EXIF orientation (1..8)."""
    if not data:
        raise DataError("empty image file (0 bytes)", path=where)
    header = image_header(data, where)
    fmt, orientation = "", 1
    if header is not None:
        h, w, fmt, orientation = header
        _check_megapixels(h, w, len(data), where, opts.max_megapixels)
    img = decode_image(data, where)
    if header is None:
        _check_megapixels(img.shape[0], img.shape[1], len(data), where, opts.max_megapixels)
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise DataError(f"image has no pixels ({img.shape[1]}x{img.shape[0]})", path=where)
    return img, fmt, orientation


def _size_error(what: str, got: tuple[int, int], image: tuple[int, int], image_path: str,
                orientation: int, applied: bool) -> str:
    """The message of a mask/annotation size that differs from its image's, saying when
    the image's EXIF orientation tag explains it."""
    (gh, gw), (h, w) = got, image
    msg = f"{what} is {gw}x{gh} but its image {image_path} is {w}x{h}"
    if orientation in (5, 6, 7, 8) and (gh, gw) == (w, h):
        turn = f"EXIF orientation tag ({orientation}: {ORIENTATION_NAMES[orientation]})"
        if applied:
            msg += (f" after applying its {turn}; the {what} matches the stored pixels: "
                    "import without --apply-exif (ImportOptions.apply_exif)")
        else:
            msg += (f" as stored; its {turn} displays it as {h}x{w}: if the masks were "
                    "drawn on the displayed picture, import with --apply-exif "
                    "(ImportOptions.apply_exif)")
    return msg


def _load_mask(c: Candidate, h: int, w: int, orientation: int, opts: ImportOptions
               ) -> np.ndarray | None:
    if c.mask_path is not None:
        data = _read(c.mask_path)
        # compare the header's size first: a huge mask is refused before it is decoded
        header = image_header(data, c.mask_path)
        if header is not None and header[:2] != (h, w):
            raise DataError(_size_error("mask", header[:2], (h, w), c.image_path,
                                        orientation, opts.apply_exif),
                            path=c.mask_path, row=c.image_id)
        mask = decode_mask(data, c.mask_path)
    elif c.mask_array is not None:
        mask = c.mask_array
    elif c.mask_fn is not None:
        if c.declared_size is not None and c.declared_size != (h, w):
            raise DataError(_size_error("the annotation's image size", c.declared_size,
                                        (h, w), c.image_path, orientation, opts.apply_exif),
                            path=c.declared_in, row=c.image_id)
        mask = c.mask_fn(h, w)
    else:
        return None
    if mask.shape != (h, w):
        raise DataError(_size_error("mask", mask.shape, (h, w), c.image_path, orientation,
                                    opts.apply_exif),
                        path=c.mask_path or c.image_path, row=c.image_id)
    return mask


@dataclass
class _Processed:
    rows: list[dict]
    skipped_tiles: list[str] = field(default_factory=list)
    tile_ids: list[str] = field(default_factory=list)  # every tile made, kept or not


def _process(c: Candidate, info: DatasetInfo, opts: ImportOptions,
             tile_tags: dict[str, list[int]] | None = None) -> _Processed:
    if c.error is not None:
        raise c.error
    data = _read(c.image_path)
    img, fmt, orientation = load_image(data, c.image_path, opts)
    reencode = False
    if opts.apply_exif and orientation != 1:
        img = apply_orientation(img, orientation)
        reencode = True
    h, w = img.shape[:2]
    mask = _load_mask(c, h, w, orientation, opts)
    mask_where = c.mask_path or c.image_path
    if mask is not None:
        if opts.ignore_values or opts.mask_offset:
            ignore = np.isin(mask, opts.ignore_values) | (mask == IGNORE_INDEX)
            shifted = mask.astype(np.int32) + opts.mask_offset
            if not ignore.all() and shifted[~ignore].max() >= IGNORE_INDEX:
                bad = int(mask[~ignore][shifted[~ignore] >= IGNORE_INDEX][0])
                raise DataError(f"mask value {bad} + offset {opts.mask_offset} does not fit "
                                "in 0..254", path=mask_where, row=c.image_id)
            mask = np.where(ignore, IGNORE_INDEX, shifted).astype(np.uint8)
        check_mask_values(mask, info, mask_where, c.image_id)
    if opts.max_image_side is not None and max(h, w) > opts.max_image_side:
        h, w = scaled_size(h, w, opts.max_image_side)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = resize_mask(mask, h, w)
        reencode = True
    ext = ".jpg" if fmt == "JPEG" else ".png"
    if opts.tiled and (opts.tile_splits is None or c.split in opts.tile_splits):
        return _tile_rows(c, img, mask, ext, info, opts, tile_tags)
    labels = c.labels
    if labels is None:
        if mask is None:
            raise DataError("no labels: give a labels CSV or a mask for this image",
                            path=c.image_path, row=c.image_id)
        labels = labels_from_mask(mask, info)
    return _Processed([{"image_id": c.image_id,
                        "image": encode_image(img, ext) if reencode else data,
                        "height": h, "width": w, "labels": labels, "split": c.split,
                        "mask": None if mask is None else encode_mask(mask)}])


def _tile_rows(c: Candidate, img: np.ndarray, mask: np.ndarray | None, ext: str,
               info: DatasetInfo, opts: ImportOptions,
               tile_tags: dict[str, list[int]] | None) -> _Processed:
    h, w = img.shape[:2]
    try:
        if opts.tiles is not None:
            boxes = tiling.tile_boxes(h, w, *opts.tiles)
        else:
            boxes = tiling.tile_boxes_by_size(h, w, *opts.tile_size)
    except ValueError as exc:
        raise DataError(str(exc), path=c.image_path, row=c.image_id) from None
    if tile_tags is None and mask is None:
        raise DataError("tiles are tagged from masks, and this image has none: give its "
                        "mask, a tile tags CSV (--tile-tags), or --skip-bad to leave such "
                        "images out", path=c.image_path, row=c.image_id)
    out = _Processed([])
    for i, j, box in boxes:
        tid = tiling.tile_id(c.image_id, i, j)
        out.tile_ids.append(tid)
        tile_mask = None if mask is None else tiling.cut(mask, box)
        if tile_tags is not None:
            if tid not in tile_tags:
                raise DataError(f"tile {tid} has no row in the tile tags CSV "
                                f"{opts.tile_tags} (give it an empty labels cell to leave "
                                "it out)", path=c.image_path, row=c.image_id)
            labels = tile_tags[tid]
        else:
            labels = tiling.tile_tags(tile_mask, opts.tile_min_fraction, info.num_classes,
                                      info.background)
        if not labels:
            out.skipped_tiles.append(tid)
            continue
        y0, x0, y1, x1 = box
        out.rows.append({
            "image_id": tid, "image": encode_image(tiling.cut(img, box), ext),
            "height": y1 - y0, "width": x1 - x0, "labels": labels, "split": c.split,
            "mask": None if tile_mask is None else encode_mask(np.ascontiguousarray(tile_mask)),
            "parent_id": c.image_id, "tile_box": [y0, x0, y1, x1], "parent_size": [h, w]})
    return out


def read_tile_tags(path: str, info: DatasetInfo) -> dict[str, list[int]]:
    """{tile id: classes} from a CSV in the labels CSV's format whose image column holds
    tile ids (`<image_id>@r<i>c<j>`); an empty labels cell leaves the tile out. A split
    column is ignored: a tile is in its image's split."""
    rows, _ = read_labels_csv(path, info.classes, ids_as_given=True)
    for tid, (labels, _) in rows.items():
        if tiling.parse_tile_id(tid) is None:
            raise DataError(f"{tid!r} is not a tile id (<image_id>@r<i>c<j>, i and j "
                            "from 0)", path=path)
        bad = [c for c in labels if not 1 <= c <= info.num_classes]
        if bad:
            raise DataError(f"label {bad[0]} out of range 1..{info.num_classes}", path=path,
                            row=tid)
    return {tid: labels for tid, (labels, _) in rows.items()}


def write_dataset(candidates: Iterable[Candidate], out: str, info: DatasetInfo,
                  opts: ImportOptions, extra: dict | None = None) -> ImportResult:
    """Validate and write candidates (in order) as a dataset at `out`."""
    opts.check()
    tile_tags = read_tile_tags(opts.tile_tags, info) if opts.tile_tags else None
    skipped: list[dict] = []
    skipped_tiles: list[str] = []
    made_tiles: set[str] = set()
    tile_rows = 0
    failed: set[str] = set()
    with DatasetWriter(out, info, overwrite=opts.overwrite, tiled=opts.tiled) as writer, \
            ThreadPoolExecutor(max(1, opts.threads)) as pool:
        def safe(c: Candidate):
            try:
                return _process(c, info, opts, tile_tags), None
            except DataError as exc:
                return None, exc

        for chunk in _chunks(candidates, 32):
            for c, (done, err) in zip(chunk, pool.map(safe, chunk)):
                if err is None:
                    try:
                        # all of an image's rows or none (a duplicate id found on its
                        # third tile must not leave two tiles behind)
                        for row in done.rows:
                            if row["image_id"] in writer:
                                raise DataError(f"duplicate image_id {row['image_id']!r}",
                                                path=c.image_path, row=row["image_id"])
                        for row in done.rows:
                            writer.add(row, where=c.image_path)
                    except DataError as exc:
                        err = exc
                    else:
                        made_tiles.update(done.tile_ids)
                        skipped_tiles += done.skipped_tiles
                        tile_rows += sum(1 for r in done.rows if "parent_id" in r)
                if err is not None:
                    if not opts.skip_bad:
                        raise err
                    failed.add(c.image_id)
                    skipped.append({"image_id": c.image_id, "file": err.path,
                                    "reason": err.reason})
        if tile_tags is not None:
            unknown = [t for t in tile_tags if t not in made_tiles
                       and tiling.parse_tile_id(t)[0] not in failed]
            if unknown:
                raise DataError(f"the tile tags CSV names {len(unknown)} tile(s) that this "
                                f"tiling does not make, e.g. {unknown[0]!r}",
                                path=opts.tile_tags)
        stats = label_statistics(writer.counts, writer.class_counts, info)
        crowded = crowded_class_warnings(stats, opts.train_split, tiled=opts.tiled)
        meta = dict(extra or {})
        meta["skipped"] = skipped
        meta["orientation"] = "exif" if opts.apply_exif else "stored"
        tiled_meta = opts.tiling_meta()
        if tiled_meta is not None:
            tiled_meta["tiles"] = tile_rows
            tiled_meta["skipped_tiles"] = len(skipped_tiles)
            meta["tiling"] = tiled_meta
        meta["label_stats"] = stats
        meta["warnings"] = crowded
        path = writer.commit(meta)
        return ImportResult(path, dict(writer.counts), skipped, tiles=tile_rows,
                            skipped_tiles=skipped_tiles, label_stats=stats,
                            warnings=crowded)


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
    opts.check()
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
    check_class_names(names, str(spec))
    return tuple(names)


def read_labels_csv(path: str, classes: tuple[str, ...] | None, ids_as_given: bool = False
                    ) -> tuple[dict[str, tuple[list[int], str | None]], tuple[str, ...]]:
    """CSV with columns `image` (file name or id) and `labels` (class names or 1-based
    indices separated by `;`, `|` or spaces), optionally `split`.

    Returns {image id: (labels as given, split)} and the class list (sorted names when
    none is given). The id is the file name without folder and extension, or, with
    `ids_as_given` (tile ids, which may hold dots), the cell as written."""
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
            image_id = name if ids_as_given else os.path.splitext(os.path.basename(name))[0]
            if image_id in raw:
                raise DataError(f"duplicate image_id {image_id!r}", path=path, row=str(lineno))
            tokens = [t for t in re.split(r"[;|\s]+", (row.get("labels") or "").strip()) if t]
            raw[image_id] = (tokens, (row.get("split") or "").strip() or None, lineno)
    if not raw:
        raise DataError("labels CSV has no rows (only a header)", path=path)
    if classes is None:
        names = sorted({t for tokens, _, _ in raw.values() for t in tokens
                        if not t.isdigit()})
        check_class_names(names, path)
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
    opts.check()
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
    check_class_names([c["name"] for c in cats], instances_json)
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
        name = _coco_file_name(im.get("file_name"), instances_json)
        declared = None
        if im.get("height") is not None and im.get("width") is not None:
            declared = (int(im["height"]), int(im["width"]))
        cands.append(Candidate(
            os.path.splitext(name)[0], os.path.join(images_dir, name), split, labels=labels,
            mask_fn=_coco_mask_fn(items, cat_index), declared_size=declared,
            declared_in=instances_json))
    return cands, info


def _coco_file_name(name, instances_json: str) -> str:
    """A file_name must stay inside the images folder: no absolute path, no `..`."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"image entry has no file_name ({name!r})", path=instances_json)
    parts = re.split(r"[\\/]", name)
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) \
            or ".." in parts:
        raise DataError(f"file_name {name!r} points outside the images folder (absolute "
                        "path or '..'); refused", path=instances_json)
    return name


def _coco_mask_fn(items: list[dict], cat_index: dict):
    def draw(h: int, w: int) -> np.ndarray:
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
    opts.check()
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

"""Tiles of large frames: boxes, ids, tags from masks, and stitching back.

A classifier trained on whole-frame tags cannot localise a class that is in almost every
frame (CamVid: 9 of 11 classes in 86-100% of the train frames): with no negative example
it scores the class without looking at it. Tagging tiles gives the classifier negatives
again. The importers (`importers.ImportOptions.tiles` / `tile_size`) cut each frame into
tiles, one dataset row per tile, with `parent_id` and `tile_box` columns; evaluation
puts the tiles of a frame back together with `group_by_parent` and `stitch`.

Boxes are `(y0, x0, y1, x1)` in the parent frame's pixels, end-exclusive, so a tile is
`frame[y0:y1, x0:x1]`. The boxes of a frame cover it exactly once.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from .codecs import IGNORE_INDEX

Box = tuple[int, int, int, int]


def _edges(n: int, parts: int) -> list[int]:
    """`parts + 1` cut positions splitting 0..n into parts that differ by at most 1."""
    return [(k * n) // parts for k in range(parts + 1)]


def tile_boxes(h: int, w: int, rows: int, cols: int) -> list[tuple[int, int, Box]]:
    """A rows x cols grid over an (h, w) frame: [(i, j, (y0, x0, y1, x1))], row-major.

    Sizes that do not divide evenly are split as evenly as integers allow (tile heights
    differ by at most one pixel, as do widths). Raises ValueError when the frame has
    fewer pixels than the grid has rows or columns (a tile would be empty)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a tile grid needs at least 1x1, got {rows}x{cols}")
    if h < rows or w < cols:
        raise ValueError(f"a {w}x{h} frame cannot be cut into {rows}x{cols} tiles "
                         "(some would be empty)")
    ys, xs = _edges(h, rows), _edges(w, cols)
    return [(i, j, (ys[i], xs[j], ys[i + 1], xs[j + 1]))
            for i in range(rows) for j in range(cols)]


def grid_for_size(h: int, w: int, tile_h: int, tile_w: int) -> tuple[int, int]:
    """The grid (rows, cols) of tiles at most tile_h x tile_w over an (h, w) frame."""
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"a tile size must be at least 1x1, got {tile_h}x{tile_w}")
    return math.ceil(h / tile_h), math.ceil(w / tile_w)


def tile_boxes_by_size(h: int, w: int, tile_h: int, tile_w: int
                       ) -> list[tuple[int, int, Box]]:
    """Tiles of at most tile_h x tile_w pixels: the fewest rows and columns that keep
    every tile within that size, split evenly (`tile_boxes`), so there is no thin sliver
    of a last row or column: a 360-pixel-high frame with tile_h 160 gives rows of 120,
    not 160 + 160 + 40."""
    rows, cols = grid_for_size(h, w, tile_h, tile_w)
    return tile_boxes(h, w, rows, cols)


def tile_id(parent: str, i: int, j: int) -> str:
    """The image_id of tile (row i, column j) of `parent`: `<parent>@r<i>c<j>`.

    Stable (depends only on the parent's id and the tile's place) and unique within a
    dataset whose parent ids are unique (`@` followed by r<i>c<j> ends every tile id, so
    `parse_tile_id` recovers the parent even when the parent's id holds `@`)."""
    return f"{parent}@r{i}c{j}"


def parse_tile_id(image_id: str) -> tuple[str, int, int] | None:
    """(parent, i, j) of an id made by `tile_id`, or None when it is not one."""
    parent, sep, place = image_id.rpartition("@")
    if not sep or not place.startswith("r") or "c" not in place:
        return None
    i, _, j = place[1:].partition("c")
    if not (i.isdigit() and j.isdigit()):
        return None
    return parent, int(i), int(j)


def tile_tags(mask: np.ndarray, min_fraction: float, num_classes: int,
              background: bool = True) -> list[int]:
    """Image-level tags of a tile from its label map.

    mask: (H, W) uint8, 0 = background (when `background`), 1..K = classes,
    255 = ignore. A class is a tag when it covers at least `min_fraction` of the tile's
    labelled pixels (every pixel but 255; background pixels count as labelled, so a car
    on 0.5% of a mostly-road tile is not a tag at 0.01). Returns sorted classes in
    1..num_classes; empty when no class reaches the threshold (or nothing is labelled).
    Without a background class, value 0 must not occur (ValueError)."""
    counts = np.bincount(np.asarray(mask, np.uint8).ravel(), minlength=256)
    if not background and counts[0]:
        raise ValueError("mask holds value 0 but the dataset has no background class")
    labelled = int(counts.sum() - counts[IGNORE_INDEX])
    if labelled == 0:
        return []
    share = counts[1:num_classes + 1] / labelled
    return [int(c) + 1 for c in np.flatnonzero(share >= min_fraction)]


def cut(array: np.ndarray, box: Box) -> np.ndarray:
    """The part of a (H, W, ...) array inside box (a view)."""
    y0, x0, y1, x1 = box
    return array[y0:y1, x0:x1]


def stitch(tiles: Sequence[tuple[Sequence[int], np.ndarray]], h: int, w: int,
           fill=IGNORE_INDEX) -> np.ndarray:
    """Put tile arrays back into their frame.

    tiles: [(box, array)] with box (y0, x0, y1, x1) in the frame's pixels (a row's
    `tile_box`) and array (y1 - y0, x1 - x0, ...) (a label map (h, w), an image
    (h, w, 3), ...; for channel-first maps (K, h, w) move the channel axis last first).
    h, w: the frame's size (a row's `parent_size`). Returns (h, w, ...) of the first
    array's dtype; pixels no tile covers (tiles skipped at import because no class
    reached the threshold) hold `fill`, 255 by default: "ignore" in a label map. Tiles
    made by `tile_boxes` do not overlap; if given boxes do, later tiles win.
    Raises ValueError when an array's size differs from its box or a box leaves the
    frame.

    Stitching the tiles of a mask made by the importer gives back the imported mask bit
    for bit (tests/data/test_tiles.py)."""
    if not tiles:
        raise ValueError("no tiles to stitch")
    first = np.asarray(tiles[0][1])
    out = np.full((h, w, *first.shape[2:]), fill, dtype=first.dtype)
    for box, array in tiles:
        y0, x0, y1, x1 = (int(v) for v in box)
        array = np.asarray(array)
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"tile box {(y0, x0, y1, x1)} is outside a {w}x{h} frame")
        if array.shape[:2] != (y1 - y0, x1 - x0) or array.shape[2:] != first.shape[2:]:
            raise ValueError(f"tile of shape {array.shape} does not fit its box "
                             f"{(y0, x0, y1, x1)} (expected {(y1 - y0, x1 - x0)}"
                             f"{''.join(', ' + str(s) for s in first.shape[2:])})")
        out[y0:y1, x0:x1] = array
    return out


def group_by_parent(rows: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    """Rows of a dataset (or of a stage output joined with it) grouped by frame.

    rows: mappings with `image_id` and, for tiles, `parent_id` and `tile_box` (the
    dataset's columns; e.g. `table.to_pylist()`). Returns {frame id: [rows]}, frames in
    the order their first row came, each frame's tiles sorted by their box (top to
    bottom, left to right). A row without a `parent_id` (an untiled image) is a frame of
    its own under its `image_id`, so the same code serves tiled and untiled datasets.

    With `stitch`, per frame:
        stitch([(r["tile_box"], decode_mask(r["mask"])) for r in group], *frame_size(group))
    """
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        parent = row.get("parent_id")
        groups.setdefault(parent if parent is not None else row["image_id"], []).append(row)
    for key, group in groups.items():
        if any(r.get("tile_box") is not None for r in group):
            group.sort(key=lambda r: tuple(r["tile_box"]))
    return groups


def frame_size(group: Sequence[Mapping]) -> tuple[int, int]:
    """(h, w) of a frame from the rows of `group_by_parent`: the `parent_size` column,
    else the rows' own height and width (an untiled image), else the extent of the
    tile boxes (a frame whose last row or column of tiles was skipped is then smaller)."""
    for r in group:
        if r.get("parent_size") is not None:
            h, w = r["parent_size"]
            return int(h), int(w)
    if len(group) == 1 and group[0].get("tile_box") is None:
        return int(group[0]["height"]), int(group[0]["width"])
    boxes = [r["tile_box"] for r in group]
    return max(int(b[2]) for b in boxes), max(int(b[3]) for b in boxes)

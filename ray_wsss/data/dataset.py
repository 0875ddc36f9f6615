"""The dataset contract: one Parquet row per image, the class list beside it.

Columns (DESIGN.md): image_id, image (encoded bytes), height, width, labels
(list<int16>, classes 1..K), label_vector (K x uint8 multi-hot, which survives Ray Data's
tensor conversion where a list column does not), mask (PNG label map or null), split.

A dataset imported with tiles (`tiles.py`) has three more columns, null on rows that are
whole images: parent_id (the frame's id), tile_box (4 x int32: y0, x0, y1, x1 in the
frame's pixels, end-exclusive) and parent_size (2 x int32: the frame's height, width).
They are optional: `check_columns` and every reader need only `COLUMNS`.

`DatasetWriter` writes into a temporary folder and renames it into place on `commit()`,
so an import that fails half way leaves no dataset behind.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import DataError
from .codecs import IGNORE_INDEX

COLUMNS = ("image_id", "image", "height", "width", "labels", "label_vector", "mask", "split")
TILE_COLUMNS = ("parent_id", "tile_box", "parent_size")  # only in tiled datasets
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class DatasetInfo:
    """Class names (background excluded; class c in masks/labels is classes[c - 1])."""
    classes: tuple[str, ...]
    background: bool = True  # False: every labelled pixel is one of the classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {"classes": list(self.classes), "background": self.background,
                "ignore_index": IGNORE_INDEX}

    @classmethod
    def from_json(cls, data: dict, where: str = CLASSES_FILE) -> "DatasetInfo":
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes or \
                not all(isinstance(c, str) and c for c in classes):
            raise DataError("'classes' must be a non-empty list of names", path=where)
        if len(set(classes)) != len(classes):
            raise DataError("class names repeat", path=where)
        return cls(tuple(classes), bool(data.get("background", True)))

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the label-map values 0..K (value 0 is background)."""
        return ("background",) + self.classes


def arrow_schema(info: DatasetInfo, tiled: bool = False) -> pa.Schema:
    """The Parquet schema; `tiled` adds the nullable TILE_COLUMNS."""
    tile_fields = [
        pa.field("parent_id", pa.string(), nullable=True),
        pa.field("tile_box", pa.list_(pa.int32(), 4), nullable=True),
        pa.field("parent_size", pa.list_(pa.int32(), 2), nullable=True),
    ] if tiled else []
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("labels", pa.list_(pa.int16()), nullable=False),
        pa.field("label_vector", pa.list_(pa.uint8(), info.num_classes), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        *tile_fields,
    ], metadata={"ray_wsss.dataset": json.dumps(info.to_json())})


def labels_to_vector(labels: Iterable[int], num_classes: int) -> np.ndarray:
    """Classes 1..K -> multi-hot uint8 (K,)."""
    vec = np.zeros(num_classes, np.uint8)
    for c in labels:
        vec[int(c) - 1] = 1
    return vec


def label_matrix(column) -> np.ndarray:
    """A batch's label_vector column -> (B, K) uint8, whether Ray Data handed it over as
    a tensor column or as an object array of per-row arrays."""
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in arr]) if len(arr) else arr.astype(np.uint8)
    return arr.astype(np.uint8, copy=False)


def vector_to_labels(vector: np.ndarray) -> np.ndarray:
    """Multi-hot (K,) -> sorted classes 1..K as int64."""
    return np.flatnonzero(np.asarray(vector)) + 1


def evenly_spaced(ids: list, n: int) -> list:
    """At most n items of `ids` at an even stride from its start (sample images spread
    over the sorted ids, not the first n)."""
    return ids[:: max(1, len(ids) // max(n, 1))][:n]


def labels_from_mask(mask: np.ndarray, info: DatasetInfo) -> list[int]:
    values = np.unique(mask)
    return [int(v) for v in values if 1 <= v <= info.num_classes]


def check_mask_values(mask: np.ndarray, info: DatasetInfo, where: str, row: str | None = None
                      ) -> None:
    values = np.unique(mask)
    bad = [int(v) for v in values
           if v != IGNORE_INDEX and v > info.num_classes]
    if bad:
        raise DataError(f"mask holds value {bad[0]}, beyond the {info.num_classes} classes "
                        f"(allowed: 0..{info.num_classes}, {IGNORE_INDEX} = ignore)",
                        path=where, row=row)
    if not info.background and 0 in values:
        raise DataError("mask holds value 0 (background) but the dataset has no "
                        "background class", path=where, row=row)


class DatasetWriter:
    """Streams rows into Parquet files in a temporary folder; `commit()` publishes them.

    Use as a context manager: on an exception nothing is published and the temporary
    folder is removed.
    """

    def __init__(self, path: str, info: DatasetInfo, rows_per_file: int = 1024,
                 rows_per_group: int = 64, overwrite: bool = False, tiled: bool = False):
        self.path = storage.resolve(path)
        if storage.exists(self.path) and not overwrite:
            raise DataError("a dataset already exists here (pass overwrite to replace it)",
                            path=self.path)
        self.info = info
        self.tiled = tiled
        self.schema = arrow_schema(info, tiled)
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self.tmp = storage.temp_sibling(self.path)
        storage.makedirs(self.tmp)
        self._ids: set[str] = set()
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._files = 0
        self.counts: dict[str, int] = {}
        # rows holding each class, per split (label statistics)
        self.class_counts: dict[str, np.ndarray] = {}

    def add(self, row: dict, where: str | None = None) -> None:
        image_id = row["image_id"]
        if image_id in self._ids:
            raise DataError(f"duplicate image_id {image_id!r}", path=where, row=image_id)
        labels = list(row["labels"])
        if not labels:
            raise DataError("empty label list (every image needs at least one class)",
                            path=where, row=image_id)
        bad = [c for c in labels if not 1 <= int(c) <= self.info.num_classes]
        if bad:
            raise DataError(f"label {bad[0]} out of range 1..{self.info.num_classes}",
                            path=where, row=image_id)
        self._ids.add(image_id)
        full = dict(row)
        full["labels"] = sorted({int(c) for c in labels})
        full["label_vector"] = labels_to_vector(full["labels"], self.info.num_classes).tolist()
        full.setdefault("mask", None)
        if self.tiled:
            for col in TILE_COLUMNS:
                full.setdefault(col, None)
        elif any(full.get(col) is not None for col in TILE_COLUMNS):
            raise ValueError("a tile row needs a DatasetWriter(tiled=True)")
        self._buffer.append(full)
        self.counts[row["split"]] = self.counts.get(row["split"], 0) + 1
        per_class = self.class_counts.setdefault(row["split"],
                                                 np.zeros(self.info.num_classes, np.int64))
        per_class += np.asarray(full["label_vector"], np.int64)
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def __contains__(self, image_id: str) -> bool:
        """Whether a row with this image_id was added."""
        return image_id in self._ids

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            fs, tmp = storage.filesystem(self.tmp)
            name = storage.join(tmp, f"part-{self._files:05d}.parquet")
            self._writer = pq.ParquetWriter(name, self.schema, filesystem=fs,
                                            compression="zstd")
            self._files += 1
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.rows_per_group)
        self._rows_in_file += len(self._buffer)
        self._buffer = []
        if self._rows_in_file >= self.rows_per_file:
            self._writer.close()
            self._writer = None
            self._rows_in_file = 0

    def commit(self, extra: dict | None = None) -> str:
        if not self._ids:
            raise DataError("no image to write: the dataset would be empty", path=self.path)
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        meta = self.info.to_json()
        meta["counts"] = self.counts
        # a new id per import: runs that read this folder (data.source: parquet) see a
        # re-import into the same place as a different dataset
        meta["dataset_id"] = uuid.uuid4().hex
        if extra:
            meta.update(extra)
        storage.write_json_atomic(storage.join(self.tmp, CLASSES_FILE), meta)
        storage.publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        storage.remove(self.tmp)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


CROWDED_SHARE = 0.9  # a class in more of the training rows than this cannot be localised


def label_statistics(counts: dict[str, int], class_counts: dict[str, np.ndarray],
                     info: DatasetInfo) -> dict:
    """Per split, the share of its rows that hold each class:
    {split: {"rows": n, "share": {class name: fraction in [0, 1]}}}."""
    return {split: {"rows": int(counts[split]),
                    "share": {name: round(float(c) / counts[split], 4)
                              for name, c in zip(info.classes, class_counts[split])}}
            for split in sorted(counts)}


def crowded_class_warnings(stats: dict, train_split: str, tiled: bool = False,
                           limit: float = CROWDED_SHARE) -> list[str]:
    """Warnings for the classes in more than `limit` of the rows of `train_split`.

    Such a class has (almost) no negative example: the classifier can score it without
    looking at it, so its CAM does not localise it."""
    split = stats.get(train_split)
    if split is None:
        return []
    hint = "consider smaller tiles" if tiled else "consider --tiles"
    unit = "tiles" if tiled else "images"
    return [f"class {name} is in {100 * share:.0f}% of the {train_split} {unit}: its CAM "
            f"will not localise; {hint}"
            for name, share in split["share"].items() if share > limit]


def read_meta(path: str) -> dict:
    """The whole classes.json of a dataset (class list, counts, tiling, label_stats...)."""
    where = storage.join(storage.resolve(path), CLASSES_FILE)
    if not storage.exists(where):
        raise DataError(f"not a ray-wsss dataset (no {CLASSES_FILE})",
                        path=storage.resolve(path))
    try:
        return storage.read_json(where)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", path=where) from None


def read_tiling(path: str) -> dict | None:
    """How a dataset was tiled at import (classes.json's `tiling`), None if it was not:
    {"grid": [rows, cols]} or {"tile_size": [h, w]}, "min_fraction", "tags" ("masks" or
    "csv"), "tags_csv", "splits", "tiles", "skipped_tiles"."""
    return read_meta(path).get("tiling")


def read_info(path: str) -> DatasetInfo:
    where = storage.join(storage.resolve(path), CLASSES_FILE)
    if not storage.exists(where):
        raise DataError(f"not a ray-wsss dataset (no {CLASSES_FILE}; import the data "
                        "with `ray-wsss import` first)", path=storage.resolve(path))
    try:
        data = storage.read_json(where)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", path=where) from None
    return DatasetInfo.from_json(data, where)


def parquet_files(path: str) -> list[str]:
    path = storage.resolve(path)
    files = [storage.join(path, f) for f in storage.listdir(path) if f.endswith(".parquet")]
    if not files:
        raise DataError("no Parquet files in the dataset folder", path=path)
    return files


def check_columns(path: str, required: Sequence[str] = COLUMNS) -> None:
    """Every Parquet file must hold the required columns (read from footers only)."""
    for f in parquet_files(path):
        fs, p = storage.filesystem(f)
        try:
            schema = pq.read_schema(p, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise DataError(f"not a readable Parquet file ({exc})", path=f) from None
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise DataError(f"missing column(s) {', '.join(missing)}", path=f)


def open_dataset(path: str, columns: Sequence[str] | None = None,
                 splits: Sequence[str] | None = None, require: Sequence[str] = (),
                 rows_per_block: int | None = None, ids: Sequence[str] | None = None):
    """Ray Dataset over a dataset (or stage output) folder, with only `columns`, the rows
    of `splits` (and of `ids`), and only rows where the `require` columns are not null.

    `rows_per_block`: cut blocks to at most this many rows (streaming, no shuffle), so
    that one large file still feeds every worker of the next map."""
    import ray.data

    needed = set(COLUMNS if columns is None else columns) | set(require)
    if splits is not None:
        needed.add("split")
    if ids is not None:
        needed.add("image_id")
    check_columns(path, tuple(needed))
    ds = ray.data.read_parquet(parquet_files(path))
    if columns is not None:
        # Project first so that only these columns are read from the files.
        ds = ds.select_columns(sorted(needed))
    if splits is not None or require or ids is not None:
        ds = ds.map_batches(RowFilter(splits, require, ids), batch_format="pyarrow",
                            batch_size=None)
    if columns is not None and set(columns) != needed:
        ds = ds.select_columns(list(columns))
    if rows_per_block is not None:
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    return ds


class RowFilter:
    """Keeps the rows of some splits (and ids) whose `require` columns are set: a pyarrow
    kernel, not a Python call per row."""

    def __init__(self, splits: Sequence[str] | None = None, require: Sequence[str] = (),
                 ids: Sequence[str] | None = None):
        self.splits = None if splits is None else list(splits)
        self.require = tuple(require)
        self.ids = None if ids is None else list(ids)

    def __call__(self, table: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        keep = None
        for col, values in (("split", self.splits), ("image_id", self.ids)):
            if values is not None:
                hit = pc.is_in(table[col], value_set=pa.array(values, pa.string()))
                keep = hit if keep is None else pc.and_(keep, hit)
        for col in self.require:
            valid = pc.is_valid(table[col])
            keep = valid if keep is None else pc.and_(keep, valid)
        return table if keep is None else table.filter(keep)


def read_table(path: str, columns: Sequence[str], splits: Sequence[str] | None = None,
               ids: Sequence[str] | None = None) -> pa.Table:
    """Read a few columns / rows of a folder on the driver with pyarrow (filters pushed
    down to the files). For small selections (ids, a sample); stages use `open_dataset`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    check_columns(path, tuple(set(columns) | ({"split"} if splits else set())
                              | ({"image_id"} if ids is not None else set())))
    fs, _ = storage.filesystem(path)
    files = [storage.filesystem(f)[1] for f in parquet_files(path)]
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    expr = None
    for col, values in (("split", splits), ("image_id", ids)):
        if values is not None:
            hit = pc.field(col).isin(pa.array(list(values), pa.string()))
            expr = hit if expr is None else expr & hit
    return dataset.to_table(columns=list(columns), filter=expr)


def dataset_counts(path: str) -> dict[str, int]:
    """Rows per split, from Parquet metadata and the split column only."""
    counts: dict[str, int] = {}
    for f in parquet_files(path):
        fs, p = storage.filesystem(f)
        table = pq.read_table(p, filesystem=fs, columns=["split"])
        for s, n in zip(*np.unique(table.column("split").to_numpy(zero_copy_only=False),
                                   return_counts=True)):
            counts[str(s)] = counts.get(str(s), 0) + int(n)
    return counts


def split_rows(path: str, splits: Sequence[str]) -> int:
    """How many rows `splits` hold together (Parquet's split column only)."""
    counts = dataset_counts(path)
    return sum(counts.get(s, 0) for s in set(splits))

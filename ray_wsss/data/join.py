"""Joining stage outputs on `image_id`: the one way a stage reads columns that another
folder holds.

Stage outputs carry `image_id` and their own new columns, not copies of the encoded
images. A stage that needs, say, the image of the dataset beside the pseudo mask of the
CRF step streams one folder and looks the other's columns up by id:

    ds = open_dataset(dataset, ["image_id", "image", "label_vector"], ["train"])
    ds = with_columns(ds, crf_folder, ["pseudo_mask"])

The lookup side is indexed once per actor (its `image_id` column and the Parquet
row-group layout: a few bytes per row), and each batch reads only the row groups that
hold its ids, only the wanted columns. Put the large columns (encoded images) on the
streamed side and the small ones (masks, maps) on the looked-up side; no shuffle of the
images is needed, and memory stays bounded by the index plus a few row groups.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from .. import storage
from ..errors import DataError


class ColumnLookup:
    """Ray Data callable class: adds `columns` of the rows with the same image_id in the
    Parquet folder `path` to each batch. A batch id missing there is a DataError naming
    it, unless `missing_ok`, where the columns are None for it."""

    def __init__(self, path: str, columns: Sequence[str], missing_ok: bool = False,
                 cache_groups: int = 16):
        import pyarrow.parquet as pq

        from .dataset import check_columns, parquet_files

        self.path, self.columns, self.missing_ok = path, list(columns), missing_ok
        check_columns(path, ("image_id", *self.columns))
        self.files = parquet_files(path)
        self.index: dict[str, tuple[int, int, int]] = {}
        for fi, f in enumerate(self.files):
            fs, p = storage.filesystem(f)
            pf = pq.ParquetFile(p, filesystem=fs)
            for rg in range(pf.num_row_groups):
                ids = pf.read_row_group(rg, columns=["image_id"]).column(0).to_pylist()
                for off, image_id in enumerate(ids):
                    self.index[image_id] = (fi, rg, off)
        self._files: dict[int, object] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_groups

    def _group(self, fi: int, rg: int):
        import pyarrow.parquet as pq

        key = (fi, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if fi not in self._files:
            fs, p = storage.filesystem(self.files[fi])
            self._files[fi] = pq.ParquetFile(p, filesystem=fs)
        table = self._files[fi].read_row_group(rg, columns=self.columns)
        self._cache[key] = {c: table.column(c).to_pylist() for c in self.columns}
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return self._cache[key]

    def lookup(self, ids: Sequence[str]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in self.columns}
        for image_id in ids:
            where = self.index.get(str(image_id))
            if where is None:
                if not self.missing_ok:
                    raise DataError(f"image_id {image_id} has no row in this stage output "
                                    f"(computed on other splits or images?)", path=self.path)
                for c in self.columns:
                    out[c].append(None)
                continue
            group = self._group(where[0], where[1])
            for c in self.columns:
                out[c].append(group[c][where[2]])
        return out

    def __call__(self, batch: dict) -> dict:
        found = self.lookup(batch["image_id"])
        out = dict(batch)
        for c, values in found.items():
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[c] = arr
        return out


def with_columns(ds, path: str, columns: Sequence[str], missing_ok: bool = False,
                 batch_size: int = 32, actors: int = 1):
    """`ds` with `columns` of the rows of folder `path` joined on image_id (streaming).

    One light actor by default (the lookup is I/O, not compute); more on a cluster
    where the stream is wide. The actor holds no CPU: beside a model's actor pool that
    takes all CPUs but one (actors.actor_count), a lookup holding part of the last CPU
    would starve the read tasks that feed both (the stage would hang)."""
    import ray.data

    return ds.map_batches(
        ColumnLookup, fn_constructor_kwargs={"path": storage.resolve(path),
                                             "columns": list(columns),
                                             "missing_ok": missing_ok},
        compute=ray.data.ActorPoolStrategy(size=max(1, actors)), batch_size=batch_size,
        batch_format="numpy", num_cpus=0)


def read_joined(paths_columns: Sequence[tuple[str, Sequence[str]]],
                ids: Sequence[str]) -> list[dict]:
    """Driver-side: the rows of `ids` with columns from several folders, one dict per
    id (in the order of `ids`). For a handful of rows (the report's samples)."""
    rows = {str(i): {"image_id": str(i)} for i in ids}
    for path, cols in paths_columns:
        found = ColumnLookup(path, cols, missing_ok=True).lookup(list(rows))
        for c, values in found.items():
            for image_id, v in zip(rows, values):
                rows[image_id][c] = v
    return [rows[str(i)] for i in ids]

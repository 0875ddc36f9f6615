"""Stage `dataset`: make the run's dataset from `data.source`.

`demo` generates the bundled synthetic dataset; `voc`, `folder` and `coco` import from
`data.path`; `parquet` uses an already imported dataset in place (checked, not copied).
"""
from __future__ import annotations

import os

from ..errors import ConfigError
from . import demo, importers
from .dataset import check_columns, dataset_counts, read_info


def import_options(config, root: str | None = None, overwrite: bool = True
                   ) -> importers.ImportOptions:
    data = config.data
    opts = importers.ImportOptions(
        mask_offset=data.mask_offset, ignore_values=tuple(data.ignore_values),
        max_image_side=data.max_image_side, skip_bad=data.skip_bad, overwrite=overwrite,
        tiles=data.tiles, tile_size=data.tile_size, tile_min_fraction=data.tile_min_fraction,
        tile_tags=_under(root, data.tile_tags) if root else data.tile_tags,
        tile_splits=data.tile_splits, apply_exif=data.apply_exif,
        max_megapixels=data.max_megapixels, train_split=config.classifier.train_split)
    opts.check()
    return opts


def _under(root: str, path: str | None) -> str | None:
    if path is None:
        return None
    return path if os.path.isabs(path) else os.path.join(root, path)


def run(config, ctx) -> dict:
    data = config.data
    out = ctx.dataset_path
    if data.source == "parquet":
        check_columns(out)
        read_info(out)
        return {"counts": dataset_counts(out)}
    if data.source == "demo":
        d = data.demo
        demo.generate(out, d.num_train, d.num_val, d.image_size, d.seed, overwrite=True)
        return {"counts": dataset_counts(out)}
    if not data.path:
        raise ConfigError(f"data.path must name the folder to import (data.source is "
                          f"{data.source})")
    root = os.path.abspath(os.path.expanduser(data.path))
    opts = import_options(config, root)
    if data.source == "voc":
        splits = [s.split for s in data.subsets] or None
        result = importers.import_voc(root, out, opts, splits=splits)
    elif data.source == "folder":
        if not data.subsets:
            raise ConfigError("data.subsets must list the folders to import "
                              "(split, images, masks)")
        subsets = [(s.split, _under(root, s.images), _under(root, s.masks))
                   for s in data.subsets]
        result = importers.import_folder(
            subsets, out, labels_csv=_under(root, data.labels_csv),
            classes=data.classes or None, background=data.background, opts=opts,
            ids_files=[_under(root, s.ids) for s in data.subsets])
    else:  # coco
        if not data.subsets or any(s.annotations is None for s in data.subsets):
            raise ConfigError("data.subsets must list {split, images, annotations} for coco "
                              "(annotations: the instances JSON of that split)")
        result = importers.import_coco(
            [(s.split, _under(root, s.annotations), _under(root, s.images))
             for s in data.subsets], out, opts)
    for warning in getattr(result, "warnings", []):
        print(f"[ray-wsss] warning: {warning}", flush=True)
    summary = {"counts": result.counts, "skipped": len(result.skipped)}
    if opts.tiled:
        summary.update(tiles=result.tiles, skipped_tiles=len(result.skipped_tiles))
    return summary

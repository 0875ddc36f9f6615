"""`ray-wsss export`: a finished run's masks as PNG files, or its segmentation model.

Masks are written the way other segmentation toolkits read them (VOC's
SegmentationClass layout): `<out>/<image_id>.png`, one palette PNG per image (VOC colour
map; pixel values 0 = background, 1..K the classes, 255 = ignore), plus
`<out>/<split>.txt` listing the ids of each split (ImageSets style) and
`<out>/classes.json` naming the values. The PNG bytes are the stored ones, so the files
hold exactly what the run evaluated. The model is `model.pt` + `model.json` (load it
with `ray_wsss.models.registry.load_model`). Boxes (`--what boxes`) are the weakly
supervised localisation of the CAM stage's maps: `<out>/boxes.json`, one record per
image and labelled class (`cams/boxes.py`: the box of the largest region above
`explain.box_threshold` of the min-max normalised map, [x0, y0, x1, y1] in pixel edges,
null where nothing is above it, and the classifier's probability as the score).

With `stitch` (tiled datasets), the tiles of each frame are put back together: one
`<frame id>.png` per frame, its pixels from its tiles' masks (255 where a tile was
skipped at import), and the split lists name frames.

The files are read from the run's Parquet outputs a record batch at a time (memory
bounded by a batch), written into a temporary folder and renamed into place when done.
"""
from __future__ import annotations

import pyarrow.parquet as pq

from . import storage
from .errors import StageError

# what -> (stage, column)
SOURCES = {"pseudo-masks": ("crf", "pseudo_mask"), "seeds": ("crf", "seed"),
           "random-walk-masks": ("random_walk", "rw_mask"),
           "predictions": ("predict", "prediction"),
           "predictions-crf": ("predict", "prediction_crf"),
           "boxes": ("cams", "cam"),
           "model": ("segmenter", None)}


def _last_round(manifest: dict, stage: str) -> int:
    rounds = [int(k.partition("@")[2] or 1) for k, v in manifest.get("stages", {}).items()
              if k.partition("@")[0] == stage and v.get("status") == "done"]
    if not rounds:
        raise StageError(f"export: no finished {stage} step in this run directory")
    return max(rounds)


def safe_name(image_id: str) -> str:
    """A file name for an image id (ids come from file names; tiles add `@r0c1`)."""
    bad = [c for c in ("/", "\\", "\0") if c in image_id]
    if bad or image_id in ("", ".", ".."):
        raise StageError(f"export: image_id {image_id!r} cannot be a file name")
    return image_id


def export(run_dir: str, what: str, out: str, splits=None, round: int | None = None,
           overwrite: bool = False, stitch: bool = False) -> dict:
    """Write `what` of the run in `run_dir` into the new folder `out`."""
    from .config import PipelineConfig, from_dict
    from .graph import Step
    from .run import Run

    if what not in SOURCES:
        raise StageError(f"export: --what must be one of {', '.join(SOURCES)}")
    root = storage.resolve(run_dir)
    manifest_path = storage.join(root, "manifest.json")
    if not storage.exists(manifest_path):
        raise StageError(f"export: {root} is not a run directory (no manifest.json)")
    manifest = storage.read_json(manifest_path)
    run = Run(from_dict(PipelineConfig, manifest["config"]), root)
    stage, column = SOURCES[what]
    step = Step(stage, round or _last_round(manifest, stage))
    if not run.is_done(step):
        raise StageError(f"export: step {step.key} is not finished in {root}")
    if stitch and what in ("boxes", "model"):
        raise StageError(f"export: --stitch puts mask tiles together; --what {what} has none")
    out = storage.resolve(out)
    if storage.exists(out):
        if not overwrite:
            raise StageError(f"export: {out} exists (pass --overwrite to replace it)")
    tmp = storage.temp_sibling(out)
    storage.makedirs(tmp)
    try:
        if column is None:
            files = _export_model(run.step_path(step), tmp)
        elif what == "boxes":
            files = _export_boxes(run, run.step_path(step), tmp, splits)
        else:
            files = _export_masks(run, run.step_path(step), column, tmp, splits, stitch)
    except BaseException:
        storage.remove(tmp)
        raise
    storage.publish(tmp, out)
    return {"files": files, "path": out, "step": step.key}


def _export_model(model_dir: str, out: str) -> int:
    for name in ("model.pt", "model.json"):
        storage.write_bytes_atomic(storage.join(out, name),
                                   storage.read_bytes(storage.join(model_dir, name)))
    return 2


def _rows(folder: str, columns: list[str], splits):
    """The rows of a stage's Parquet output (tuples in `columns` order, the second
    column the split), a record batch at a time, those of `splits` only (None: all)."""
    from .data.dataset import check_columns, parquet_files

    check_columns(folder, columns)
    for f in parquet_files(folder):
        fs, p = storage.filesystem(f)
        for batch in pq.ParquetFile(p, filesystem=fs).iter_batches(batch_size=64,
                                                                   columns=columns):
            for row in zip(*(batch.column(c).to_pylist() for c in columns)):
                if splits is None or row[1] in splits:
                    yield row


def _export_boxes(run, folder: str, out: str, splits) -> int:
    """boxes.json: a record per (image, labelled class) of the CAM stage's output."""
    from .cams.boxes import box_records, write_box_records
    from .data.codecs import decode_array
    from .data.dataset import vector_to_labels

    names = run.dataset_info().classes
    threshold = run.config.explain.box_threshold
    records = []
    for image_id, split, cam, vec, probs in _rows(
            folder, ["image_id", "split", "cam", "label_vector", "probs"], splits):
        if cam is None:
            continue
        maps = decode_array(cam, f"image_id {image_id}")
        records += [{**r, "split": split} for r in box_records(
            image_id, maps, vector_to_labels(vec) - 1, names, probs, threshold)]
    if not records:
        raise StageError(f"export: no CAMs in {folder}"
                         + (f" for split(s) {', '.join(splits)}" if splits else ""))
    write_box_records(records, storage.join(out, "boxes.json"))
    return 1


class _Stitcher:
    """Collects the tiles of each frame and hands a frame's stitched mask over as soon as
    its last tile has come (memory: the frames still incomplete)."""

    def __init__(self, dataset_path: str):
        from .data.dataset import TILE_COLUMNS, read_table, read_tiling

        if read_tiling(dataset_path) is None:
            raise StageError("export: --stitch needs a tiled dataset (imported with "
                             "--tiles or data.tiles); this run's dataset is not tiled")
        rows = read_table(dataset_path, ["image_id", *TILE_COLUMNS]).to_pylist()
        self.tile = {r["image_id"]: r for r in rows if r["parent_id"] is not None}
        self.expected: dict[str, int] = {}
        self.size: dict[str, tuple[int, int]] = {}
        for r in self.tile.values():
            self.expected[r["parent_id"]] = self.expected.get(r["parent_id"], 0) + 1
            self.size[r["parent_id"]] = tuple(int(v) for v in r["parent_size"])
        self.pending: dict[str, list] = {}
        self.split: dict[str, str] = {}

    def add(self, image_id: str, data: bytes, split: str):
        """[(frame id, PNG bytes)]: the frames this tile completes (an untiled image
        passes through as its own frame)."""
        from .data.codecs import decode_mask

        r = self.tile.get(image_id)
        if r is None:
            return [(image_id, data)]
        self.split[r["parent_id"]] = split
        group = self.pending.setdefault(r["parent_id"], [])
        group.append((r["tile_box"], decode_mask(data, f"image_id {image_id}")))
        if len(group) < self.expected[r["parent_id"]]:
            return []
        return [self._frame(r["parent_id"])]

    def rest(self):
        """The frames whose tiles did not all come (their other pixels are 255)."""
        return [self._frame(parent) for parent in list(self.pending)]

    def _frame(self, parent: str):
        from .data.codecs import encode_mask
        from .data.tiles import stitch

        return parent, encode_mask(stitch(self.pending.pop(parent), *self.size[parent]))


def _export_masks(run, folder: str, column: str, out: str, splits,
                  stitch: bool = False) -> int:
    stitcher = _Stitcher(run.dataset_path) if stitch else None

    def pngs():
        """(name, split, PNG bytes) of every image, or of every stitched frame."""
        for image_id, split, data in _rows(folder, ["image_id", "split", column], splits):
            if data is None:
                continue
            ready = [(image_id, data)] if stitcher is None else \
                stitcher.add(image_id, data, split)
            yield from ((name, split, png) for name, png in ready)
        if stitcher is not None:
            yield from ((name, stitcher.split[name], png) for name, png in stitcher.rest())

    ids_by_split: dict[str, list[str]] = {}
    files = 0
    for name, split, png in pngs():
        storage.write_bytes_atomic(storage.join(out, safe_name(name) + ".png"), png)
        ids_by_split.setdefault(split, []).append(name)
        files += 1
    if not files:
        raise StageError(f"export: no {column} in {folder}"
                         + (f" for split(s) {', '.join(splits)}" if splits else ""))
    for split, ids in ids_by_split.items():
        storage.write_bytes_atomic(storage.join(out, f"{split}.txt"),
                                   ("\n".join(sorted(ids)) + "\n").encode())
    info = run.dataset_info()
    storage.write_json_atomic(storage.join(out, "classes.json"),
                              {"values": {str(i): n for i, n in enumerate(info.label_names)},
                               "ignore": 255, "background": info.background})
    return files

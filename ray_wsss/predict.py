"""Stage `predict`: the fitted segmentation model applied to every image, on Ray Data
actors, and scored against ground truth.

Each actor loads the model once (on a GPU when `predict.gpus_per_actor` > 0) and turns
batches of encoded images into label maps: softmax scores averaged over the TTA scales
and flips (DeepLab's multi-scale inference), argmax, and optionally a dense CRF over the
scores (`predict.crf`, kernels of the `crf` section). The model sees no tags: it labels
images as it would label new photos.

Tiled datasets (`data.tiles`): with `predict.whole_frames` the tiles of a frame are
stitched back into the frame, the model (fully convolutional) labels the whole frame,
with the context a tile lacks, and its label map is cut back into the tiles, so the rows
and the scores stay per tile. Tiles partition their frame, so the confusion matrix
summed over the tiles is the stitched frames' (tests/test_tiles_pipeline.py checks it
against a scoring of the stitched frames).

Output rows (predictions/*.parquet): image_id, split, mask (the ground truth, small,
kept so the scoring needs no join), prediction (PNG), prediction_crf (PNG, with
`predict.crf`). The scores on `predict.evaluate_splits` go to metrics.json under the
step's key (`predict`, `predict@2`): per split, mIoU, pixel accuracy, F1 and per class.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .actors import ActorResources, actor_count, map_with_model
from .config import CrfConfig
from .data.codecs import decode_image, encode_mask, scaled_size
from .data.dataset import RowFilter, open_dataset
from .runtime import write_parquet


class SegmentPredictor:
    """Ray Data callable class: dataset rows -> predicted label maps."""

    def __init__(self, model_dir: str, scales: Sequence[float] = (1.0,), flip: bool = True,
                 threads: int = 1, use_gpu: bool = False, max_side: int | None = None,
                 crf: CrfConfig | None = None, allow_cpu_fallback: bool = False):
        import torch

        from .models.registry import load_model
        from .runtime import torch_device

        torch.set_num_threads(max(1, threads))
        self.device = torch_device(use_gpu, allow_cpu_fallback, "predict.gpus_per_actor")
        self.model = load_model(model_dir, self.device, kind="segmenter").eval()
        self.scales, self.flip, self.max_side, self.crf = tuple(scales), flip, max_side, crf

    def scores(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Softmax scores (L, H, W) float32 per image, averaged over scales and flips."""
        import torch
        import torch.nn.functional as F

        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape[:2], []).append(i)
        with torch.no_grad():
            for (h, w), idx in by_size.items():
                x = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
                x = x.permute(0, 3, 1, 2).float()
                nh, nw = scaled_size(h, w, self.max_side)
                acc = 0
                for s in self.scales:
                    size = (max(1, round(nh * s)), max(1, round(nw * s)))
                    xs = x if size == (h, w) else F.interpolate(
                        x, size=size, mode="bilinear", align_corners=False)
                    p = self.model(xs).softmax(1)
                    if self.flip:
                        p = (p + self.model(xs.flip(-1)).softmax(1).flip(-1)) / 2
                    acc = acc + (p if p.shape[-2:] == (h, w) else F.interpolate(
                        p, size=(h, w), mode="bilinear", align_corners=False))
                probs = (acc / len(self.scales)).cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = probs[j]
        return out

    def __call__(self, batch: dict) -> dict:
        from .refine.crf import dense_crf

        images = [decode_image(d, f"image_id {i}") for d, i in zip(batch["image"],
                                                                     batch["image_id"])]
        scores = self.scores(images)
        out = {"image_id": batch["image_id"], "split": batch["split"], "mask": batch["mask"],
               "prediction": np.array([encode_mask(s.argmax(0).astype(np.uint8))
                                       for s in scores], dtype=object)}
        if self.crf is not None:
            out["prediction_crf"] = np.array(
                [encode_mask(dense_crf(img, s, self.crf).argmax(0).astype(np.uint8))
                 for img, s in zip(images, scores)], dtype=object)
        return out


class FramePredictor(SegmentPredictor):
    """Ray Data callable class for `map_groups`: each call gets the rows of one frame
    (its tiles, or one untiled image) and labels the whole frame."""

    def __call__(self, group: dict) -> dict:
        from .data.tiles import cut, stitch
        from .refine.crf import dense_crf

        boxes = group["tile_box"]
        if boxes[0] is None:  # an untiled image: a frame of its own
            return super().__call__(group)
        images = [decode_image(d, f"image_id {i}") for d, i in zip(group["image"],
                                                                     group["image_id"])]
        h, w = (int(v) for v in group["parent_size"][0])
        # tiles skipped at import (no class above the threshold) leave black holes: the
        # model still sees the rest of the frame, and those pixels have no row to score
        frame = stitch([(b, img) for b, img in zip(boxes, images)], h, w, fill=0)
        scores = self.scores([frame])[0]
        maps = {"prediction": scores.argmax(0).astype(np.uint8)}
        if self.crf is not None:
            maps["prediction_crf"] = dense_crf(frame, scores, self.crf).argmax(0).astype(
                np.uint8)
        out = {"image_id": group["image_id"], "split": group["split"], "mask": group["mask"]}
        for name, label in maps.items():
            out[name] = np.array([encode_mask(np.ascontiguousarray(cut(label, b)))
                                  for b in boxes], dtype=object)
        return out


class _FrameRows:
    """Ray Data UDF over the dataset's file blocks: the rows of `splits`, each with
    `frame` (the parent's id for a tile, the image's own id otherwise). The split filter
    and the key are one call on purpose: Ray Data does not call a UDF on an empty block
    and passes on an empty block without columns, and the group-by's hash shuffle then
    fails to concatenate it with the others ("ArrowInvalid: Schema at index 1 was
    different"); a file holding none of the split's rows (a train file when predicting
    val) made such a block when the filter and the key were two maps. Here an empty
    result keeps the schema."""

    def __init__(self, splits):
        self.filter = RowFilter(splits)

    def __call__(self, batch):
        import pyarrow.compute as pc

        batch = self.filter(batch)
        return batch.append_column("frame", pc.coalesce(batch.column("parent_id"),
                                                        batch.column("image_id")))


def frame_rows(ds, splits: Sequence[str]):
    """The rows of `splits` of `ds` (a tiled dataset's blocks, unfiltered, with the
    columns `split`, `image_id` and the tile columns) with `frame`, ready to be grouped
    by frame."""
    return ds.map_batches(_FrameRows(splits), batch_format="pyarrow", batch_size=None)


def prediction_dataset(config, dataset_path: str, model_dir: str, splits=None):
    """The (lazy) Ray Dataset of prediction rows for `splits` (default predict.splits)."""
    from .data.dataset import TILE_COLUMNS, read_tiling, split_rows
    from .runtime import gpus_usable

    cfg = config.predict
    use_gpu = gpus_usable(cfg.gpus_per_actor > 0, config.ray.allow_cpu_fallback,
                          "predict.gpus_per_actor", probe_gpus=cfg.gpus_per_actor)
    res = ActorResources.of(cfg, "predict")
    if cfg.gpus_per_actor > 0 and not use_gpu:  # the CPU fallback: no GPU to ask Ray for
        res = ActorResources(cfg.num_actors or 1, cfg.cpus_per_actor, 0.0, "predict")
    kwargs = {"model_dir": model_dir, "scales": cfg.scales, "flip": cfg.flip,
              "threads": cfg.torch_threads or cfg.cpus_per_actor, "use_gpu": use_gpu,
              "max_side": cfg.max_image_side, "crf": config.crf if cfg.crf else None,
              "allow_cpu_fallback": config.ray.allow_cpu_fallback}
    columns = ["image_id", "split", "image", "mask"]
    splits = list(splits or cfg.splits)
    if cfg.whole_frames and read_tiling(dataset_path) is not None:
        # all the tiles of a frame in one call: a group-by (a shuffle of the rows of
        # `splits`; images are small next to the model's work on them)
        ds = frame_rows(open_dataset(dataset_path, columns + list(TILE_COLUMNS)), splits)
        import ray.data
        # a few hash partitions per actor, not Ray Data's default of 200 (each a task)
        return ds.groupby("frame", num_partitions=4 * actor_count(res)).map_groups(
            FramePredictor, fn_constructor_kwargs=kwargs, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actor_count(res)),
            num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor or None)
    ds = open_dataset(dataset_path, columns, splits, rows_per_block=cfg.batch_size)
    return map_with_model(ds, SegmentPredictor, kwargs, res, cfg.batch_size,
                          rows=split_rows(dataset_path, splits))


def score(config, info, predictions: str, splits: Sequence[str]) -> dict:
    """Confusion-matrix metrics of the stored predictions on `splits` (images with
    ground truth), per split and over all of them."""
    from .data.dataset import read_table
    from .evaluate import ConfusionMatrix, _masks_batch, _sums

    cols = ["prediction"] + (["prediction_crf"] if config.predict.crf else [])
    n = info.num_classes + 1
    exclude = () if info.background else (0,)
    out = {}
    for split in splits:
        ds = open_dataset(predictions, ["image_id", "mask", *cols], [split], require=("mask",),
                          rows_per_block=config.evaluate.batch_size)
        totals = _sums(ds.map_batches(_masks_batch, batch_size=config.evaluate.batch_size,
                                      batch_format="numpy",
                                      fn_kwargs={"columns": cols, "n_labels": n}), cols)
        if not totals:
            continue
        out[split] = {c: ConfusionMatrix(n, totals[c]).metrics(info.label_names, exclude)
                      for c in cols}
        index = read_table(predictions, ["image_id", "mask"], [split])
        out[split]["images"] = int(sum(index.column("mask").is_valid().to_pylist()))
    return out


def run(config, ctx) -> dict:
    cfg = config.predict
    with ctx.output() as out:
        write_parquet(prediction_dataset(config, ctx.dataset_path, ctx.input("segmenter")),
                      out, config.ray)
    scored = score(config, ctx.dataset_info(), ctx.path,
                   [s for s in cfg.evaluate_splits if s in cfg.splits])
    ctx.write_metrics({"splits": list(scored), "scores": scored})
    summary = {f"{split}_miou": round(100 * m["prediction"]["miou"], 2)
               for split, m in scored.items()}
    return summary

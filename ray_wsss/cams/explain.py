"""`ray-wsss explain`: compare explaining methods on one trained classifier.

A Ray Data job like the CAM stage: actors load the classifier once and, for every image
of `explain.splits` and every method, compute the maps with the CAM stage's TTA, the XAI
metrics of `xai.py` over the image's detected classes, and, where ground truth exists, the
seeds' confusion matrices over the background-threshold sweep (maps of the labelled
classes, as the CAM stage makes them). Only sums reach the driver.

Beside them, per method: ROAD (MoRF, LeRF and combined) and the areas under the deletion
and insertion curves over the detected classes (`road.py`), and, on images with ground
truth, the box accuracy (CorLoc) of the maps of the labelled classes (`boxes.py`).

Writes <run>/explain/comparison.csv and comparison.json, sample maps per method for the
report (samples.parquet), and an `explain` section in metrics.json.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import time

import numpy as np

from .. import storage
from ..config import PipelineConfig
from ..data.codecs import decode_image, decode_mask, encode_array
from ..data.dataset import (evenly_spaced, label_matrix, open_dataset, read_table,
                            vector_to_labels)
from ..errors import ConfigError, StageError
from ..evaluate import ConfusionMatrix
from ..run import Run
from .boxes import localisation_hits
from .methods import METHODS, get_method
from .road import (FaithfulnessOptions, faithfulness_metrics, faithfulness_options,
                   faithfulness_sums, sums_length)
from ..actors import ActorResources, map_with_model
from .stage import method_options
from .xai import KEYS, xai_metrics, xai_sums


class Explainer:
    """Ray Data callable class: a batch of images -> per-method sums and sample maps."""

    def __init__(self, model_dir: str, methods, scales, flip, thresholds, n_labels: int,
                 background: bool, sample_ids, threads: int = 1, use_gpu: bool = False,
                 options: dict | None = None, max_side: int | None = None,
                 faithfulness: FaithfulnessOptions = FaithfulnessOptions(),
                 box_threshold: float = 0.2, prior_channels: int = 0,
                 output_stride: int | None = None):
        from .predict import MapMaker

        self.maker = MapMaker(model_dir, scales, flip, threads, use_gpu, options, max_side,
                              output_stride=output_stride)
        self.methods = list(methods)
        self.thresholds = list(thresholds)
        self.n_labels, self.background = n_labels, background
        self.sample_ids = set(sample_ids)
        self.faithfulness, self.box_threshold = faithfulness, box_threshold
        self.prior_channels = prior_channels

    def _seed_confusion(self, maps, classes, gt) -> np.ndarray:
        from ..refine.seeds import seed_mask, seed_sweep

        seeds = (seed_sweep(maps, classes, self.thresholds) if self.background
                 else [seed_mask(maps, classes, 0.0, background=False)])
        return np.stack([ConfusionMatrix(self.n_labels).update(gt, s).mat for s in seeds])

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..data.transforms import decode_prior, with_prior

        ids = batch["image_id"]
        images = [decode_image(d, f"image_id {i}") for d, i in zip(batch["image"], ids)]
        if self.prior_channels:  # a later round's classifier: the loop's prior channels,
            # through every method, TTA step and perturbation like the image's own
            images = [with_prior(img, decode_prior(p, f"image_id {i}"))
                      for img, p, i in zip(images, batch["prior"], ids)]
        labelled = [vector_to_labels(v) - 1 for v in label_matrix(batch["label_vector"])]
        detected = [np.flatnonzero(p > 0.5) for p in self.maker.probs(images)]
        # images whose labelled classes differ from the detected ones: their seed and box
        # maps are made again for the labels (the XAI metrics take the detected classes)
        redo = [i for i, (a, b) in enumerate(zip(detected, labelled))
                if not np.array_equal(a, b)]
        m, t = len(self.methods), len(self.thresholds) if self.background else 1
        sums = np.zeros((1, m, len(KEYS)))
        conf = np.zeros((1, m, t, self.n_labels, self.n_labels + 1), np.int64)
        seconds = np.zeros((1, m))
        faith = np.zeros((1, m, sums_length(self.faithfulness)))
        boxes = np.zeros((1, m, 2), np.int64)               # correct boxes, pairs
        masks = [decode_mask(mk, f"mask of image_id {i}") if mk is not None else None
                 for mk, i in zip(batch["mask"], ids)]
        samples = []
        for mi, name in enumerate(self.methods):
            fn = get_method(name)
            t0 = time.perf_counter()
            maps_det, _ = self.maker.maps(fn, images, detected)
            seconds[0, mi] = time.perf_counter() - t0
            # XAI metrics over the detected classes, image by image (sizes may differ)
            for i, img in enumerate(images):
                x = torch.from_numpy(img[None]).to(self.maker.device).permute(0, 3, 1, 2)
                sums[0, mi] += xai_sums(self.maker.model, x.float(), [maps_det[i]],
                                        [detected[i]])
                faith[0, mi] += faithfulness_sums(self.maker.model, x.float(), maps_det[i],
                                                  detected[i], self.faithfulness)
            maps_lab = list(maps_det)
            if redo:
                again = self.maker.maps(fn, [images[i] for i in redo],
                                        [labelled[i] for i in redo])[0]
                for i, maps_i in zip(redo, again):
                    maps_lab[i] = maps_i
            for i, image_id in enumerate(ids):
                if masks[i] is not None:
                    conf[0, mi] += self._seed_confusion(maps_lab[i], labelled[i] + 1,
                                                        masks[i])
                    boxes[0, mi] += localisation_hits(maps_lab[i], labelled[i], masks[i],
                                                      self.box_threshold)
                if image_id in self.sample_ids:
                    samples.append([str(image_id), name,
                                    base64.b64encode(encode_array(maps_lab[i])).decode()])
        return {"sums": sums, "confusion": conf, "seconds": seconds, "faith": faith,
                "boxes": boxes, "images": np.array([len(ids)]),
                "samples": np.array([json.dumps(samples)])}


def run_explain(config: PipelineConfig, run: Run, methods: list[str],
                classifier: str = "classifier") -> dict:
    """Run the comparison and write its outputs; returns the table rows. `classifier`:
    the step whose classifier is explained (`classifier`, `classifier@2`, ...); a later
    round's classifier sees its round's prior (`prior@t`) as its extra input channels."""
    from ..graph import Step
    from ..models.registry import read_spec

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown[0]!r} (choose from "
                          f"{', '.join(METHODS)})")
    if not run.is_done(classifier):
        raise StageError(f"explain needs a finished {classifier} step in {run.root}")
    info = run.dataset_info()
    cfg, ecfg = config.cams, config.explain
    scales = ecfg.scales if ecfg.scales is not None else cfg.scales
    flip = ecfg.flip if ecfg.flip is not None else cfg.flip
    thresholds = list(config.evaluate.thresholds)
    index = read_table(run.dataset_path, ["image_id", "mask"], list(ecfg.splits))
    ids = sorted(index.column("image_id").to_pylist())
    with_gt = sorted(i for i, ok in zip(index.column("image_id").to_pylist(),
                                        index.column("mask").is_valid().to_pylist()) if ok)
    keep = None
    if ecfg.max_images:
        # an evenly spaced subset, preferring images with ground truth (seed mIoU)
        keep = evenly_spaced(with_gt if len(with_gt) >= ecfg.max_images else ids,
                             ecfg.max_images)
    # the report's side-by-side images come from the explained ones, ground truth first
    explained = keep or ids
    has_gt = set(with_gt)
    sample_ids = evenly_spaced([i for i in explained if i in has_gt] or explained,
                               ecfg.sample_images)
    ds = open_dataset(run.dataset_path, ["image_id", "image", "mask", "label_vector"],
                      list(ecfg.splits), rows_per_block=ecfg.batch_size, ids=keep)
    prior_channels = int(read_spec(run.step_path(classifier)).get("prior_channels", 0))
    if prior_channels:
        from ..data.join import with_columns

        prior = Step("prior", Step.parse(classifier).round)
        if not run.is_done(prior):
            raise StageError(f"explain: {classifier} takes the loop's prior as input, and "
                             f"step {prior.key} is not finished in {run.root}")
        ds = with_columns(ds, run.step_path(prior), ["prior"])
    use_gpu = cfg.gpus_per_actor > 0
    faithfulness = faithfulness_options(ecfg, seed=cfg.seed)
    box_threshold = getattr(ecfg, "box_threshold", 0.2)
    out = map_with_model(
        ds, Explainer,
        {
            "model_dir": run.step_path(classifier), "methods": methods, "scales": scales,
            "flip": flip, "thresholds": thresholds, "n_labels": info.num_classes + 1,
            "background": info.background, "sample_ids": sample_ids,
            "threads": cfg.torch_threads or cfg.cpus_per_actor, "use_gpu": use_gpu,
            "options": method_options(cfg), "max_side": cfg.max_image_side,
            "faithfulness": faithfulness, "box_threshold": box_threshold,
            "prior_channels": prior_channels, "output_stride": cfg.output_stride},
        ActorResources.of(cfg, "cams"), ecfg.batch_size, rows=len(explained))
    sums = conf = seconds = faith = boxes = None
    images, samples = 0, []
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        s, c, t = b["sums"].sum(0), b["confusion"].sum(0), b["seconds"].sum(0)
        sums = s if sums is None else sums + s
        conf = c if conf is None else conf + c
        seconds = t if seconds is None else seconds + t
        f, bx = b["faith"].sum(0), b["boxes"].sum(0)
        faith = f if faith is None else faith + f
        boxes = bx if boxes is None else boxes + bx
        images += int(b["images"].sum())
        for group in b["samples"]:
            samples.extend(json.loads(str(group)))
    if sums is None:
        raise StageError(f"explain: no image in split(s) {', '.join(ecfg.splits)}")
    names = info.label_names
    exclude = () if info.background else (0,)
    rows = []
    for mi, name in enumerate(methods):
        row = {"method": name, **xai_metrics(sums[mi]),
               **faithfulness_metrics(faith[mi], faithfulness)}
        row["box_accuracy"] = (100 * boxes[mi, 0] / boxes[mi, 1]) if boxes[mi, 1] else None
        row["box_pairs"] = int(boxes[mi, 1])
        if conf[mi].sum():
            curve = [ConfusionMatrix(len(names), m).metrics(names, exclude)["miou"]
                     for m in conf[mi]]
            best = int(np.nanargmax(curve))
            row["seed_miou"] = 100 * curve[best]
            row["best_threshold"] = thresholds[best] if info.background else None
        row["images_per_second"] = images / max(seconds[mi], 1e-9)
        rows.append(row)
    _write(run, rows, samples, {"images": images, "classifier": classifier,
                                "splits": list(ecfg.splits),
                                "scales": list(scales), "flip": flip,
                                "output_stride": cfg.output_stride,
                                "kur": config.head.kur,
                                "road_percentiles": list(faithfulness.road_percentiles),
                                "curve_steps": faithfulness.curve_steps,
                                "box_threshold": box_threshold})
    return {"rows": rows, "images": images}


def _write(run: Run, rows: list[dict], samples: list, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = ["method", "increase_in_confidence", "average_drop", "average_retention",
              "average_drop_of_others", "average_retention_of_others", "road_morf",
              "road_lerf", "road_combined", "deletion_auc", "insertion_auc", "box_accuracy",
              "pairs", "box_pairs", "seed_miou", "best_threshold", "images_per_second"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    with run.output("explain") as out:
        storage.write_bytes_atomic(storage.join(out, "comparison.csv"), buf.getvalue().encode())
        storage.write_json_atomic(storage.join(out, "comparison.json"), {**meta, "rows": rows})
        table = pa.table({"image_id": [s[0] for s in samples], "method": [s[1] for s in samples],
                          "cam": pa.array([base64.b64decode(s[2]) for s in samples],
                                          pa.binary())})
        fs, path = storage.filesystem(storage.join(out, "samples.parquet"))
        pq.write_table(table, path, filesystem=fs)
    run.write_metrics("explain", {**meta, "rows": rows})


def format_table(rows: list[dict]) -> str:
    """The comparison as text. Directions: IC, AR... as in the README; ROAD MoRF and the
    deletion area lower is better, LeRF, combined ROAD, insertion area and box accuracy
    higher is better."""
    head = (f"{'method':16s}{'IC':>7s}{'AD':>7s}{'AR':>7s}{'ADO':>7s}{'ARO':>7s}"
            f"{'MoRF':>7s}{'LeRF':>7s}{'ROAD':>7s}{'del':>7s}{'ins':>7s}{'box acc':>9s}"
            f"{'seed mIoU':>11s}{'img/s':>8s}")
    lines = [head]

    def cell(v, width):
        return f"{'-':>{width}s}" if v is None or v != v else f"{v:{width}.1f}"

    for r in rows:
        lines.append(f"{r['method']:16s}{r['increase_in_confidence']:7.1f}"
                     f"{r['average_drop']:7.1f}{r['average_retention']:7.1f}"
                     f"{r['average_drop_of_others']:7.1f}{r['average_retention_of_others']:7.1f}"
                     + "".join(cell(r.get(k), 7) for k in ("road_morf", "road_lerf",
                                                            "road_combined", "deletion_auc",
                                                            "insertion_auc"))
                     + cell(r.get("box_accuracy"), 9) + cell(r.get("seed_miou"), 11)
                     + f"{r['images_per_second']:8.1f}")
    return "\n".join(lines)

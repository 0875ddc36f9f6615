"""Segmentation and classification metrics from a confusion matrix.

mIoU, pixel accuracy, per-class IoU, precision, recall and F1 with ignore index 255 (as
torchvision's segmentation references and the VOC devkit compute them): a class with no
ground-truth and no predicted pixel is left out of the means instead of counting as 0 or 1.
Predictions of 255 (the ignore band of seeds) count as misses: they lower recall and IoU
of the true class and add no false positive anywhere.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .data.codecs import IGNORE_INDEX


class ConfusionMatrix:
    """Counts (ground truth, prediction) pairs for labels 0..n-1 (+ predicted 255)."""

    def __init__(self, num_labels: int, mat: np.ndarray | None = None):
        self.n = num_labels
        self.mat = np.zeros((num_labels, num_labels + 1), np.int64) if mat is None else mat

    def update(self, gt: np.ndarray, pred: np.ndarray) -> "ConfusionMatrix":
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ")
        valid = gt != IGNORE_INDEX
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        p = np.where(p == IGNORE_INDEX, self.n, p)
        if g.size and (g.max() >= self.n or p.max() > self.n):
            raise ValueError(f"label beyond {self.n - 1} in ground truth or prediction")
        self.mat += np.bincount(g * (self.n + 1) + p,
                                minlength=self.n * (self.n + 1)).reshape(self.n, self.n + 1)
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return ConfusionMatrix(self.n, self.mat + other.mat)

    def metrics(self, names: Sequence[str] | None = None,
                exclude: Sequence[int] = ()) -> dict:
        """`exclude`: labels left out of the means (e.g. 0 for a dataset without background)."""
        m = self.mat.astype(np.float64)
        tp = np.diag(m[:, : self.n])
        gt_total = m.sum(1)
        pred_total = m[:, : self.n].sum(0)
        fp = pred_total - tp
        fn = gt_total - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / (tp + fp + fn)
            precision = tp / (tp + fp)
            recall = tp / (tp + fn)
            f1 = 2 * tp / (2 * tp + fp + fn)
        keep = np.ones(self.n, bool)
        keep[list(exclude)] = False
        names = list(names) if names is not None else [str(i) for i in range(self.n)]

        def mean(x: np.ndarray) -> float:
            x = x[keep]
            x = x[~np.isnan(x)]
            return float(x.mean()) if x.size else float("nan")

        def clean(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x), 6)

        total = m.sum()
        return {
            "miou": mean(iou),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_f1": mean(f1),
            "mean_precision": mean(precision),
            "mean_recall": mean(recall),
            "per_class": {
                names[i]: {"iou": clean(iou[i]), "f1": clean(f1[i]),
                           "precision": clean(precision[i]), "recall": clean(recall[i]),
                           "gt_pixels": int(gt_total[i])}
                for i in range(self.n) if keep[i]
            },
        }


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision (area under the precision-recall steps, as
    scikit-learn's `average_precision_score`). scores, targets: (N, K). Classes
    without a positive give nan."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets) > 0
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        pos = targets[:, k].sum()
        if pos == 0:
            continue
        order = np.argsort(-scores[:, k], kind="mergesort")
        s, t = scores[order, k], targets[order, k]
        # one point per distinct threshold
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
        tp = np.cumsum(t)[last]
        fp = (last + 1) - tp
        precision = tp / (tp + fp)
        recall = tp / pos
        out[k] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return out


# ---------------------------------------------------------------- the `evaluate` stage

def _sweep_batch(batch: dict, thresholds, n_labels: int, background: bool) -> dict:
    """CAM seeds at every threshold against ground truth: {"confusion": (1, T, n, n+1)}.

    Without a background class there is no threshold: one entry, the argmax seed."""
    from .data.codecs import decode_array, decode_mask
    from .data.dataset import vector_to_labels
    from .refine.seeds import seed_mask, seed_sweep

    mats = [ConfusionMatrix(n_labels) for _ in range(len(thresholds) if background else 1)]
    for image_id, cam, mask, vec in zip(batch["image_id"], batch["cam"], batch["mask"],
                                        batch["label_vector"]):
        gt = decode_mask(mask, f"mask of image_id {image_id}")
        cams = decode_array(cam, f"cam of image_id {image_id}").astype(np.float32)
        classes = vector_to_labels(vec)
        if background:
            for m, seed in zip(mats, seed_sweep(cams, classes, thresholds)):
                m.update(gt, seed)
        else:
            mats[0].update(gt, seed_mask(cams, classes, 0.0, background=False))
    return {"confusion": np.stack([m.mat for m in mats])[None],
            "images": np.array([len(batch["image_id"])])}


def _masks_batch(batch: dict, columns, n_labels: int) -> dict:
    """Stored label maps against ground truth: {column: (1, n, n+1)}."""
    from .data.codecs import decode_mask

    out = {}
    for col in columns:
        m = ConfusionMatrix(n_labels)
        for image_id, pred, mask in zip(batch["image_id"], batch[col], batch["mask"]):
            m.update(decode_mask(mask, f"mask of image_id {image_id}"),
                     decode_mask(pred, f"{col} of image_id {image_id}"))
        out[col] = m.mat[None]
    return out


def _sums(ds, keys) -> dict[str, np.ndarray]:
    """Sum small per-batch arrays on the driver (the images never leave the workers)."""
    total: dict[str, np.ndarray] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in keys:
            part = np.asarray(batch[key]).sum(0)
            total[key] = part if key not in total else total[key] + part
    return total


def run(config, ctx) -> dict:
    """Evaluate CAM seeds over a threshold sweep, the seeds at the configured threshold
    and the CRF pseudo masks on the images of `evaluate.splits` that have ground truth;
    write them to metrics.json."""
    from .data.dataset import open_dataset
    from .errors import StageError

    info = ctx.dataset_info()
    n = info.num_classes + 1
    names = info.label_names
    exclude = () if info.background else (0,)
    cfg = config.evaluate
    thresholds = list(cfg.thresholds)

    # stage outputs may be a few large files (ray.output_file_mb): blocks of a batch
    # spread the work over every CPU
    cams = open_dataset(ctx.input("cams"), ["image_id", "cam", "mask", "label_vector"],
                        cfg.splits, require=("mask",), rows_per_block=cfg.batch_size)
    sweep = _sums(cams.map_batches(_sweep_batch, batch_size=cfg.batch_size, batch_format="numpy",
                               fn_kwargs={"thresholds": thresholds, "n_labels": n,
                                          "background": info.background}),
                  ("confusion", "images"))
    if not sweep:
        raise StageError("evaluate: no image with a ground-truth mask in split(s) "
                         f"{', '.join(cfg.splits)}")
    curve = [ConfusionMatrix(n, m).metrics(names, exclude) for m in sweep["confusion"]]
    best = int(np.nanargmax([c["miou"] for c in curve]))
    cam_metrics = {
        "thresholds": thresholds if info.background else None,
        "miou_curve": [c["miou"] for c in curve],
        "best_threshold": thresholds[best] if info.background else None,
        "best": curve[best],
    }

    cols = ("seed", "pseudo_mask")
    crf = open_dataset(ctx.input("crf"), ["image_id", "mask", *cols], cfg.splits,
                       require=("mask",), rows_per_block=cfg.batch_size)
    totals = _sums(crf.map_batches(_masks_batch, batch_size=cfg.batch_size, batch_format="numpy",
                                fn_kwargs={"columns": cols, "n_labels": n}), cols)
    seeds = ConfusionMatrix(n, totals["seed"]).metrics(names, exclude)
    seeds["background_threshold"] = config.seeds.background_threshold
    results = {"splits": list(cfg.splits), "images": int(sweep["images"]),
               "cams": cam_metrics, "seeds": seeds,
               "crf": ConfusionMatrix(n, totals["pseudo_mask"]).metrics(names, exclude)}
    ctx.write_metrics(results)
    return {"cam_miou": cam_metrics["best"]["miou"], "crf_miou": results["crf"]["miou"]}

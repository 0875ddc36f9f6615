"""Stage `prior` (round t >= 2 of the iterative loop): the class-mask prior M_t that
round t's classifier gets as extra input channels.

The founding diagram of ray-wsss: after round t-1, the segmentation model's class masks
c_i and the classifier's class probabilities P(c_i) give

    M_t = sum_i alpha_i c_i P(c_i) / max_i alpha_i            (loop.prior: sum, 1 channel)
    M_t^k = alpha_k c_k P(c_k) / max_i alpha_i                (loop.prior: per_class, K)

with c the segmentation model's softmax restricted to background + the image's classes
(renormalised over them; for an image without tags, its detected classes, P > 0.5), i
over the image's classes, and P the sigmoid outputs round t-1's classifier gave the image
(stored by its CAM step). Since the restricted softmax sums to at most 1 over the
classes and P <= 1, M lies in [0, 1]. M_1 is uniform: round 1 has no prior channel.

No published WSSS method feeds masks back as an input channel (interactive
segmentation does: RITM feeds the previous mask); multi-round WSSS feeds labels back
as training targets (loop.feedback: labels). The loop is here to be measured against
that baseline.

Output rows (rounds/<t>/prior/*.parquet): image_id, split, prior (.npy uint8 (C, H, W):
M * 255, C = 1 or K).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..actors import ActorResources, map_with_model
from ..data.codecs import decode_image, encode_array
from ..data.dataset import label_matrix, open_dataset, split_rows, vector_to_labels
from ..data.join import with_columns
from ..runtime import write_parquet


def class_weights(alpha: Sequence[float] | None, num_classes: int) -> np.ndarray:
    """alpha_i / max alpha, (K,) float32 (all 1 when alpha is null)."""
    if alpha is None:
        return np.ones(num_classes, np.float32)
    a = np.asarray(alpha, np.float32)
    if len(a) != num_classes:
        from ..errors import ConfigError
        raise ConfigError(f"loop.alpha: {len(a)} weights for {num_classes} classes")
    return a / max(float(a.max()), 1e-12)


def compute_prior(scores: np.ndarray, classes: Sequence[int], probs: np.ndarray,
                  weights: np.ndarray, per_class: bool) -> np.ndarray:
    """The prior of one image.

    scores: (K + 1, H, W) softmax of the segmentation model (label 0 = background);
    classes: the image's classes (1..K); probs: (K,) classifier sigmoid outputs;
    weights: (K,) alpha / max alpha. Returns (1, H, W) or (K, H, W) float32 in [0, 1]."""
    k = len(probs)
    classes = np.asarray(classes, np.int64)
    labels = np.concatenate([[0], classes])
    restricted = scores[labels]
    restricted = restricted / np.maximum(restricted.sum(0, keepdims=True), 1e-12)
    out = np.zeros((k if per_class else 1,) + scores.shape[1:], np.float32)
    for j, c in enumerate(classes):
        term = weights[c - 1] * probs[c - 1] * restricted[j + 1]
        if per_class:
            out[c - 1] = term
        else:
            out[0] += term
    return np.clip(out, 0.0, 1.0)


class PriorMaker:
    """Ray Data callable class: dataset rows + the previous round's probabilities ->
    rows with the prior."""

    def __init__(self, model_dir: str, scales, flip: bool, threads: int, use_gpu: bool,
                 max_side: int | None, alpha, num_classes: int, per_class: bool,
                 allow_cpu_fallback: bool = False):
        from ..predict import SegmentPredictor

        self.predictor = SegmentPredictor(model_dir, scales, flip, threads, use_gpu, max_side,
                                          None, allow_cpu_fallback)
        self.weights = class_weights(alpha, num_classes)
        self.per_class = per_class

    def __call__(self, batch: dict) -> dict:
        images = [decode_image(d, f"image_id {i}") for d, i in zip(batch["image"],
                                                                     batch["image_id"])]
        scores = self.predictor.scores(images)
        vectors = label_matrix(batch["label_vector"])
        priors = []
        for s, vec, p in zip(scores, vectors, batch["probs"]):
            p = np.asarray(p, np.float32)
            classes = vector_to_labels(vec)
            if not len(classes):  # no tags: the classes the classifier detects
                classes = np.flatnonzero(p > 0.5) + 1
            m = compute_prior(s, classes, p, self.weights, self.per_class)
            priors.append(encode_array(np.round(m * 255).astype(np.uint8), np.uint8))
        return {"image_id": batch["image_id"], "split": batch["split"],
                "prior": np.array(priors, dtype=object)}


def flat_prior_warning(prior: str, background: bool, alpha, num_classes: int) -> str | None:
    """The summed prior is nearly constant on a dataset without a background class: the
    restricted softmax sums to 1 over the image's classes at every pixel, so with equal
    alpha M = sum_i c_i P(c_i) is about the classes' probabilities everywhere (on CamVid
    tiles 0.99 with a within-tile spread of 0.01, measured 2026-11-28). None when M can
    carry the masks (background, per-class channels, or unequal alpha)."""
    if prior != "sum" or background or len(set(class_weights(alpha, num_classes))) > 1:
        return None
    return ("loop.prior: sum on a dataset without a background class: the image's class "
            "masks sum to 1 at every pixel, so M = sum_i c_i P(c_i) is nearly constant and "
            "tells the classifier little; use loop.prior: per_class (or unequal "
            "loop.alpha)")


def run(config, ctx) -> dict:
    import sys

    from ..runtime import gpus_usable

    cfg, pcfg = config.loop, config.predict
    info = ctx.dataset_info()
    warning = flat_prior_warning(cfg.prior, info.background, cfg.alpha, info.num_classes)
    if warning:
        print(f"[ray-wsss] warning: {warning}", file=sys.stderr, flush=True)
    cams = ctx.input("cams")  # the previous round's: its rows say which images and P
    # the images round t's classifier trains and validates on and its CAMs cover: the
    # previous round's CAM step's splits
    splits = list(config.cams.splits)
    ds = open_dataset(ctx.dataset_path, ["image_id", "split", "image", "label_vector"], splits,
                      rows_per_block=cfg.batch_size)
    ds = with_columns(ds, cams, ["probs"])
    use_gpu = gpus_usable(cfg.gpus_per_actor > 0, config.ray.allow_cpu_fallback,
                          "loop.gpus_per_actor", probe_gpus=cfg.gpus_per_actor)
    res = ActorResources.of(cfg, "loop") if use_gpu or cfg.gpus_per_actor == 0 else \
        ActorResources(cfg.num_actors or 1, cfg.cpus_per_actor, 0.0, "loop")
    out_ds = map_with_model(
        ds, PriorMaker,
        {"model_dir": ctx.input("segmenter"), "scales": pcfg.scales, "flip": pcfg.flip,
         "threads": cfg.torch_threads or cfg.cpus_per_actor, "use_gpu": use_gpu,
         "max_side": pcfg.max_image_side, "alpha": cfg.alpha,
         "num_classes": info.num_classes, "per_class": cfg.prior == "per_class",
         "allow_cpu_fallback": config.ray.allow_cpu_fallback},
        res, cfg.batch_size, rows=split_rows(ctx.dataset_path, splits))
    with ctx.output() as out:
        write_parquet(out_ds, out, config.ray)
    return {"channels": info.num_classes if cfg.prior == "per_class" else 1}


def prior_channels(config, num_classes: int) -> int:
    """Extra input channels of a classifier fed the prior."""
    return num_classes if config.loop.prior == "per_class" else 1

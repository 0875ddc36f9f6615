"""Stage `affinity_labels`: IRN's affinity labels from the stored CAMs, as stateless Ray
Data tasks on every CPU of the cluster (like the CRF stage).

For each image of the classifier's train split (IRN makes them for train only): the
confident-foreground and confident-background label maps of `refine.affinity.
affinity_labels` (thresholds `affinity.fg_threshold` / `bg_threshold`, each cleaned by
a dense CRF from labels, `affinity.label_crf`), combined into classes / 0 / 255 unsure.
The images are streamed from the dataset and the CAMs joined on image_id.

With `affinity.labels_from: saliency` (C²AM-H, P-NOC) the saliency map of stage
`saliency` is joined too and replaces the low CAM threshold
(`refine.affinity.saliency_affinity_labels`: background where the CRF'd saliency is
below `saliency_threshold`, foreground from the CAM argmax over
[`saliency_fg_threshold`, M] inside the salient region).

Output rows (affinity_labels/*.parquet): image_id, split, affinity_label (PNG, full
image size; the fit samples it at stride 4 after augmenting it with the image).
"""
from __future__ import annotations

import numpy as np

from ..config import AffinityConfig, CrfConfig
from ..data.codecs import decode_array, decode_image, encode_mask
from ..data.dataset import open_dataset, vector_to_labels
from ..data.join import with_columns
from ..errors import DataError
from ..runtime import write_parquet
from .affinity import affinity_labels, saliency_affinity_labels


def label_crf_config(cfg: AffinityConfig) -> CrfConfig:
    """The label CRF's kernels as the CrfConfig that `crf_from_labels` reads."""
    k = cfg.label_crf
    return CrfConfig(iterations=k.iterations, gaussian_sxy=k.gaussian_sxy,
                     gaussian_compat=k.gaussian_compat, bilateral_sxy=k.bilateral_sxy,
                     bilateral_srgb=k.bilateral_srgb, bilateral_compat=k.bilateral_compat)


def label_batch(batch: dict, cfg: AffinityConfig, background: bool) -> dict:
    crf = label_crf_config(cfg)
    out = []
    for image_id, data, cam, vec in zip(batch["image_id"], batch["image"], batch["cam"],
                                        batch["label_vector"]):
        where = f"image_id {image_id}"
        image = decode_image(data, where)
        cams = decode_array(cam, f"cam of {where}").astype(np.float32)
        out.append(encode_mask(affinity_labels(
            image, cams, vector_to_labels(vec), cfg.fg_threshold, cfg.bg_threshold, crf,
            background, cfg.label_crf.gt_prob)))
    return {"image_id": batch["image_id"], "split": batch["split"],
            "affinity_label": np.array(out, dtype=object)}


def saliency_label_batch(batch: dict, cfg: AffinityConfig) -> dict:
    """`label_batch` with the C²AM saliency in place of the low CAM threshold
    (`affinity.labels_from: saliency`)."""
    from .saliency import decode_saliency

    crf = label_crf_config(cfg)
    out = []
    for image_id, data, cam, sal, vec in zip(batch["image_id"], batch["image"], batch["cam"],
                                             batch["saliency"], batch["label_vector"]):
        where = f"image_id {image_id}"
        image = decode_image(data, where)
        cams = decode_array(cam, f"cam of {where}").astype(np.float32)
        saliency = decode_saliency(sal, f"saliency of {where}")
        if saliency.shape != image.shape[:2]:
            raise DataError(f"saliency is {saliency.shape[1]}x{saliency.shape[0]}, the image "
                            f"{image.shape[1]}x{image.shape[0]}", row=str(image_id))
        out.append(encode_mask(saliency_affinity_labels(
            image, cams, vector_to_labels(vec), saliency, cfg.saliency_threshold,
            cfg.saliency_fg_threshold, crf, cfg.label_crf.gt_prob)))
    return {"image_id": batch["image_id"], "split": batch["split"],
            "affinity_label": np.array(out, dtype=object)}


def run(config, ctx) -> dict:
    cfg = config.affinity
    info = ctx.dataset_info()
    split = config.classifier.train_split
    ds = open_dataset(ctx.dataset_path, ["image_id", "split", "image", "label_vector"],
                      [split], rows_per_block=cfg.label_batch_size)
    ds = with_columns(ds, ctx.input("cams"), ["cam"], batch_size=cfg.label_batch_size)
    if cfg.labels_from == "saliency":
        from ..train.c2am import require_background

        require_background(info)
        ds = with_columns(ds, ctx.input("saliency"), ["saliency"],
                          batch_size=cfg.label_batch_size)
        ds = ds.map_batches(saliency_label_batch, fn_kwargs={"cfg": cfg},
                            batch_size=cfg.label_batch_size, batch_format="numpy",
                            num_cpus=cfg.label_cpus_per_task)
    else:
        ds = ds.map_batches(label_batch,
                            fn_kwargs={"cfg": cfg, "background": info.background},
                            batch_size=cfg.label_batch_size, batch_format="numpy",
                            num_cpus=cfg.label_cpus_per_task)
    with ctx.output() as out:
        write_parquet(ds, out, config.ray)
    return {"split": split, "labels_from": cfg.labels_from}

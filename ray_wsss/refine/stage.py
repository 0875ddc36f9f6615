"""Stage `crf`: seeds and dense-CRF pseudo masks from the stored CAMs, as stateless Ray
Data tasks on every CPU of the cluster.

Output rows (crf/*.parquet): image_id, split, label_vector, mask (ground truth or null),
seed (PNG: the CAM seed at seeds.background_threshold), pseudo_mask (PNG: after CRF).
"""
from __future__ import annotations

import numpy as np

from ..config import CrfConfig, SeedConfig
from ..data.codecs import decode_array, decode_image, encode_mask
from ..data.dataset import label_matrix, open_dataset, vector_to_labels
from ..runtime import write_parquet
from .crf import crf_mask
from .seeds import seed_mask


def refine_batch(batch: dict, seeds: SeedConfig, crf: CrfConfig, background: bool) -> dict:
    seeds_out, pseudo = [], []
    for image_id, data, cam, vec in zip(batch["image_id"], batch["image"], batch["cam"],
                                        batch["label_vector"]):
        where = f"image_id {image_id}"
        image = decode_image(data, where)
        cams = decode_array(cam, where).astype(np.float32)
        classes = vector_to_labels(vec)
        seeds_out.append(encode_mask(seed_mask(cams, classes, seeds.background_threshold,
                                               seeds.background_power, background)))
        pseudo.append(encode_mask(crf_mask(image, cams, classes, crf,
                                           seeds.background_threshold,
                                           seeds.background_power, background)))
    return {"image_id": batch["image_id"], "split": batch["split"],
            "label_vector": label_matrix(batch["label_vector"]), "mask": batch["mask"],
            "seed": np.array(seeds_out, dtype=object), "pseudo_mask": np.array(pseudo, dtype=object)}


def run(config, ctx) -> dict:
    info = ctx.dataset_info()
    # Ray Data's Parquet reader merges small files into few blocks: cut them back to
    # batches so that every CPU of the cluster gets CRF work.
    ds = open_dataset(ctx.input("cams"), ["image_id", "split", "image", "mask", "label_vector",
                                         "cam"], rows_per_block=config.crf.batch_size)
    ds = ds.map_batches(refine_batch, fn_kwargs={"seeds": config.seeds, "crf": config.crf,
                                                 "background": info.background},
                        batch_size=config.crf.batch_size, batch_format="numpy",
                        num_cpus=config.crf.cpus_per_task)
    with ctx.output() as out:
        write_parquet(ds, out, config.ray)
    return {}

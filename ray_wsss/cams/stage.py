"""Stage `cams`: class activation maps for every image, on Ray Data actors.

`map_batches` with a callable class: each actor loads the classifier once (on a GPU when
`cams.gpus_per_actor` > 0) and turns batches of encoded images into CAMs of the image's
own classes, with multi-scale + flip TTA. Streaming: images flow from the Parquet
dataset through the actors to Parquet files; nothing is collected on the driver.

Output rows (cams/*.parquet): image_id, split, image, mask, label_vector, height, width,
cam (.npy float16 (n, H, W): the maps of the image's classes in increasing class order),
probs (K float32: the classifier's sigmoid outputs).
"""
from __future__ import annotations

import numpy as np

from .. import storage
from ..actors import ActorResources, map_with_model
from ..data.codecs import decode_image, encode_array
from ..data.dataset import (label_matrix, open_dataset, read_table, split_rows,
                            vector_to_labels)
from ..errors import ConfigError
from ..runtime import write_parquet

PASSTHROUGH = ("image_id", "split", "image", "mask", "label_vector")


class CamPredictor:
    """Ray Data callable class: batch of dataset rows -> rows with `cam` and `probs`."""

    def __init__(self, model_dir: str, method: str, scales, flip: bool, threads: int = 1,
                 use_gpu: bool = False, options: dict | None = None,
                 max_side: int | None = None, mcis: dict | None = None,
                 allow_cpu_fallback: bool = False, prior_channels: int = 0,
                 output_stride: int | None = None):
        from .methods import get_method
        from .predict import MapMaker

        self.maker = MapMaker(model_dir, scales, flip, threads, use_gpu, options, max_side,
                              mcis, allow_cpu_fallback, output_stride=output_stride)
        self.method = get_method(method)
        self.prior_channels = prior_channels

    def __call__(self, batch: dict) -> dict:
        from ..data.transforms import decode_prior, with_prior

        images = [decode_image(d, f"image_id {i}") for d, i in zip(batch["image"],
                                                                     batch["image_id"])]
        if self.prior_channels:  # the loop's prior: extra channels through every TTA step
            images = [with_prior(img, decode_prior(p, f"image_id {i}"))
                      for img, p, i in zip(images, batch["prior"], batch["image_id"])]
        vectors = label_matrix(batch["label_vector"])
        maps, probs = self.maker.maps(self.method, images,
                                      [vector_to_labels(v) - 1 for v in vectors],
                                      ids=[str(i) for i in batch["image_id"]])
        out = {k: batch[k] for k in PASSTHROUGH}
        out["label_vector"] = vectors
        out.pop("prior", None)
        out["height"] = np.array([im.shape[0] for im in images], np.int32)
        out["width"] = np.array([im.shape[1] for im in images], np.int32)
        out["cam"] = np.array([encode_array(m) for m in maps], dtype=object)
        out["probs"] = probs
        return out


def mcis_bank(config, dataset_path: str) -> dict | None:
    """The peer bank of MCIS co-segmentation: `cams.mcis_bank` train image ids per class,
    chosen from the label index, and where to read them. Each actor reads the bank's
    encoded images itself (a few hundred rows): only ids travel in the constructor
    arguments, so a restarted actor never depends on an object the driver put in the
    object store. None when off."""
    from .mcis import choose_bank

    cfg = config.cams
    if cfg.mcis_peers <= 0:
        return None
    index = read_table(dataset_path, ["image_id", "label_vector"],
                       [config.classifier.train_split])
    labels = np.array(index.column("label_vector").to_pylist(), np.uint8)
    bank = choose_bank(labels, index.column("image_id").to_pylist(), cfg.mcis_bank, cfg.seed)
    return {"bank": bank, "dataset": dataset_path, "peers": cfg.mcis_peers,
            "seed": cfg.seed}


def method_options(cfg) -> dict:
    return {"lambda_pos": cfg.lambda_pos, "lambda_neg": cfg.lambda_neg,
            "lambda_bg": cfg.lambda_bg, "scorecam_batch": cfg.scorecam_batch,
            "grad_chunk": cfg.grad_chunk, "ablation_batch": cfg.ablation_batch,
            "layercam_gamma": cfg.layercam_gamma,
            "smoothgrad_samples": cfg.smoothgrad_samples,
            "smoothgrad_noise": cfg.smoothgrad_noise, "seed": cfg.seed}


def cam_dataset(config, dataset_path: str, model_dir: str, splits=None,
                prior: str | None = None):
    """The (lazy) Ray Dataset of CAM rows for `splits` (default: cams.splits);
    `prior`: the folder of the loop's prior for a round t >= 2 classifier."""
    from ..runtime import gpus_usable

    cfg = config.cams
    # fail before the actors start when GPUs are asked for and none is usable
    use_gpu = gpus_usable(cfg.gpus_per_actor > 0, config.ray.allow_cpu_fallback,
                          "cams.gpus_per_actor", probe_gpus=cfg.gpus_per_actor)
    splits = list(splits or cfg.splits)
    ds = open_dataset(dataset_path, list(PASSTHROUGH), splits, rows_per_block=cfg.batch_size)
    channels = 0
    if prior is not None:
        from ..data.join import with_columns
        from ..models.registry import read_spec

        channels = read_spec(model_dir).get("prior_channels", 0)
        ds = with_columns(ds, prior, ["prior"])
    return map_with_model(
        ds, CamPredictor,
        {"model_dir": model_dir, "method": cfg.method, "scales": cfg.scales,
         "flip": cfg.flip, "threads": cfg.torch_threads or cfg.cpus_per_actor,
         "use_gpu": use_gpu, "options": method_options(cfg),
         "max_side": cfg.max_image_side, "mcis": mcis_bank(config, dataset_path),
         "allow_cpu_fallback": config.ray.allow_cpu_fallback, "prior_channels": channels,
         "output_stride": cfg.output_stride},
        ActorResources.of(cfg, "cams") if use_gpu or cfg.gpus_per_actor == 0 else
        ActorResources(cfg.num_actors or 1, cfg.cpus_per_actor, 0.0, "cams"), cfg.batch_size,
        rows=split_rows(dataset_path, splits))


def run(config, ctx) -> dict:
    from .methods import get_method

    get_method(config.cams.method)  # fail on a bad name before starting actors
    model_dir = ctx.input("classifier")
    if config.cams.mcis_peers > 0 and not storage.read_json(
            storage.join(model_dir, "model.json")).get("mcis"):
        raise ConfigError("cams.mcis_peers > 0 needs a classifier trained with "
                          "regularizers.mcis.enabled: true")
    prior = ctx.input("prior") if ctx.has_input("prior") else None
    if prior is not None and config.cams.mcis_peers > 0:
        raise ConfigError("cams.mcis_peers with loop.rounds > 1 is not supported (the "
                          "peers' priors are not joined)")
    with ctx.output() as out:
        write_parquet(cam_dataset(config, ctx.dataset_path, model_dir, prior=prior), out,
                      config.ray)
    return {}

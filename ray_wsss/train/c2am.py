"""Stage `c2am`: fit C²AM with CAM hints (C²AM-H, models/c2am.py) on the train split,
with Ray Train (DDP), through the shared fit plumbing (train/fit.py).

Xie et al. (CVPR 2022); the hints as P-NOC (David et al. 2024). Ray Data joins each train
image with its CAMs (stage `cams`, when `c2am.hint_weight` > 0), takes the max over the
image's classes as the hint map, and rescales, crops and flips image and hint together
on CPU workers (padding is "no hint"). On the workers: v_fg, v_bg and the logits of A,
the contrastive loss over the batch plus the worker's memory of past embeddings
(`c2am.memory_size`), plus `hint_weight` times the hint BCE; SGD with poly decay, the
head at `head_lr_multiplier` times the backbone's rate. A checkpoint per epoch, resumed
after a failure.

With hints the polarity is fixed by them. Without (hint_weight 0), the last epoch's mean
of A on the map borders decides it as CCAM does: above 0.5 the exported map is inverted.
The network is exported as `c2am/model.pt` + `model.json` (kind "c2am").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..config import C2amConfig, ModelConfig
from ..data.dataset import dataset_counts, open_dataset
from ..data.join import with_columns
from ..data.transforms import joint_scale_crop
from ..errors import ConfigError, DataError, StageError
from .fit import (build_trainer, fit_name, lr_at, make_optimizer, remove_earlier_fits,
                  report_epoch, resume, run_fit, set_lr, start_worker)

BORDER_INVERTED = 0.5   # CCAM's rule: a map this high on the border is the background


def hint_map(cams: np.ndarray) -> np.ndarray:
    """cams (n, H, W) in [0, 1] of the image's classes -> the max over them as uint8
    0..255 (H, W); all 0 for an image without classes."""
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    return np.round(np.clip(cams.max(0), 0, 1) * 255).astype(np.uint8)


class C2amTrainTransform:
    """Training batches: image and hint map decoded, rescaled, cropped and flipped
    together. Outputs {"image": (B, S, S, 3) uint8, "hint": (B, S, S) uint8 (max CAM
    x 255; 0 where padded, or everywhere without a `cam` column)}."""

    def __init__(self, crop_size: int, scale_range=(0.7, 1.3), hflip: bool = True,
                 seed: int | None = None):
        self.crop_size, self.scale_range, self.hflip, self.seed = (crop_size, scale_range,
                                                                   hflip, seed)

    def __call__(self, batch: dict) -> dict:
        from ..data.codecs import decode_array, decode_image

        rng = np.random.default_rng(self.seed)  # a fresh one per batch (see TrainTransform)
        n, s = len(batch["image"]), self.crop_size
        images = np.empty((n, s, s, 3), np.uint8)
        hints = np.zeros((n, s, s), np.uint8)
        for i, (data, image_id) in enumerate(zip(batch["image"], batch["image_id"])):
            where = f"image_id {image_id}"
            img = decode_image(data, where)
            if "cam" in batch:
                cams = decode_array(batch["cam"][i], f"cam of {where}").astype(np.float32)
                if cams.ndim != 3 or cams.shape[1:] != img.shape[:2]:
                    raise DataError(f"cam is {cams.shape}, the image {img.shape[1]}x"
                                    f"{img.shape[0]}: CAMs of other images?", row=str(image_id))
                hint = hint_map(cams)
            else:
                hint = np.zeros(img.shape[:2], np.uint8)
            img, (hint,) = joint_scale_crop(img, [hint], s, rng.uniform(*self.scale_range),
                                            rng, fill=0)
            if self.hflip and rng.random() < 0.5:
                img, hint = img[:, ::-1], hint[:, ::-1]
            images[i], hints[i] = img, hint
        return {"image": images, "hint": hints}


@dataclass(frozen=True)
class C2amLoopConfig:
    """What the workers need (frozen dataclasses pickle to Ray Train's workers)."""
    c2am: C2amConfig
    model: ModelConfig
    num_train: int
    init: str                    # pretrained | classifier | scratch
    classifier_dir: str | None   # the classifier whose backbone starts the fit


def init_source(config) -> str:
    """`c2am.init`: `auto` is ImageNet weights where configured, else the classifier's
    backbone (as segmenter.init)."""
    init = config.c2am.init
    if init != "auto":
        return init
    return "pretrained" if config.model.pretrained else "classifier"


def build_model(lc: C2amLoopConfig):
    from ..models.c2am import build_c2am
    from .segmenter import load_classifier_backbone

    model = build_c2am(lc.model, pretrained=lc.init == "pretrained")
    if lc.init == "classifier" and lc.classifier_dir:
        load_classifier_backbone(model, lc.classifier_dir, lc.model.backbone)
        model.backbone.eval()
    return model


def _train_epoch(model, ddp, opt, batches, cfg: C2amConfig, memory, schedule) -> dict:
    import torch

    from ..models.c2am import border_activation, contrastive_loss, hint_loss

    total, step = schedule["total"], schedule["first_step"]
    ddp.train()
    t0, waited = time.time(), 0.0
    sums = {"loss": [], "fg_pull": [], "bg_pull": [], "push": [], "hint": [], "border": []}
    while True:
        t_wait = time.time()
        batch = next(batches, None)
        waited += time.time() - t_wait
        if batch is None:
            break
        set_lr(opt, lr_at(step, total, cfg.lr, 0))
        fg, bg, logits = ddp(batch["image"].permute(0, 3, 1, 2).float())
        fg_mem, bg_mem = memory.get()
        loss, parts = contrastive_loss(fg, bg, fg_mem, bg_mem, cfg.rank_alpha)
        if cfg.hint_weight > 0:
            parts["hint"] = hint_loss(logits, batch["hint"][:, None].float() / 255,
                                      cfg.hint_fg_threshold, cfg.label_smoothing,
                                      cfg.hint_bg_threshold)
            loss = loss + cfg.hint_weight * parts["hint"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        memory.add(fg, bg)
        sums["loss"].append(loss.item())
        for k, v in parts.items():
            sums[k].append(v.item())
        with torch.no_grad():
            sums["border"].append(border_activation(torch.sigmoid(logits)).item())
        step += 1
    out = {k: float(np.mean(v)) if v else math.nan for k, v in sums.items()}
    return {**out, "lr": lr_at(step, total, cfg.lr, 0), "steps": len(sums["loss"]),
            "epoch_seconds": round(time.time() - t0, 2), "data_wait_seconds": round(waited, 2)}


def train_loop(lc: C2amLoopConfig) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from ..models.c2am import EmbeddingMemory

    cfg = lc.c2am
    world, _, device = start_worker("c2am", cfg)
    model = build_model(lc)
    opt = make_optimizer(model.parameter_groups(cfg.head_lr_multiplier), cfg)
    start, history, restarts = resume("c2am", {"model": model, "optimizer": opt})
    ddp = ray.train.torch.prepare_model(model)
    model = model.to(device)
    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, lc.num_train // (per_worker * world))
    memory = EmbeddingMemory(cfg.memory_size)  # refills within an epoch after a restart
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.epochs):
        batches = iter(shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
            dtypes={"image": torch.uint8, "hint": torch.uint8}, device=device))
        metrics = {"epoch": epoch + 1, **_train_epoch(
            model, ddp, opt, batches, cfg, memory,
            {"total": steps_per_epoch * cfg.epochs, "first_step": epoch * steps_per_epoch}),
            "restarts": restarts, "workers": world}
        history.append(metrics)
        report_epoch(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "epoch": epoch, "history": history, "restarts": restarts})


def training_rows(config, dataset_path: str, cams_dir: str | None):
    """The train split's images, joined with their CAMs when hints are on, materialised
    (the join's lookup actor must not share the CPUs with the training workers)."""
    ds = open_dataset(dataset_path, ["image_id", "image"], [config.classifier.train_split],
                      rows_per_block=32)
    if cams_dir is not None:
        ds = with_columns(ds, cams_dir, ["cam"])
    return ds.materialize()


def make_trainer(config, dataset_path: str, cams_dir: str | None, classifier_dir: str | None,
                 name: str, storage_path: str, callbacks=None):
    """The TorchTrainer of the C²AM fit; `name` + `storage_path` identify the Ray Train
    run (the same pair again resumes it)."""
    cfg: C2amConfig = config.c2am
    split = config.classifier.train_split
    num_train = dataset_counts(dataset_path).get(split, 0)
    if num_train < cfg.batch_size:
        raise StageError(f"c2am: split {split!r} has {num_train} images, fewer than one "
                         f"batch ({cfg.batch_size})")
    init = init_source(config)
    if init == "pretrained" and not config.model.pretrained:
        raise ConfigError("c2am.init: pretrained needs model.pretrained (ImageNet weights)")
    datasets = {"train": training_rows(config, dataset_path, cams_dir).map_batches(
        C2amTrainTransform(cfg.crop_size, cfg.scale_range, cfg.hflip),
        batch_format="numpy", batch_size=16)}
    lc = C2amLoopConfig(c2am=cfg, model=config.model, num_train=num_train, init=init,
                        classifier_dir=classifier_dir)
    return build_trainer(train_loop, lc, cfg, name, storage_path, datasets,
                         callbacks=callbacks, where="c2am",
                         allow_cpu_fallback=config.ray.allow_cpu_fallback)


def require_background(info) -> None:
    """Saliency (C²AM-H) separates objects from a background: refused for a dataset
    whose every pixel has a class (`data.background: false`, e.g. CamVid), before the
    C²AM fit rather than after it."""
    if not info.background:
        raise StageError("affinity.labels_from: saliency needs a dataset with a background "
                         "class (C²AM's saliency separates objects from it); this dataset "
                         "gives every pixel a class: use affinity.labels_from: cams")


def run(config, ctx) -> dict:
    """Fit C²AM and export it to `<step folder>/model.{pt,json}`."""
    from ..models.c2am import build_c2am, save_c2am

    require_background(ctx.dataset_info())
    cfg = config.c2am
    name = fit_name(ctx)
    train_root = storage.join(ctx.path, "ray_train")
    cams_dir = ctx.input("cams") if ctx.has_input("cams") else None
    classifier_dir = ctx.input("classifier") if ctx.has_input("classifier") else None
    trainer = make_trainer(config, ctx.dataset_path, cams_dir, classifier_dir, name,
                           train_root)
    state = run_fit(trainer, "c2am")
    model = build_c2am(config.model, pretrained=False)
    model.load_state_dict(state["model"])
    last = state["history"][-1]
    inverted = cfg.hint_weight <= 0 and last["border"] > BORDER_INVERTED
    if inverted:
        model.polarity.fill_(-1.0)
    save_c2am(model, config.model, ctx.path,
              {"epochs": state["epoch"] + 1, "hint_weight": cfg.hint_weight,
               "inverted": bool(inverted)})
    remove_earlier_fits(train_root, name)
    storage.write_json_atomic(storage.join(ctx.path, "history.json"), state["history"])
    summary = {k: round(last[k], 4) for k in ("loss", "fg_pull", "bg_pull", "push", "border")}
    if cfg.hint_weight > 0:
        summary["hint"] = round(last["hint"], 4)
    summary.update(epoch=last["epoch"], inverted=bool(inverted))
    ctx.write_metrics({**summary, "history": state["history"]})
    return summary

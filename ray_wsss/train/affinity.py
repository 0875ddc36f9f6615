"""Stage `affinity`: fit IRN's boundary network (models/affinity.py) on the affinity
labels, with Ray Train (DDP), through the shared fit plumbing (train/fit.py).

Ahn, Cho and Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
Relations" (CVPR 2019). The backbone is frozen (the fitted classifier's own by default,
`affinity.init`); only the 1x1 heads and the fusing conv learn. Ray Data joins each
train image with its affinity label map (stage `affinity_labels`), rescales, crops and
flips both together on CPU workers (`joint_scale_crop`; the label padded with 255,
unsure), and samples the label at stride 4, the boundary map's resolution. On the
workers: boundary map B, affinities a = 1 - path max of B over the pairs within
`affinity.radius` (IRN: 10), pair labels from the stride-4 labels, and the loss
L = 1/4 L_bg+ + 1/4 L_fg+ + 1/2 L_neg (`models.affinity.affinity_loss`); SGD with poly
decay. Each epoch's history holds the total and the three terms; a checkpoint per epoch,
resumed after a failure.

The finished network is exported as `affinity/model.pt` + `model.json` (kind
"affinity", loadable with `models.registry.load_model`), the frozen backbone included.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..config import AffinityConfig, ModelConfig
from ..data.dataset import dataset_counts, open_dataset
from ..data.join import with_columns
from ..data.transforms import joint_scale_crop
from ..errors import ConfigError, DataError, StageError
from ..refine.affinity import UNSURE, labels_at_stride, pair_offsets
from .fit import (build_trainer, fit_name, lr_at, make_optimizer, remove_earlier_fits,
                  report_epoch, resume, run_fit, set_lr, start_worker)

STRIDE = 4  # the boundary map's: the backbone's first stage


class AffinityTrainTransform:
    """Training batches: image and affinity label decoded, rescaled, cropped and flipped
    together, the label then sampled at stride 4. Outputs {"image": (B, S, S, 3) uint8,
    "label": (B, ceil(S/4), ceil(S/4)) uint8 (0 background, classes, 255 unsure)}."""

    def __init__(self, crop_size: int, scale_range=(0.7, 1.3), hflip: bool = True,
                 seed: int | None = None):
        self.crop_size, self.scale_range, self.hflip, self.seed = (crop_size, scale_range,
                                                                   hflip, seed)

    def __call__(self, batch: dict) -> dict:
        from ..data.codecs import decode_image, decode_mask

        rng = np.random.default_rng(self.seed)  # a fresh one per batch (see TrainTransform)
        n, s = len(batch["image"]), self.crop_size
        side = math.ceil(s / STRIDE)
        images = np.empty((n, s, s, 3), np.uint8)
        labels = np.empty((n, side, side), np.uint8)
        for i, (data, image_id) in enumerate(zip(batch["image"], batch["image_id"])):
            where = f"image_id {image_id}"
            img = decode_image(data, where)
            label = decode_mask(batch["affinity_label"][i], f"affinity_label of {where}")
            if label.shape != img.shape[:2]:
                raise DataError(f"affinity_label is {label.shape[1]}x{label.shape[0]}, the "
                                f"image {img.shape[1]}x{img.shape[0]}", row=str(image_id))
            img, (label,) = joint_scale_crop(img, [label], s, rng.uniform(*self.scale_range),
                                             rng, fill=UNSURE)
            if self.hflip and rng.random() < 0.5:
                img, label = img[:, ::-1], label[:, ::-1]
            images[i] = img
            labels[i] = labels_at_stride(label, STRIDE)
        return {"image": images, "label": labels}


def batch_pair_labels(labels, offsets):
    """`refine.affinity.pair_labels` for a batch, in torch on the labels' device.

    labels: (B, h, w) uint8; offsets (P, 2). Returns (bg_pos, fg_pos, neg), each
    (B, P, h, w) bool: both ends 0 / both the same class > 0 / different labels; False
    where either end is 255 or the destination is outside the image."""
    import torch
    import torch.nn.functional as F

    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    _, h, w = labels.shape
    r = int(np.abs(offsets).max()) if len(offsets) else 0
    padded = F.pad(labels.to(torch.int16), (r, r, r, r), value=UNSURE)
    src = labels.to(torch.int16)[:, None]
    dst = torch.stack([padded[:, r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offsets],
                      1)
    valid = (src != UNSURE) & (dst != UNSURE)
    same = valid & (src == dst)
    return same & (src == 0), same & (src > 0), valid & (src != dst)


@dataclass(frozen=True)
class AffinityLoopConfig:
    """What the workers need (frozen dataclasses pickle to Ray Train's workers)."""
    affinity: AffinityConfig
    model: ModelConfig
    num_train: int
    classifier_dir: str | None   # the classifier whose backbone the network stands on


def build_model(lc: AffinityLoopConfig):
    from ..models.affinity import build_affinity_net
    from .segmenter import load_classifier_backbone

    model = build_affinity_net(lc.model, pretrained=lc.affinity.init == "pretrained")
    if lc.classifier_dir:
        load_classifier_backbone(model, lc.classifier_dir, lc.model.backbone)
        model.backbone.eval()
    return model


def _train_epoch(model, ddp, opt, batches, cfg: AffinityConfig, offsets, schedule) -> dict:
    from ..models.affinity import affinity_loss, path_max_affinity

    total, step = schedule["total"], schedule["first_step"]
    ddp.train()
    t0, waited = time.time(), 0.0
    sums = {"loss": [], "bg_pos": [], "fg_pos": [], "neg": []}
    while True:
        t_wait = time.time()
        batch = next(batches, None)
        waited += time.time() - t_wait
        if batch is None:
            break
        set_lr(opt, lr_at(step, total, cfg.lr, 0))
        boundary = ddp(batch["image"].permute(0, 3, 1, 2).float())
        labels = batch["label"]
        # the stride-4 map of a crop S is ceil(S / 4) for every backbone here; a backbone
        # that rounds otherwise loses the last row or column, not the alignment
        h, w = (min(a, b) for a, b in zip(boundary.shape[-2:], labels.shape[-2:]))
        aff = path_max_affinity(boundary[..., :h, :w], offsets)
        loss, parts = affinity_loss(aff, *batch_pair_labels(labels[:, :h, :w], offsets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums["loss"].append(loss.item())
        for k, v in parts.items():
            sums[k].append(v.item())
        step += 1
    out = {k: float(np.mean(v)) if v else math.nan for k, v in sums.items()}
    return {**out, "lr": lr_at(step, total, cfg.lr, 0), "steps": len(sums["loss"]),
            "epoch_seconds": round(time.time() - t0, 2), "data_wait_seconds": round(waited, 2)}


def train_loop(lc: AffinityLoopConfig) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = lc.affinity
    world, _, device = start_worker("affinity", cfg)
    model = build_model(lc)
    opt = make_optimizer([{"params": model.trainable_parameters(), "lr_scale": 1.0}], cfg)
    start, history, restarts = resume("affinity", {"model": model, "optimizer": opt})
    ddp = ray.train.torch.prepare_model(model)
    model = model.to(device)
    offsets = pair_offsets(cfg.radius)
    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, lc.num_train // (per_worker * world))
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.epochs):
        batches = iter(shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
            dtypes={"image": torch.uint8, "label": torch.uint8}, device=device))
        metrics = {"epoch": epoch + 1, **_train_epoch(
            model, ddp, opt, batches, cfg, offsets,
            {"total": steps_per_epoch * cfg.epochs, "first_step": epoch * steps_per_epoch}),
            "restarts": restarts, "workers": world}
        history.append(metrics)
        report_epoch(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "epoch": epoch, "history": history, "restarts": restarts})


def training_rows(config, dataset_path: str, labels_dir: str):
    """The train split's images joined with their affinity labels, materialised (the
    join's lookup actor must not share the CPUs with the training workers; see
    `train.segmenter.training_rows`)."""
    ds = open_dataset(dataset_path, ["image_id", "image"], [config.classifier.train_split],
                      rows_per_block=32)
    return with_columns(ds, labels_dir, ["affinity_label"]).materialize()


def make_trainer(config, dataset_path: str, labels_dir: str, classifier_dir: str | None,
                 name: str, storage_path: str, callbacks=None):
    """The TorchTrainer of the affinity fit; `name` + `storage_path` identify the Ray
    Train run (the same pair again resumes it)."""
    cfg: AffinityConfig = config.affinity
    split = config.classifier.train_split
    num_train = dataset_counts(dataset_path).get(split, 0)
    if num_train < cfg.batch_size:
        raise StageError(f"affinity: split {split!r} has {num_train} images, fewer than one "
                         f"batch ({cfg.batch_size})")
    if cfg.init == "pretrained" and not config.model.pretrained:
        raise ConfigError("affinity.init: pretrained needs model.pretrained (ImageNet "
                          "weights); a frozen random backbone cannot learn boundaries")
    datasets = {"train": training_rows(config, dataset_path, labels_dir).map_batches(
        AffinityTrainTransform(cfg.crop_size, cfg.scale_range, cfg.hflip),
        batch_format="numpy", batch_size=16)}
    lc = AffinityLoopConfig(affinity=cfg, model=config.model, num_train=num_train,
                            classifier_dir=classifier_dir)
    return build_trainer(train_loop, lc, cfg, name, storage_path, datasets,
                         callbacks=callbacks, where="affinity",
                         allow_cpu_fallback=config.ray.allow_cpu_fallback)


def run(config, ctx) -> dict:
    """Fit the boundary network and export it to `<step folder>/model.{pt,json}`."""
    from ..models.affinity import build_affinity_net, save_affinity_net

    cfg = config.affinity
    name = fit_name(ctx)
    train_root = storage.join(ctx.path, "ray_train")
    classifier_dir = ctx.input("classifier") if cfg.init == "classifier" else None
    trainer = make_trainer(config, ctx.dataset_path, ctx.input("affinity_labels"),
                           classifier_dir, name, train_root)
    state = run_fit(trainer, "affinity")
    model = build_affinity_net(config.model, pretrained=False)
    model.load_state_dict(state["model"])
    save_affinity_net(model, config.model, ctx.path,
                      {"epochs": state["epoch"] + 1, "radius": cfg.radius, "init": cfg.init})
    remove_earlier_fits(train_root, name)
    storage.write_json_atomic(storage.join(ctx.path, "history.json"), state["history"])
    last = state["history"][-1]
    summary = {k: round(last[k], 4) for k in ("loss", "bg_pos", "fg_pos", "neg")}
    summary["epoch"] = last["epoch"]
    ctx.write_metrics({**summary, "history": state["history"]})
    return summary

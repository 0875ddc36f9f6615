"""Stage `segmenter`: fit DeepLabV3+ on the pseudo masks with Ray Train (DDP).

The last step of every reference pipeline (IRN, Puzzle-CAM, P-NOC, MCIS): a
segmentation network learns from the pseudo masks of the train split and then labels
any photo, tags or not. Ray Data joins each train image with its pseudo mask (the CRF
masks or the seeds, `segmenter.masks`; pixels in `segmenter.unsure_band` ignored),
decodes and augments both together on CPU workers (random rescale 0.5-2.0, crop, flip,
colour jitter), and streams shards to the workers; cross-entropy with ignore 255
(weighted per class by median frequency with `segmenter.class_weights`, counted on the
targets in one pass before the fit), SGD with poly decay, backbone at the base rate and
ASPP + decoder at 10x (DeepLab). Every epoch ends with a checkpoint and, on rank 0, the
val mIoU against ground truth (images letterboxed to the crop size: a quick figure; the
`predict` step scores full images).

Semi-weak mode (`semi`, `segmenter.mode`): the pixel-labelled images `semi` names learn
their ground truth instead of their pseudo masks (joined from the dataset on image_id);
`segmenter.mode: cce` uses class-aware cross entropy (the softmax over the image's
classes and background, `train/semi.py`), and `pct` learns, with CCE, the label-restricted
predictions of the hybrid net of stage `pct` instead of the CRF masks.

The finished model is exported as `segmenter/model.pt` + `model.json` (kind
"segmenter", loadable with `models.registry.load_model`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import storage
from ..config import ModelConfig, SegmenterConfig
from ..data.dataset import dataset_counts, open_dataset, read_info
from ..data.join import with_columns
from ..data.labelled import labelled_ids, write_labelled
from ..data.transforms import SegEvalTransform, SegTrainTransform
from ..errors import ConfigError, StageError
from .fit import (ValBatches, build_trainer, fit_name, lr_at, make_optimizer,
                  remove_earlier_fits, report_epoch, resume, run_fit, set_lr, start_worker)

# segmenter.masks -> the column of the masks (in the folder of stage `mask_stage`)
MASK_COLUMNS = {"crf": "pseudo_mask", "seeds": "seed", "random_walk": "rw_mask"}


def mask_stage(config) -> str:
    """The stage whose folder holds the masks `segmenter.masks` names."""
    return "random_walk" if config.segmenter.masks == "random_walk" else "crf"


def ground_truth_for(batch: dict, labelled: Sequence[str], column: str) -> dict:
    """Ray Data batch function: the target `column` of the pixel-labelled images replaced
    by their ground truth (the dataset's `mask`, dropped afterwards); their CAMs, if
    joined for the unsure band, dropped (ground truth has no unsure band)."""
    keep = frozenset(labelled)
    out = {k: v for k, v in batch.items() if k != "mask"}
    if "restored" in batch:  # loop.fallback: nothing restored where the truth is learned
        out["restored"] = np.where([str(i) in keep for i in batch["image_id"]], 0,
                                   batch["restored"])
    target = np.empty(len(batch[column]), dtype=object)
    target[:] = list(batch[column])
    cams = None
    if "cam" in batch:
        cams = np.empty(len(batch["cam"]), dtype=object)
        cams[:] = list(batch["cam"])
    for i, image_id in enumerate(batch["image_id"]):
        if str(image_id) in keep:
            target[i] = batch["mask"][i]
            if cams is not None:
                cams[i] = None
    out[column] = target
    if cams is not None:
        out["cam"] = cams
    return out


def restore_lost_tags(target: np.ndarray, round_one: np.ndarray, tags: np.ndarray,
                      mode: str) -> tuple[np.ndarray, int]:
    """Self-training's fallback (`loop.fallback`): a target label map (H, W) of the
    previous round's model with round 1's pseudo mask `round_one` (H, W) put back where
    the model lost the image's tags (`tags`: its multi-hot label vector, K; label k + 1 is
    class k). `class`: every tagged class the target holds no pixel of takes its round-1
    pixels; `image`: a target holding none of the tags becomes the round-1 mask whole.
    Returns the new target and how many of the lost tags came back (0: the target is
    returned as it was; round 1 lost them too)."""
    tagged = np.flatnonzero(np.asarray(tags) > 0) + 1
    if mode == "none" or not len(tagged):
        return target, 0
    lost = tagged[~np.isin(tagged, target)]
    back = lost[np.isin(lost, round_one)]
    if mode == "image":
        if len(lost) < len(tagged) or not len(back):
            return target, 0
        return round_one.copy(), len(back)
    if mode != "class":
        raise ConfigError(f"loop.fallback must be none, class or image, not {mode!r}")
    if not len(back):
        return target, 0
    out = target.copy()
    where = np.isin(round_one, back)
    out[where] = round_one[where]
    return out, len(back)


def restore_lost_tags_batch(batch: dict, mode: str, column: str, source: str) -> dict:
    """Ray Data batch function: `restore_lost_tags` on each row's target `column` from
    round 1's masks in `source` (dropped afterwards); `restored`: classes put back."""
    from ..data.codecs import decode_mask, encode_mask
    from ..data.dataset import label_matrix
    from ..errors import DataError

    out = {k: v for k, v in batch.items() if k != source}
    targets = np.empty(len(batch[column]), dtype=object)
    restored = np.zeros(len(targets), np.int64)
    tags = label_matrix(batch["label_vector"])
    for i, image_id in enumerate(batch["image_id"]):
        target = decode_mask(batch[column][i], f"{column} of image_id {image_id}")
        if batch[source][i] is None:
            raise DataError(f"no round-1 mask ({source}) for loop.fallback",
                            row=str(image_id))
        first = decode_mask(batch[source][i], f"{source} of image_id {image_id}")
        if first.shape != target.shape:
            raise DataError(f"{column} is {target.shape[1]}x{target.shape[0]}, its round-1 "
                            f"mask ({source}) {first.shape[1]}x{first.shape[0]}",
                            row=str(image_id))
        new, restored[i] = restore_lost_tags(target, first, tags[i], mode)
        targets[i] = encode_mask(new) if restored[i] else batch[column][i]
    out[column] = targets
    out["restored"] = restored
    return out


def segmenter_model_config(config) -> ModelConfig:
    """The segmenter's backbone: `segmenter.backbone` / `pretrained`, else the
    classifier's."""
    seg = config.segmenter
    return ModelConfig(backbone=seg.backbone or config.model.backbone,
                       output_stride=seg.output_stride,
                       pretrained=seg.pretrained if seg.pretrained is not None
                       else config.model.pretrained)


def init_source(config) -> str:
    """`segmenter.init`: `auto` is ImageNet weights where configured, else the
    classifier's backbone (trained on this data: far better than random for a
    from-scratch backbone)."""
    init = config.segmenter.init
    if init != "auto":
        return init
    return "pretrained" if segmenter_model_config(config).pretrained else "classifier"


@dataclass(frozen=True)
class SegLoopConfig:
    """What the workers need (frozen dataclasses pickle to Ray Train's workers)."""
    segmenter: SegmenterConfig
    model: ModelConfig
    num_labels: int
    num_train: int
    has_val: bool
    background: bool
    init: str                    # pretrained | classifier | scratch
    classifier_dir: str | None   # the classifier whose backbone starts the fit
    class_weights: tuple[float, ...] | None = None   # per label, segmenter.class_weights


def build_model(lc: SegLoopConfig):
    from ..models.deeplab import build_segmenter

    model = build_segmenter(lc.model, lc.num_labels, pretrained=lc.init == "pretrained",
                            aspp_channels=lc.segmenter.aspp_channels,
                            decoder_channels=lc.segmenter.decoder_channels)
    if lc.init == "classifier" and lc.classifier_dir:
        load_classifier_backbone(model, lc.classifier_dir, lc.model.backbone)
    return model


def load_classifier_backbone(model, classifier_dir: str, backbone: str) -> None:
    """Start the segmenter's backbone from the classifier's (same backbone kind; the
    output stride may differ: dilation does not change parameter shapes)."""
    from ..models.registry import load_model, read_spec

    spec = read_spec(classifier_dir)
    if spec.get("backbone") != backbone:
        raise ConfigError(f"segmenter.init: classifier: the classifier's backbone "
                          f"{spec.get('backbone')!r} differs from the segmenter's "
                          f"{backbone!r}; set segmenter.init: pretrained or scratch, or "
                          "the same backbone")
    state = load_model(classifier_dir).backbone.state_dict()
    own = model.backbone.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            # an extra input channel (the loop's prior) on one side only: copy RGB
            fixed = own[k].clone()
            fixed[:, : v.shape[1]] = v[:, : fixed.shape[1]]
            state[k] = fixed
    model.backbone.load_state_dict(state)


def segmentation_loss(logits, target, class_weights=None):
    """Cross-entropy over labels with ignore 255: logits (B, L, H, W), target (B, H, W);
    with `class_weights` (L,) the weighted mean over the valid pixels."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, target.long(), weight=class_weights, ignore_index=255)


def batch_loss(logits, batch: dict, mode: str, background: bool, class_weights=None):
    """The fit's loss for `segmenter.mode`: cross entropy (`weak`), or class-aware cross
    entropy over each image's classes and background (`cce`, `pct`); `class_weights`
    (a tensor of one weight per label, or None) weigh the pixels by their target."""
    if mode == "weak":
        return segmentation_loss(logits, batch["mask"], class_weights)
    from .semi import allowed_labels, class_aware_cross_entropy

    return class_aware_cross_entropy(logits, batch["mask"],
                                     allowed_labels(batch["label_vector"], background),
                                     class_weights=class_weights)


def label_pixel_counts(batch: dict, column: str, num_labels: int) -> dict:
    """Ray Data batch function: per target mask, the pixels of each label (`pixels`) and,
    for each label it holds, the mask's valid pixels (`present`): rows of length
    num_labels (255 = ignored, not counted)."""
    from ..data.codecs import decode_mask

    pixels = np.zeros((len(batch[column]), num_labels), np.int64)
    present = np.zeros_like(pixels)
    for i, data in enumerate(batch[column]):
        m = decode_mask(data, f"{column} of image_id {batch['image_id'][i]}")
        valid = m[m != 255]
        if valid.size and int(valid.max()) >= num_labels:
            raise StageError(f"segmenter: a {column} mask of image "
                             f"{batch['image_id'][i]!r} holds label {int(valid.max())}; "
                             f"the dataset has {num_labels} labels")
        pixels[i] = np.bincount(valid, minlength=num_labels)
        present[i] = np.where(pixels[i] > 0, valid.size, 0)
    return {"pixels": pixels, "present": present}


def median_frequency_weights(pixels: np.ndarray, present: np.ndarray) -> np.ndarray:
    """SegNet's median frequency balancing (Eigen & Fergus 2015): f_c = pixels of label c
    / pixels of the images that hold c; weight_c = median(f) / f_c over the labels that
    occur; a label that never occurs weighs 0 (it is never a target)."""
    pixels, present = np.asarray(pixels, np.float64), np.asarray(present, np.float64)
    seen = pixels > 0
    if not seen.any():
        raise StageError("segmenter.class_weights: median_frequency: the targets hold no "
                         "labelled pixel")
    freq = np.where(seen, pixels / np.maximum(present, 1), 0.0)
    weights = np.zeros_like(freq)
    weights[seen] = np.median(freq[seen]) / freq[seen]
    return weights


def class_weights_of(rows, column: str, num_labels: int) -> tuple[float, ...]:
    """The median-frequency weights of the fit's targets (`rows`, materialised)."""
    counts = rows.select_columns(["image_id", column]).map_batches(
        label_pixel_counts, fn_kwargs={"column": column, "num_labels": num_labels},
        batch_format="numpy", batch_size=64)
    pixels = np.zeros(num_labels, np.int64)
    present = np.zeros(num_labels, np.int64)
    for batch in counts.iter_batches(batch_format="numpy", batch_size=None):
        pixels += batch["pixels"].sum(0)
        present += batch["present"].sum(0)
    return tuple(float(w) for w in median_frequency_weights(pixels, present))


def _train_epoch(model, ddp, opt, batches, cfg: SegmenterConfig, schedule,
                 background: bool = True, class_weights=None) -> dict:
    total, warmup, step = schedule["total"], schedule["warmup"], schedule["first_step"]
    ddp.train()
    t0, waited, losses = time.time(), 0.0, []
    weights = None
    if class_weights is not None:
        import torch

        weights = torch.tensor(class_weights, dtype=torch.float32,
                               device=next(model.parameters()).device)
    while True:
        t_wait = time.time()
        batch = next(batches, None)
        waited += time.time() - t_wait
        if batch is None:
            break
        set_lr(opt, lr_at(step, total, cfg.lr, warmup))
        logits = ddp(batch["image"].permute(0, 3, 1, 2).float())
        loss = batch_loss(logits, batch, cfg.mode, background, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
    return {"loss": float(np.mean(losses)) if losses else math.nan,
            "lr": lr_at(step, total, cfg.lr, warmup), "steps": len(losses),
            "epoch_seconds": round(time.time() - t0, 2), "data_wait_seconds": round(waited, 2)}


def val_batches(shard, batch_size: int, device) -> ValBatches:
    """The val split's (image, mask) batches, cached after the first epoch when small."""
    import torch

    return ValBatches(shard, batch_size, device, {"image": torch.uint8, "mask": torch.uint8})


def _validate(model, batches, num_labels: int, background: bool) -> dict:
    """Pixel mIoU and accuracy of `model` on `batches` (`val_batches`)."""
    import torch

    from ..evaluate import ConfusionMatrix

    model.eval()
    conf = ConfusionMatrix(num_labels)
    with torch.no_grad():
        for batch in batches:
            pred = model(batch["image"].permute(0, 3, 1, 2).float()).argmax(1)
            conf.update(batch["mask"].cpu().numpy(), pred.cpu().numpy().astype(np.uint8))
    m = conf.metrics(exclude=() if background else (0,))
    return {"val_miou": 100 * m["miou"], "val_pixel_accuracy": 100 * m["pixel_accuracy"]}


def train_loop(lc: SegLoopConfig) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = lc.segmenter
    world, rank, device = start_worker("segmenter", cfg)
    model = build_model(lc)
    opt = make_optimizer([{"params": list(model.backbone_parameters()), "lr_scale": 1.0},
                          {"params": list(model.head_parameters()),
                           "lr_scale": cfg.head_lr_multiplier}], cfg)
    start, history, restarts = resume("segmenter", {"model": model, "optimizer": opt})
    ddp = ray.train.torch.prepare_model(model)
    model = model.to(device)
    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, lc.num_train // (per_worker * world))
    schedule = {"total": steps_per_epoch * cfg.epochs,
                "warmup": int(cfg.warmup_epochs * steps_per_epoch)}
    shard = ray.train.get_dataset_shard("train")
    val = val_batches(ray.train.get_dataset_shard("val"), per_worker, device) \
        if rank == 0 and lc.has_val else None
    for epoch in range(start, cfg.epochs):
        batches = iter(shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
            dtypes={"image": torch.uint8, "mask": torch.uint8, "label_vector": torch.float32},
            device=device))
        metrics = {"epoch": epoch + 1, **_train_epoch(
            model, ddp, opt, batches, cfg, {**schedule, "first_step": epoch * steps_per_epoch},
            lc.background, lc.class_weights),
            "restarts": restarts, "workers": world}
        if val is not None:
            metrics.update(_validate(model, val, lc.num_labels, lc.background))
        history.append(metrics)
        report_epoch(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "epoch": epoch, "history": history, "restarts": restarts,
                               "class_weights": lc.class_weights})


def training_rows(config, dataset_path: str, masks_dir: str, cams_dir: str | None,
                  column: str | None = None, labelled: Sequence[str] = (),
                  fallback_dir: str | None = None, stats: dict | None = None):
    """The train split's images joined with their pseudo masks (and CAMs for the unsure
    band), the pixel-labelled images (`labelled` ids) with their ground truth instead,
    materialised: the join's lookup actor must not share the CPUs with the training
    workers (a Train `datasets=` pipeline holding an actor pool can starve itself on a
    small machine). `fallback_dir`: round 1's masks (the column `segmenter.masks` names),
    put back per `loop.fallback` where the targets lost an image's tags; `stats` gets
    how many classes and images that restored."""
    cfg = config.segmenter
    column = column or MASK_COLUMNS[cfg.masks]
    ds = open_dataset(dataset_path, ["image_id", "image", "label_vector"]
                      + (["mask"] if labelled else []), [cfg.train_split], rows_per_block=32)
    ds = with_columns(ds, masks_dir, [column])
    if fallback_dir is not None:
        source = MASK_COLUMNS[cfg.masks]
        if source == column:
            raise ConfigError(f"loop.fallback: the targets and round 1's masks are both "
                              f"column {column!r}")
        ds = with_columns(ds, fallback_dir, [source]).map_batches(
            restore_lost_tags_batch, fn_kwargs={"mode": config.loop.fallback,
                                                "column": column, "source": source},
            batch_format="numpy", batch_size=32)
    if cfg.unsure_band is not None and cams_dir is not None:
        ds = with_columns(ds, cams_dir, ["cam"])
    if labelled:
        ds = ds.map_batches(ground_truth_for, fn_kwargs={"labelled": list(labelled),
                                                         "column": column},
                            batch_format="numpy", batch_size=32)
    ds = ds.materialize()
    if fallback_dir is not None and stats is not None:
        restored = np.concatenate([b["restored"] for b in ds.select_columns(
            ["restored"]).iter_batches(batch_format="numpy")] or [np.zeros(0)])
        stats.update(restored_classes=int(restored.sum()),
                     restored_images=int((restored > 0).sum()),
                     fallback_rows=int(len(restored)))
    return ds


def make_trainer(config, dataset_path: str, masks_dir: str, cams_dir: str | None,
                 classifier_dir: str | None, name: str, storage_path: str, callbacks=None,
                 column: str | None = None, labelled: Sequence[str] = (),
                 fallback_dir: str | None = None, stats: dict | None = None):
    """The TorchTrainer of the segmenter fit. `name` + `storage_path` identify the Ray
    Train run: the same pair again resumes it. `masks_dir` / `column`: where the target
    masks are (default: the column `segmenter.masks` names); `labelled`: ids of the
    pixel-labelled images, which learn their ground truth; `fallback_dir`, `stats`: see
    `training_rows`."""
    from ..models.deeplab import build_segmenter

    cfg: SegmenterConfig = config.segmenter
    info = read_info(dataset_path)
    counts = dataset_counts(dataset_path)
    num_train = counts.get(cfg.train_split, 0)
    if num_train < cfg.batch_size:
        raise StageError(f"segmenter: split {cfg.train_split!r} has {num_train} images, "
                         f"fewer than one batch ({cfg.batch_size})")
    model_cfg = segmenter_model_config(config)
    init = init_source(config)
    build_segmenter(model_cfg, info.num_classes + 1, pretrained=init == "pretrained")
    has_val = bool(cfg.val_split) and counts.get(cfg.val_split, 0) > 0
    column = column or MASK_COLUMNS[cfg.masks]
    rows = training_rows(config, dataset_path, masks_dir, cams_dir, column, labelled,
                         fallback_dir, stats)
    weights = class_weights_of(rows, column, info.num_classes + 1) \
        if cfg.class_weights == "median_frequency" else None
    datasets = {"train": rows.map_batches(
        SegTrainTransform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter,
                          column, cfg.unsure_band if cams_dir else None),
        batch_format="numpy", batch_size=16)}
    if has_val:
        val = open_dataset(dataset_path, ["image", "mask"], [cfg.val_split], require=("mask",))
        datasets["val"] = val.map_batches(SegEvalTransform(cfg.crop_size),
                                          batch_format="numpy", batch_size=16)
    lc = SegLoopConfig(segmenter=cfg, model=model_cfg, num_labels=info.num_classes + 1,
                       num_train=num_train, has_val=has_val, background=info.background,
                       init=init, classifier_dir=classifier_dir, class_weights=weights)
    return build_trainer(train_loop, lc, cfg, name, storage_path, datasets,
                         callbacks=callbacks, where="segmenter",
                         allow_cpu_fallback=config.ray.allow_cpu_fallback)


def run(config, ctx) -> dict:
    """Fit DeepLabV3+ and export it to `<step folder>/model.{pt,json}`."""
    from ..models.deeplab import build_segmenter, save_segmenter

    info = ctx.dataset_info()
    name = fit_name(ctx)
    train_root = storage.join(ctx.path, "ray_train")
    classifier_dir = ctx.input("classifier") if init_source(config) == "classifier" else None
    labelled = labelled_ids(config, ctx.dataset_path)
    restored: dict = {}
    if ctx.has_input("predict"):
        # self-training (loop.feedback: labels): the previous round's CRF-refined
        # predictions of the train split are the targets
        if not config.predict.crf:
            raise ConfigError("loop.feedback: labels fits each round's segmentation model "
                              "on the previous round's CRF-refined predictions: set "
                              "predict.crf: true")
        # loop.fallback: round 1's masks where the predictions lost an image's tags
        fallback = ctx.input(mask_stage(config)) if ctx.has_input(mask_stage(config)) \
            else None
        trainer = make_trainer(config, ctx.dataset_path, ctx.input("predict"), None,
                               classifier_dir, name, train_root, column="prediction_crf",
                               labelled=labelled, fallback_dir=fallback, stats=restored)
        if fallback is not None:
            print(f"[ray-wsss] segmenter: loop.fallback {config.loop.fallback}: round 1's "
                  f"masks put back {restored['restored_classes']} lost classes on "
                  f"{restored['restored_images']} of {restored['fallback_rows']} images",
                  flush=True)
    elif config.segmenter.mode == "pct":
        # the hybrid net's label-restricted predictions of the train split
        from .pct import masks_folder

        trainer = make_trainer(config, ctx.dataset_path, masks_folder(ctx.input("pct")), None,
                               classifier_dir, name, train_root, column="pseudo_mask",
                               labelled=labelled)
    else:
        trainer = make_trainer(config, ctx.dataset_path, ctx.input(mask_stage(config)),
                               ctx.input("cams"), classifier_dir, name, train_root,
                               labelled=labelled)
    state = run_fit(trainer, "segmenter")
    model_cfg = segmenter_model_config(config)
    model = build_segmenter(model_cfg, info.num_classes + 1, pretrained=False,
                            aspp_channels=config.segmenter.aspp_channels,
                            decoder_channels=config.segmenter.decoder_channels)
    model.load_state_dict(state["model"])
    save_segmenter(model, model_cfg, ctx.path, info.classes,
                   {"epochs": state["epoch"] + 1, "masks": config.segmenter.masks,
                    "mode": config.segmenter.mode, "labelled_images": len(labelled),
                    **({"class_weights": [round(w, 4) for w in state["class_weights"]]}
                       if state.get("class_weights") else {})})
    remove_earlier_fits(train_root, name)
    storage.write_json_atomic(storage.join(ctx.path, "history.json"), state["history"])
    if labelled:
        write_labelled(ctx.path, labelled)
    last = state["history"][-1]
    summary = {k: last[k] for k in ("loss", "val_miou", "epoch") if k in last}
    if labelled:
        summary["labelled_images"] = len(labelled)
    summary.update(restored)
    ctx.write_metrics({**summary, "history": state["history"]})
    return summary

"""Stage `pct`: progressive cross training of a hybrid net and a pseudo net (semi-weak
mode, `segmenter.mode: pct`).

Following "Learning pseudo labels for semi-and-weakly supervised semantic segmentation"
(Pattern Recognition 2022). Two DeepLabV3+ nets of the segmenter's architecture, weights
not shared, the hybrid net H and the pseudo net P, are fitted together on Ray Train
(DDP: each net its own DistributedDataParallel, one backward through both). Every step
a worker takes a half batch of pixel-labelled ("strong") crops with their ground truth
and a half batch of tagged ("weak") crops, and each net does one forward over both:

    H: CCE(H, ground truth)                                             strong half
       + tag_weight   * BCE(global max pooling of H's class maps, tags)  weak half
       + cross_weight * Σ_i w_i CCE_i(H, label-restricted argmax of P)   weak half
    P: CCE(P, label-restricted argmax of H)                              weak half
    w_i = (min over image i's classes of J_c) ** weight_power,  J_c = P's running IoU
          on the strong half (`train/semi.py`: decayed counters, summed over workers)

P never sees ground truth, so J_c is an honest measure of how good labels learned from
H's predictions are, class by class: at the start J is 0 and H learns from ground truth
and tags only; as P's IoU grows H learns more from P on the images whose classes P
segments well (the "progressive" part). The strong set is small: every worker reads all
of it (not split), repeated and shuffled so that one pass covers an epoch of the weak
shard: sampling with replacement when there are few pixel-labelled images.

Then H labels the train split, each image restricted to its tags and background, on
Ray Data actors: `pct/masks/*.parquet` (image_id, split, label_vector, mask: ground
truth or null, pseudo_mask: H's label-restricted prediction), the schema the segmenter
reads from the CRF step. The segmenter (`segmenter.mode: pct`) is fitted on these,
the pixel-labelled images on their ground truth. Also written: `pct/hybrid/` and
`pct/pseudo/` (kind "segmenter"), history.json, labelled.json; metrics.json gets the
fit's last epoch and the score of H's masks on the train images that have a mask but
were not pixel-labelled (the quality of the targets the segmenter learns from).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .. import storage
from ..config import PctConfig
from ..data.codecs import decode_image, encode_mask
from ..data.dataset import (dataset_counts, label_matrix, open_dataset, read_info, read_table,
                            split_rows)
from ..data.labelled import labelled_ids, write_labelled
from ..data.transforms import SegEvalTransform, SegTrainTransform
from ..errors import StageError
from ..predict import SegmentPredictor
from .fit import (build_trainer, fit_name, lr_at, make_optimizer, remove_earlier_fits,
                  report_epoch, resume, run_fit, set_lr, start_worker)
from .segmenter import (SegLoopConfig, _validate, build_model, init_source,
                        segmenter_model_config, val_batches)

MASKS = "masks"      # the folder of H's masks inside the step's folder
NETS = ("hybrid", "pseudo")


def masks_folder(pct_dir: str) -> str:
    """Where the `pct` step at `pct_dir` keeps H's masks of the train split."""
    return storage.join(pct_dir, MASKS)


@dataclass(frozen=True)
class PctLoopConfig:
    """What the workers need (frozen dataclasses pickle to Ray Train's workers)."""
    pct: PctConfig
    nets: SegLoopConfig          # the architecture and start of both nets
    num_weak: int                # tagged train images (the epoch)


def _optimizer(model, cfg: PctConfig):
    return make_optimizer([{"params": list(model.backbone_parameters()), "lr_scale": 1.0},
                           {"params": list(model.head_parameters()),
                            "lr_scale": cfg.head_lr_multiplier}], cfg)


def _cycle(shard, batch_size: int, device, dtypes) -> Iterator[dict]:
    """The strong shard's batches without end: a new pass (new shuffle and augmentation)
    whenever one ends."""
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=4 * batch_size,
                                              dtypes=dtypes, device=device):
            n += 1
            yield batch
        if n == 0:
            raise StageError(f"pct: the pixel-labelled images make no batch of {batch_size}")


def pct_step(hybrid, pseudo, strong: dict, weak: dict, iou, cfg: PctConfig,
             background: bool) -> dict:
    """One step's losses (before backward). strong: image (b, S, S, 3) uint8, mask
    (b, S, S) ground truth, label_vector (b, K); weak: the same with mask 0 on the
    image, 255 on the padding. Updates `iou` (a collective call under DDP)."""
    import torch

    from .semi import (allowed_labels, class_aware_cross_entropy, restricted_argmax,
                       tag_loss)

    n = strong["image"].shape[0]
    x = torch.cat([strong["image"], weak["image"]]).permute(0, 3, 1, 2).float()
    h_logits, p_logits = hybrid(x), pseudo(x)
    allowed_s = allowed_labels(strong["label_vector"], background)
    allowed_w = allowed_labels(weak["label_vector"], background)
    gt = strong["mask"].long()
    padding = weak["mask"] == 255
    with torch.no_grad():
        iou.update(restricted_argmax(p_logits[:n], allowed_s), gt)
        from_p = restricted_argmax(p_logits[n:], allowed_w).masked_fill(padding, 255)
        from_h = restricted_argmax(h_logits[n:], allowed_w).masked_fill(padding, 255)
        weights = iou.image_weights(weak["label_vector"], cfg.weight_power)
    loss_gt = class_aware_cross_entropy(h_logits[:n], gt, allowed_s)
    loss_tags = tag_loss(h_logits[n:], weak["label_vector"])
    loss_cross = class_aware_cross_entropy(h_logits[n:], from_p, allowed_w, weights)
    loss_pseudo = class_aware_cross_entropy(p_logits[n:], from_h, allowed_w)
    return {"hybrid": loss_gt + cfg.tag_weight * loss_tags + cfg.cross_weight * loss_cross,
            "pseudo": loss_pseudo, "loss_gt": loss_gt, "loss_tags": loss_tags,
            "loss_cross": loss_cross, "weight": weights.mean()}


def _train_epoch(nets: dict, opts: dict, strong, weak, iou, lc: PctLoopConfig,
                 schedule: dict) -> dict:
    cfg = lc.pct
    total, warmup, step = schedule["total"], schedule["warmup"], schedule["first_step"]
    for net in nets.values():
        net.train()
    t0, waited, sums, steps = time.time(), 0.0, {}, 0
    weak = iter(weak)
    while True:
        t_wait = time.time()
        weak_batch = next(weak, None)
        strong_batch = next(strong) if weak_batch is not None else None
        waited += time.time() - t_wait
        if weak_batch is None:
            break
        for opt in opts.values():
            set_lr(opt, lr_at(step, total, cfg.lr, warmup))
        out = pct_step(nets["hybrid"], nets["pseudo"], strong_batch, weak_batch, iou, cfg,
                       lc.nets.background)
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        (out["hybrid"] + out["pseudo"]).backward()  # no gradient crosses between the nets
        for opt in opts.values():
            opt.step()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().item())
        steps += 1
        step += 1
    j = iou.iou().cpu().numpy()
    labels = slice(0 if lc.nets.background else 1, None)
    names = {"hybrid": "loss_hybrid", "pseudo": "loss_pseudo", "weight": "mean_weight"}
    return {**{names.get(k, k): (v / steps if steps else math.nan) for k, v in sums.items()},
            "pseudo_iou": [round(float(v), 4) for v in j],
            "pseudo_miou": float(j[labels].mean()), "lr": lr_at(step, total, cfg.lr, warmup),
            "steps": steps, "epoch_seconds": round(time.time() - t0, 2),
            "data_wait_seconds": round(waited, 2)}


def train_loop(lc: PctLoopConfig) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from .semi import RunningIoU

    cfg = lc.pct
    world, rank, device = start_worker("pct", cfg)
    models = {name: build_model(lc.nets) for name in NETS}  # drawn one after the other
    opts = {name: _optimizer(m, cfg) for name, m in models.items()}
    iou = RunningIoU(lc.nets.num_labels, cfg.iou_momentum)
    parts = {"iou": iou, **models, **{f"{n}_optimizer": o for n, o in opts.items()}}
    start, history, restarts = resume("pct", parts)
    nets = {name: ray.train.torch.prepare_model(m) for name, m in models.items()}
    for m in models.values():
        m.to(device)
    iou.to(device)
    half = max(1, cfg.batch_size // (2 * world))
    steps_per_epoch = max(1, lc.num_weak // (half * world))
    schedule = {"total": steps_per_epoch * cfg.epochs,
                "warmup": int(cfg.warmup_epochs * steps_per_epoch)}
    dtypes = {"image": torch.uint8, "mask": torch.uint8, "label_vector": torch.float32}
    strong = _cycle(ray.train.get_dataset_shard("strong"), half, device, dtypes)
    weak_shard = ray.train.get_dataset_shard("weak")
    val = val_batches(ray.train.get_dataset_shard("val"), half, device) \
        if rank == 0 and lc.nets.has_val else None
    for epoch in range(start, cfg.epochs):
        weak = weak_shard.iter_torch_batches(batch_size=half, drop_last=True,
                                             local_shuffle_buffer_size=4 * half,
                                             dtypes=dtypes, device=device)
        metrics = {"epoch": epoch + 1, **_train_epoch(
            nets, opts, strong, weak, iou, lc,
            {**schedule, "first_step": epoch * steps_per_epoch}),
            "restarts": restarts, "workers": world}
        if val is not None:
            for name, prefix in (("hybrid", ""), ("pseudo", "pseudo_")):
                scores = _validate(models[name], val, lc.nets.num_labels, lc.nets.background)
                metrics.update({prefix + k: v for k, v in scores.items()})
        history.append(metrics)
        report_epoch(metrics, {**{name: models[name].state_dict() for name in NETS},
                               **{f"{name}_optimizer": opts[name].state_dict()
                                  for name in NETS},
                               "iou": iou.state_dict(), "epoch": epoch, "history": history,
                               "restarts": restarts})


def make_trainer(config, dataset_path: str, labelled: list[str], classifier_dir: str | None,
                 name: str, storage_path: str, callbacks=None):
    """The TorchTrainer of the PCT fit over the pixel-labelled images `labelled` and the
    other images of the segmenter's train split. `name` + `storage_path` identify the
    Ray Train run: the same pair again resumes it."""
    cfg: PctConfig = config.pct
    seg = config.segmenter
    info = read_info(dataset_path)
    counts = dataset_counts(dataset_path)
    train_ids = read_table(dataset_path, ["image_id"], [seg.train_split]) \
        .column("image_id").to_pylist()
    chosen = set(labelled)
    weak_ids = sorted(set(train_ids) - chosen)
    workers = max(1, cfg.num_workers)  # 0: local mode, one loop in the driver
    half_global = max(1, cfg.batch_size // (2 * workers)) * workers
    if len(weak_ids) < half_global:
        raise StageError(f"pct: split {seg.train_split!r} has {len(weak_ids)} images without "
                         f"pixel labels, fewer than half a batch ({half_global}; "
                         "pct.batch_size)")
    if not labelled:
        raise StageError("pct: no pixel-labelled image (semi.labelled_count or "
                         "semi.labelled_file)")
    model_cfg = segmenter_model_config(config)
    init = init_source(config)
    has_val = bool(seg.val_split) and counts.get(seg.val_split, 0) > 0
    # the strong rows repeated so that one pass covers an epoch of the weak shard
    half = max(1, cfg.batch_size // (2 * max(1, cfg.num_workers)))
    steps = max(1, len(weak_ids) // half_global)
    repeat = max(1, math.ceil(max(half, steps * half) / len(labelled)))
    strong = open_dataset(dataset_path, ["image_id", "image", "label_vector", "mask"],
                          [seg.train_split], require=("mask",), ids=sorted(chosen),
                          rows_per_block=max(1, half)).materialize()
    if repeat > 1:
        strong = strong.union(*[strong] * (repeat - 1))
    augment = dict(crop_size=cfg.crop_size, scale_range=cfg.scale_range, hflip=cfg.hflip,
                   color_jitter=cfg.color_jitter)
    datasets = {
        "strong": strong.randomize_block_order().map_batches(
            SegTrainTransform(target="mask", **augment), batch_format="numpy",
            batch_size=16),
        "weak": open_dataset(dataset_path, ["image_id", "image", "label_vector"],
                             [seg.train_split], ids=weak_ids, rows_per_block=32).map_batches(
            SegTrainTransform(target=None, **augment), batch_format="numpy",
            batch_size=16)}
    if has_val:
        val = open_dataset(dataset_path, ["image", "mask"], [seg.val_split], require=("mask",))
        datasets["val"] = val.map_batches(SegEvalTransform(cfg.crop_size),
                                          batch_format="numpy", batch_size=16)
    nets = SegLoopConfig(segmenter=seg, model=model_cfg, num_labels=info.num_classes + 1,
                         num_train=len(train_ids), has_val=has_val,
                         background=info.background, init=init,
                         classifier_dir=classifier_dir)
    lc = PctLoopConfig(pct=cfg, nets=nets, num_weak=len(weak_ids))
    return build_trainer(train_loop, lc, cfg, name, storage_path, datasets,
                         split=("weak",), callbacks=callbacks, where="pct",
                         allow_cpu_fallback=config.ray.allow_cpu_fallback)


class RestrictedPredictor(SegmentPredictor):
    """Ray Data callable class: train rows -> the label-restricted prediction of a
    segmentation model (softmax scores over TTA, argmax over background and the image's
    classes): `pseudo_mask`, beside image_id, split, label_vector and mask."""

    def __init__(self, model_dir: str, background: bool, **kwargs):
        super().__init__(model_dir, **kwargs)
        self.background = background

    def __call__(self, batch: dict) -> dict:
        images = [decode_image(d, f"image_id {i}") for d, i in zip(batch["image"],
                                                                     batch["image_id"])]
        vectors = label_matrix(batch["label_vector"])
        masks = []
        for scores, vec in zip(self.scores(images), vectors):
            allowed = np.concatenate([[self.background], vec > 0])
            scores = np.where(allowed[:, None, None], scores, -1.0)
            masks.append(encode_mask(scores.argmax(0).astype(np.uint8)))
        return {"image_id": batch["image_id"], "split": batch["split"],
                "label_vector": vectors, "mask": batch["mask"],
                "pseudo_mask": np.array(masks, dtype=object)}


def write_masks(config, dataset_path: str, model_dir: str, out: str, background: bool
                ) -> None:
    """H's label-restricted predictions of the train split, as Parquet under `out`."""
    from ..actors import ActorResources, map_with_model
    from ..runtime import gpus_usable, write_parquet

    cfg = config.pct
    use_gpu = gpus_usable(cfg.gpus_per_actor > 0, config.ray.allow_cpu_fallback,
                          "pct.gpus_per_actor", probe_gpus=cfg.gpus_per_actor)
    res = ActorResources.of(cfg, "pct")
    if cfg.gpus_per_actor > 0 and not use_gpu:  # the CPU fallback: no GPU to ask Ray for
        res = ActorResources(cfg.num_actors or 1, cfg.cpus_per_actor, 0.0, "pct")
    ds = open_dataset(dataset_path, ["image_id", "split", "image", "label_vector", "mask"],
                      [config.segmenter.train_split], rows_per_block=cfg.predict_batch_size)
    ds = map_with_model(ds, RestrictedPredictor, {
        "model_dir": model_dir, "background": background, "scales": cfg.scales,
        "flip": cfg.flip, "threads": cfg.torch_threads or cfg.cpus_per_actor,
        "use_gpu": use_gpu, "max_side": cfg.max_image_side,
        "allow_cpu_fallback": config.ray.allow_cpu_fallback}, res, cfg.predict_batch_size,
        rows=split_rows(dataset_path, [config.segmenter.train_split]))
    write_parquet(ds, out, config.ray)


def score_masks(masks: str, labelled: list[str], info, batch_size: int) -> dict | None:
    """H's masks against ground truth on the train images with a mask that were not
    pixel-labelled (None when there is none)."""
    from ..evaluate import ConfusionMatrix, _masks_batch, _sums

    index = read_table(masks, ["image_id", "mask"])
    chosen = set(labelled)
    ids = [i for i, valid in zip(index.column("image_id").to_pylist(),
                                 index.column("mask").is_valid().to_pylist())
           if valid and i not in chosen]
    if not ids:
        return None
    n = info.num_classes + 1
    ds = open_dataset(masks, ["image_id", "mask", "pseudo_mask"], ids=ids, require=("mask",),
                      rows_per_block=batch_size)
    totals = _sums(ds.map_batches(_masks_batch, batch_size=batch_size, batch_format="numpy",
                                  fn_kwargs={"columns": ("pseudo_mask",), "n_labels": n}),
                   ("pseudo_mask",))
    out = ConfusionMatrix(n, totals["pseudo_mask"]).metrics(
        info.label_names, () if info.background else (0,))
    out["images"] = len(ids)
    return out


def run(config, ctx) -> dict:
    """Fit H and P, export both, and write H's label-restricted masks of the train split
    to `<step folder>/masks/`."""
    from ..models.deeplab import build_segmenter, save_segmenter

    info = ctx.dataset_info()
    labelled = labelled_ids(config, ctx.dataset_path)
    name = fit_name(ctx)
    train_root = storage.join(ctx.path, "ray_train")
    classifier_dir = ctx.input("classifier") if init_source(config) == "classifier" else None
    trainer = make_trainer(config, ctx.dataset_path, labelled, classifier_dir, name,
                           train_root)
    state = run_fit(trainer, "pct")
    model_cfg = segmenter_model_config(config)
    for net in NETS:
        model = build_segmenter(model_cfg, info.num_classes + 1, pretrained=False,
                                aspp_channels=config.segmenter.aspp_channels,
                                decoder_channels=config.segmenter.decoder_channels)
        model.load_state_dict(state[net])
        save_segmenter(model, model_cfg, storage.join(ctx.path, net), info.classes,
                       {"epochs": state["epoch"] + 1, "pct_net": net})
    remove_earlier_fits(train_root, name)
    storage.write_json_atomic(storage.join(ctx.path, "history.json"), state["history"])
    write_labelled(ctx.path, labelled)
    final = masks_folder(ctx.path)
    storage.clean_temps(ctx.path, MASKS)
    tmp = storage.temp_sibling(final)
    try:
        write_masks(config, ctx.dataset_path, storage.join(ctx.path, "hybrid"), tmp,
                    info.background)
    except BaseException:
        storage.remove(tmp)
        raise
    storage.publish(tmp, final)
    scored = score_masks(final, labelled, info, config.evaluate.batch_size)
    last = state["history"][-1]
    summary = {k: last[k] for k in ("loss_hybrid", "pseudo_miou", "val_miou",
                                    "pseudo_val_miou", "epoch") if k in last}
    summary["labelled_images"] = len(labelled)
    if scored is not None:
        summary["masks_miou"] = scored["miou"]
    ctx.write_metrics({**summary, "masks": scored, "history": state["history"]})
    return summary

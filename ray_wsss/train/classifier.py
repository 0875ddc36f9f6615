"""Stage `classifier`: fit the multi-label CAM classifier with Ray Train (DDP).

Ray Data decodes and augments the train split on CPU workers (random scale, crop, flip,
colour jitter; `data/transforms.py`) and streams shards to the training workers. Each
epoch ends with `ray.train.report` carrying the metrics (loss, val mAP) and a checkpoint
(model, optimizer, epoch); a worker that dies is restarted by `FailureConfig` and the
loop resumes from the latest checkpoint, and so does a rerun after the driver died,
because the Ray Train run name is derived from the stage's config hash.

The finished model is exported as `classifier/model.pt` + `model.json`. The fit's
plumbing (trainer, checkpoints, resume, export) is shared with the segmentation model:
`train/fit.py`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import storage
from ..config import ClassifierConfig, ModelConfig, RegularizersConfig, replace
from ..data.dataset import dataset_counts, open_dataset, read_info, read_table
from ..data.transforms import EvalTransform, TrainTransform
from ..errors import ConfigError, StageError
from .fit import (ValBatches, build_trainer, fit_name, lr_at, make_optimizer,
                  remove_earlier_fits, report_epoch, restore_checkpoint, run_fit, set_lr,
                  start_worker)


def _param_groups(model, cfg: ClassifierConfig) -> list[dict]:
    """Backbone at the base rate; the heads (classifier, co-attention) trained from
    scratch at `head_lr_multiplier` times it (IRN, Puzzle-CAM: 10x)."""
    head = list(model.classifier.parameters())
    if getattr(model, "co_attention", None) is not None:
        head += list(model.co_attention.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": backbone, "lr_scale": 1.0},
            {"params": head, "lr_scale": cfg.head_lr_multiplier}]


@dataclass(frozen=True)
class WorkerConfig:
    """What the workers need (frozen dataclasses pickle to Ray Train's workers)."""
    classifier: ClassifierConfig
    model: ModelConfig
    regularizers: RegularizersConfig
    num_classes: int
    num_train: int
    kur: bool
    has_val: bool
    prior_channels: int = 0           # the iterative loop's prior, extra input channels
    warm_start: str | None = None     # the previous round's classifier folder


@dataclass
class _Fit:
    """A worker's training state for one fit."""
    model: object            # the plain classifier (for validation and checkpoints)
    trainer: object          # TrainingModel wrapped by DDP: every loss of a step
    opt: object
    oc: object = None        # OC-CSE / P-NOC ordinary classifier
    oc_train: object = None  # the OC wrapped by DDP (P-NOC)
    oc_opt: object = None
    start_epoch: int = 0
    history: list = field(default_factory=list)
    restarts: int = 0


def _setup(lc: WorkerConfig, reg: RegularizersConfig, device) -> _Fit:
    """Build the model (and OC), restore the last checkpoint, wrap them for DDP."""
    import ray.train.torch

    from ..models.classifier import (build_classifier, load_classifier, warm_start,
                                     zero_extra_inputs)
    from .regularizers import TrainingModel

    cfg = lc.classifier
    model = build_classifier(lc.model, lc.num_classes, 3 + lc.prior_channels, kur=lc.kur,
                             mcis=reg.mcis.enabled)
    if lc.prior_channels:
        # round t starts as the RGB classifier would: the prior's weights from zero
        zero_extra_inputs(model)
        if lc.warm_start:
            warm_start(model, load_classifier(lc.warm_start))
    opt = make_optimizer(_param_groups(model, cfg), cfg)
    oc = oc_opt = None
    if reg.oc_cse.weight > 0:
        # the ordinary classifier: BN statistics stay fixed (eval mode) even when P-NOC
        # trains its weights
        oc = load_classifier(reg.oc_cse.oc_model).eval()
        for p in oc.parameters():
            p.requires_grad_(reg.pnoc.enabled)
        if reg.pnoc.enabled:
            oc_opt = make_optimizer(_param_groups(oc, cfg), cfg, reg.pnoc.oc_lr_scale)
    fit = _Fit(model=model, trainer=None, opt=opt, oc=oc, oc_opt=oc_opt)
    state = restore_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if oc_opt is not None:
            oc.load_state_dict(state["oc"])
            oc_opt.load_state_dict(state["oc_optimizer"])
        fit.start_epoch, fit.history = state["epoch"] + 1, state["history"]
        fit.restarts = state.get("restarts", 0) + 1
        print(f"[classifier] resuming from the checkpoint of epoch {state['epoch'] + 1} "
              f"(restart {fit.restarts})")
    regularized = reg.puzzle.alpha > 0 or reg.oc_cse.weight > 0 or reg.mcis.enabled
    fit.trainer = ray.train.torch.prepare_model(
        TrainingModel(model, reg),
        # e.g. the MCIS gate before the contrastive loss starts: unused in some steps
        parallel_strategy_kwargs={"find_unused_parameters": True} if regularized else None)
    fit.model = model.to(device)
    if oc is not None:
        fit.oc = oc.to(device)
        if oc_opt is not None:
            fit.oc_train = ray.train.torch.prepare_model(fit.oc, move_to_device=False)
    return fit


def _oc_step(fit: _Fit, reg, images, parts, labels, lr: float, progress: float) -> float:
    """P-NOC: the adversarial OC's own step on what the detached CAMs left."""
    from .regularizers import pnoc_oc_loss, ramp

    set_lr(fit.oc_opt, lr * reg.pnoc.oc_lr_scale)
    weight = ramp(progress, 0.0, reg.pnoc.oc_weight)
    loss = weight * pnoc_oc_loss(fit.oc_train, images, parts["maps"], parts["chosen"],
                                 labels, fit.model.mean, reg.pnoc.mask_threshold)
    fit.oc_opt.zero_grad(set_to_none=True)
    loss.backward()
    fit.oc_opt.step()
    return loss.item()


def _train_epoch(fit: _Fit, lc: WorkerConfig, batches, epoch: int, schedule, pairs,
                 generator) -> dict:
    """One pass over the worker's shard; returns the epoch's training metrics."""
    cfg, reg = lc.classifier, lc.regularizers
    total, warmup, step = schedule["total"], schedule["warmup"], schedule["first_step"]
    fit.trainer.train()
    t0, waited, losses, oc_losses, sums = time.time(), 0.0, [], [], {}
    while True:
        t_wait = time.time()
        batch = next(batches, None)
        waited += time.time() - t_wait
        if batch is None:
            break
        lr = lr_at(step, total, cfg.lr, warmup)
        set_lr(fit.opt, lr)
        images = batch["image"].permute(0, 3, 1, 2).float()
        labels = batch["label_vector"]
        partner = partner_labels = None
        if pairs is not None:
            partner, partner_labels = pairs.draw(batch["image"], labels, epoch, step)
            partner = partner.permute(0, 3, 1, 2).float()
        loss, parts = fit.trainer(images, labels, progress=step / total, epoch=epoch + 1,
                                  partner=partner, partner_labels=partner_labels, oc=fit.oc,
                                  generator=generator)
        fit.opt.zero_grad(set_to_none=True)
        loss.backward()
        fit.opt.step()
        if fit.oc_opt is not None:
            oc_losses.append(_oc_step(fit, reg, images, parts, labels, lr, step / total))
        losses.append(loss.item())
        for k, v in parts.items():
            if k not in ("maps", "chosen"):
                sums[k] = sums.get(k, 0.0) + float(v)
        step += 1
    metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else math.nan,
               "lr": lr_at(step, total, cfg.lr, warmup), "steps": len(losses),
               "epoch_seconds": round(time.time() - t0, 2),
               "data_wait_seconds": round(waited, 2)}
    metrics.update({f"loss_{k}": v / max(len(losses), 1) for k, v in sums.items()})
    if oc_losses:
        metrics["loss_oc_adversary"] = float(np.mean(oc_losses))
    return metrics


def train_loop(lc: WorkerConfig) -> None:
    """Runs on every Ray Train worker: set up (or resume), then an epoch at a time,
    each ended by a report with a checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    from ..evaluate import average_precision
    from .pairs import PairPool

    cfg, reg = lc.classifier, lc.regularizers
    world, rank, device = start_worker("classifier", cfg)
    fit = _setup(lc, reg, device)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, lc.num_train // (per_worker * world))
    schedule = {"total": steps_per_epoch * cfg.epochs,
                "warmup": int(cfg.warmup_epochs * steps_per_epoch)}
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = ValBatches(ray.train.get_dataset_shard("val"), per_worker, device,
                             {"image": torch.uint8, "label_vector": torch.float32}) \
        if rank == 0 and lc.has_val else None
    pairs = (PairPool(reg.mcis.pair_pool, cfg.seed, rank, reg.mcis.pair_per_class)
             if reg.mcis.enabled else None)
    for epoch in range(fit.start_epoch, cfg.epochs):
        batches = iter(train_shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
            dtypes={"image": torch.uint8, "label_vector": torch.float32}, device=device))
        metrics = _train_epoch(fit, lc, batches, epoch,
                               {**schedule, "first_step": epoch * steps_per_epoch},
                               pairs, generator)
        metrics.update(restarts=fit.restarts, workers=world)
        if val_batches is not None:
            metrics.update(_validate(fit.model, val_batches, average_precision))
        fit.history.append(metrics)
        state = {"model": fit.model.state_dict(), "optimizer": fit.opt.state_dict(),
                 "epoch": epoch, "history": fit.history, "restarts": fit.restarts}
        if fit.oc_opt is not None:
            state.update(oc=fit.oc.state_dict(), oc_optimizer=fit.oc_opt.state_dict())
        report_epoch(metrics, state)


def _validate(model, batches, average_precision) -> dict:
    import torch

    model.eval()
    scores, targets, losses = [], [], []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["image"].permute(0, 3, 1, 2).float())
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch["label_vector"]).item())
            scores.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(batch["label_vector"].cpu().numpy())
    if not scores:
        return {}
    ap = average_precision(np.concatenate(scores), np.concatenate(targets))
    return {"val_loss": float(np.mean(losses)), "val_map": float(np.nanmean(ap)) * 100}


def check_regularizers(config) -> None:
    reg, cfg = config.regularizers, config.classifier
    stride = 2 * config.model.output_stride
    if reg.puzzle.alpha > 0 and cfg.crop_size % stride:
        raise ConfigError(f"regularizers.puzzle: classifier.crop_size ({cfg.crop_size}) must "
                          f"be a multiple of {stride} so that 2x2 tiles map onto the full "
                          "image's feature grid")
    if reg.oc_cse.weight > 0:
        if not reg.oc_cse.oc_model:
            raise ConfigError("regularizers.oc_cse.oc_model must name the classifier folder "
                              "of an earlier run (the ordinary classifier)")
        path = reg.oc_cse.oc_model
        if not storage.exists(storage.join(path, "model.json")):
            raise ConfigError(f"regularizers.oc_cse.oc_model: no classifier (model.json) in "
                              f"{path}")
    if reg.pnoc.enabled and (reg.oc_cse.weight <= 0 or reg.puzzle.alpha <= 0):
        raise ConfigError("regularizers.pnoc needs regularizers.puzzle.alpha > 0 and "
                          "regularizers.oc_cse.weight > 0 (P-NOC = Puzzle + OC-CSE + an "
                          "adversarial OC)")


def _worker_regularizers(reg: RegularizersConfig) -> RegularizersConfig:
    """The regularizers' config for the workers, whose working directory is not the
    driver's: a relative oc_model path becomes absolute (URIs stay as they are)."""
    if not reg.oc_cse.oc_model:
        return reg
    return replace(reg, **{"oc_cse.oc_model": storage.resolve(reg.oc_cse.oc_model)})


def make_trainer(config, dataset_path: str, name: str, storage_path: str, callbacks=None,
                 prior: str | None = None, previous: str | None = None):
    """The TorchTrainer of the classifier fit: Ray Data pipelines, scaling, checkpoints.

    `name` + `storage_path` identify the Ray Train run: the same pair again resumes it.
    `prior`: the folder of the loop's prior (round t >= 2), joined to every image as
    extra channels; `previous`: the previous round's classifier, for loop.warm_start."""
    from ..data.join import with_columns
    from .prior import prior_channels

    from ..models.classifier import build_classifier

    cfg: ClassifierConfig = config.classifier
    info = read_info(dataset_path)
    counts = dataset_counts(dataset_path)
    num_train = counts.get(cfg.train_split, 0)
    if num_train < cfg.batch_size:
        raise StageError(f"classifier: split {cfg.train_split!r} has {num_train} images, fewer "
                         f"than one batch ({cfg.batch_size})")
    has_val = bool(cfg.val_split) and counts.get(cfg.val_split, 0) > 0

    channels = prior_channels(config, info.num_classes) if prior else 0
    train_ds = open_dataset(dataset_path, ["image_id", "image", "label_vector"],
                            [cfg.train_split], rows_per_block=64)
    if prior:
        train_ds = with_columns(train_ds, prior, ["prior"])
    if cfg.cache_images or prior:
        # Reading and filtering the files again every epoch costs seconds of pipeline
        # start-up; the encoded images are small, the augmentation still runs per epoch.
        train_ds = train_ds.materialize()
    train_ds = train_ds.map_batches(
        TrainTransform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter,
                       prior_channels=channels),
        batch_format="numpy", batch_size=16)
    datasets = {"train": train_ds}
    if has_val:
        val = open_dataset(dataset_path, ["image_id", "image", "label_vector"],
                           [cfg.val_split])
        if prior:  # materialised: no lookup actor inside the fit's pipeline
            val = with_columns(val, prior, ["prior"], missing_ok=True).materialize()
        datasets["val"] = val.map_batches(EvalTransform(cfg.crop_size, channels),
                                          batch_format="numpy", batch_size=16)
    # Fail on a bad backbone name, a missing weight file or regularizer settings here, not
    # inside the workers.
    build_classifier(config.model, info.num_classes)
    check_regularizers(config)
    loop_config = WorkerConfig(classifier=cfg, model=config.model,
                               regularizers=_worker_regularizers(config.regularizers),
                               num_classes=info.num_classes, num_train=num_train,
                               kur=config.head.kur, has_val=has_val, prior_channels=channels,
                               warm_start=previous if config.loop.warm_start else None)
    return build_trainer(train_loop, loop_config, cfg, name, storage_path, datasets,
                         callbacks=callbacks, where="classifier",
                         allow_cpu_fallback=config.ray.allow_cpu_fallback)


def all_positive(dataset_path: str, split: str | None) -> bool:
    """Every image of `split` holds every class: an mAP there measures nothing."""
    if not split:
        return False
    table = read_table(dataset_path, ["label_vector"], [split])
    if table.num_rows == 0:
        return False
    return bool(np.asarray(table.column("label_vector").to_pylist()).all())


def run(config, ctx) -> dict:
    """Fit the classifier and export it to `<step folder>/model.{pt,json}`."""
    from ..models.classifier import build_classifier, save_classifier

    info = ctx.dataset_info()
    stage_dir = ctx.path
    # A rerun of an interrupted fit has the same attempt id, so Ray Train finds the run
    # and resumes from its last checkpoint; a recomputation gets a fresh name.
    name = fit_name(ctx)
    train_root = storage.join(stage_dir, "ray_train")
    prior = ctx.input("prior") if ctx.has_input("prior") else None
    previous = None
    if prior is not None:
        from ..graph import Step
        previous = ctx.run.step_path(Step("classifier", ctx.round - 1))
        if config.regularizers.oc_cse.weight > 0 or config.regularizers.mcis.enabled:
            raise ConfigError("loop.rounds > 1 with OC-CSE / P-NOC or MCIS is not supported "
                              "(their second image streams carry no prior)")
    state = run_fit(make_trainer(config, ctx.dataset_path, name, train_root, prior=prior,
                                 previous=previous), "classifier")
    from .prior import prior_channels
    channels = prior_channels(config, info.num_classes) if prior else 0
    model = build_classifier(config.model, info.num_classes, 3 + channels, pretrained=False,
                             kur=config.head.kur, mcis=config.regularizers.mcis.enabled)
    model.load_state_dict(state["model"])
    save_classifier(model, config.model, stage_dir, info.classes,
                    {"epochs": state["epoch"] + 1, "prior_channels": channels,
                     "round": ctx.round})
    remove_earlier_fits(train_root, name)
    storage.write_json_atomic(storage.join(stage_dir, "history.json"), state["history"])
    last = state["history"][-1]
    summary = {k: last[k] for k in ("loss", "val_map", "epoch") if k in last}
    extra = {"val_all_positive": True} \
        if all_positive(ctx.dataset_path, config.classifier.val_split) else {}
    ctx.write_metrics({**summary, **extra, "history": state["history"]})
    return summary

"""Stage `classifier`: fit the multi-label CAM classifier with Ray Train (DDP).

Ray Data decodes and augments the train split on CPU workers (random scale, crop, flip,
colour jitter; `data/transforms.py`) and streams shards to the training workers. Each
epoch ends with `ray.train.report` carrying the metrics (loss, val mAP) and a checkpoint
(model, optimizer, epoch); a worker that dies is restarted by `FailureConfig` and the
loop resumes from the latest checkpoint, and so does a rerun after the driver died,
because the Ray Train run name is derived from the stage's config hash.

The finished model is exported as `classifier/model.pt` + `model.json`.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np

from .. import storage
from ..config import ClassifierConfig, ModelConfig, to_dict
from ..data.dataset import dataset_counts, open_dataset
from ..data.transforms import EvalTransform, TrainTransform
from ..errors import ConfigError, StageError
from ..run import Run
from ..runtime import project_error


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then polynomial decay (power 0.9) to zero at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    return base * (1 - min(step, total) / max(total, 1)) ** 0.9


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


def _optimizer(groups, cfg: ClassifierConfig, lr_scale: float = 1.0):
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr * lr_scale, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from ..config import RegularizersConfig, from_dict
    from ..evaluate import average_precision
    from ..models.classifier import build_classifier, load_classifier
    from .pairs import PairPool
    from .regularizers import TrainingModel, pnoc_oc_loss, ramp

    cfg = ClassifierConfig(**loop_config["classifier"])
    model_cfg = ModelConfig(**loop_config["model"])
    reg = from_dict(RegularizersConfig, loop_config["regularizers"])
    torch.set_num_threads(max(1, loop_config["threads"]))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()

    model = build_classifier(model_cfg, loop_config["num_classes"], kur=loop_config["kur"],
                             mcis=reg.mcis.enabled)
    opt = _optimizer(_param_groups(model, cfg), cfg)
    oc = oc_opt = None
    if reg.oc_cse.weight > 0:
        # the ordinary classifier: BN statistics stay fixed (eval mode) even when P-NOC
        # trains its weights
        oc = load_classifier(reg.oc_cse.oc_model).eval()
        for p in oc.parameters():
            p.requires_grad_(reg.pnoc.enabled)
        if reg.pnoc.enabled:
            oc_opt = _optimizer(_param_groups(oc, cfg), cfg, reg.pnoc.oc_lr_scale)
    start_epoch, history, restarts = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu",
                               weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if oc_opt is not None:
            oc.load_state_dict(state["oc"])
            oc_opt.load_state_dict(state["oc_optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        restarts = state.get("restarts", 0) + 1
        print(f"[classifier] resuming from the checkpoint of epoch {state['epoch'] + 1} "
              f"(restart {restarts})")
    regularized = reg.puzzle.alpha > 0 or reg.oc_cse.weight > 0 or reg.mcis.enabled
    trainer = ray.train.torch.prepare_model(
        TrainingModel(model, reg),
        # e.g. the MCIS gate before the contrastive loss starts: unused in some steps
        parallel_strategy_kwargs={"find_unused_parameters": True} if regularized else None)
    device = ray.train.torch.get_device()
    plain = model.to(device)
    oc_train = None
    if oc is not None:
        oc = oc.to(device)
        if oc_opt is not None:
            oc_train = ray.train.torch.prepare_model(oc, move_to_device=False)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, loop_config["num_train"] // (per_worker * world))
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = _ValBatches(ray.train.get_dataset_shard("val") if loop_config["has_val"]
                              else None, per_worker, device)
    dtypes = {"image": torch.uint8, "label_vector": torch.float32}
    pairs = (PairPool(reg.mcis.pair_pool, cfg.seed, rank, reg.mcis.pair_per_class)
             if reg.mcis.enabled else None)

    for epoch in range(start_epoch, cfg.epochs):
        trainer.train()
        oc_steps = []
        t0, losses, step, waited = time.time(), [], epoch * steps_per_epoch, 0.0
        sums: dict[str, float] = {}
        batches = iter(train_shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=4 * per_worker,
            dtypes=dtypes, device=device))
        while True:
            t_wait = time.time()
            batch = next(batches, None)
            waited += time.time() - t_wait
            if batch is None:
                break
            lr = lr_at(step, total, cfg.lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            images = batch["image"].permute(0, 3, 1, 2).float()
            labels = batch["label_vector"]
            partner = partner_labels = None
            if pairs is not None:
                partner, partner_labels = pairs.draw(batch["image"], labels, epoch, step)
                partner = partner.permute(0, 3, 1, 2).float()
            loss, parts = trainer(
                images, labels, progress=step / total, epoch=epoch + 1, partner=partner,
                partner_labels=partner_labels, oc=oc, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if oc_opt is not None:
                # P-NOC: the adversarial OC's own step on what the detached CAMs left
                for g in oc_opt.param_groups:
                    g["lr"] = lr * reg.pnoc.oc_lr_scale * g["lr_scale"]
                ow = ramp(step / total, 0.0, reg.pnoc.oc_weight)
                oc_loss = ow * pnoc_oc_loss(oc_train, images, parts["maps"], parts["chosen"],
                                            labels, plain.mean, reg.pnoc.mask_threshold)
                oc_opt.zero_grad(set_to_none=True)
                oc_loss.backward()
                oc_opt.step()
                oc_steps.append(oc_loss.item())
            losses.append(loss.item())
            for k, v in parts.items():
                if k not in ("maps", "chosen"):
                    sums[k] = sums.get(k, 0.0) + float(v)
            step += 1
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else math.nan,
                   "lr": lr_at(step, total, cfg.lr, warmup), "steps": len(losses),
                   "epoch_seconds": round(time.time() - t0, 2),
                   "data_wait_seconds": round(waited, 2), "restarts": restarts,
                   "workers": world}
        metrics.update({f"loss_{k}": v / max(len(losses), 1) for k, v in sums.items()})
        if oc_steps:
            metrics["loss_oc_adversary"] = float(np.mean(oc_steps))
        if rank == 0 and loop_config["has_val"]:
            metrics.update(_validate(plain, val_batches, average_precision))
        history.append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                state = {"model": plain.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": epoch, "history": history, "restarts": restarts}
                if oc_opt is not None:
                    state.update(oc=oc.state_dict(), oc_optimizer=oc_opt.state_dict())
                torch.save(state, os.path.join(d, "state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


class _ValBatches:
    """The validation batches: streamed from Ray Data, and kept in memory after the first
    pass when small (decoded val sets of up to `cache_bytes`), so later epochs skip the
    decode."""

    def __init__(self, shard, batch_size: int, device, cache_bytes: int = 512 * 2**20):
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.cache_bytes = cache_bytes
        self.cache: list | None = None

    def __iter__(self):
        import torch

        if self.cache is not None:
            yield from self.cache
            return
        kept, size = [], 0
        for batch in self.shard.iter_torch_batches(
                batch_size=self.batch_size, device=self.device,
                dtypes={"image": torch.uint8, "label_vector": torch.float32}):
            if kept is not None:
                size += batch["image"].numel()
                kept = kept + [batch] if size <= self.cache_bytes else None
            yield batch
        self.cache = kept


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


def _worker_regularizers(reg) -> dict:
    """The regularizers' config for the workers, whose working directory is not the
    driver's: a relative oc_model path becomes absolute (URIs stay as they are)."""
    out = to_dict(reg)
    if out["oc_cse"]["oc_model"]:
        out["oc_cse"]["oc_model"] = storage.resolve(out["oc_cse"]["oc_model"])
    return out


def make_trainer(config, run: Run, name: str, storage_path: str, callbacks=None):
    """The TorchTrainer of the classifier fit: Ray Data pipelines, scaling, checkpoints.

    `name` + `storage_path` identify the Ray Train run: the same pair again resumes it."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..models.classifier import build_classifier

    cfg: ClassifierConfig = config.classifier
    info = run.dataset_info()
    counts = dataset_counts(run.dataset_path)
    num_train = counts.get(cfg.train_split, 0)
    if num_train < cfg.batch_size:
        raise StageError(f"classifier: split {cfg.train_split!r} has {num_train} images, fewer "
                         f"than one batch ({cfg.batch_size})")
    has_val = bool(cfg.val_split) and counts.get(cfg.val_split, 0) > 0

    train_ds = open_dataset(run.dataset_path, ["image_id", "image", "label_vector"],
                            [cfg.train_split], rows_per_block=64)
    if cfg.cache_images:
        # Reading and filtering the files again every epoch costs seconds of pipeline
        # start-up; the encoded images are small, the augmentation still runs per epoch.
        train_ds = train_ds.materialize()
    train_ds = train_ds.map_batches(
        TrainTransform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter),
        batch_format="numpy", batch_size=16)
    datasets = {"train": train_ds}
    if has_val:
        datasets["val"] = open_dataset(run.dataset_path, ["image", "label_vector"],
                                       [cfg.val_split]).map_batches(
            EvalTransform(cfg.crop_size), batch_format="numpy", batch_size=16)
    # Fail on a bad backbone name, a missing weight file or regularizer settings here, not
    # inside the workers.
    build_classifier(config.model, info.num_classes)
    check_regularizers(config)
    return TorchTrainer(
        train_loop,
        train_loop_config={"classifier": to_dict(cfg), "model": to_dict(config.model),
                           "num_classes": info.num_classes, "num_train": num_train,
                           "kur": config.head.kur, "has_val": has_val,
                           "regularizers": _worker_regularizers(config.regularizers),
                           "threads": cfg.torch_threads or cfg.cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker,
                                  **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def run(config, run: Run) -> dict:
    """Fit the classifier and export it to `<run>/classifier/model.{pt,json}`."""
    import torch

    from ..models.classifier import build_classifier, save_classifier

    info = run.dataset_info()
    stage_dir = run.path("classifier")
    # A rerun of an interrupted fit has the same attempt id, so Ray Train finds the run
    # and resumes from its last checkpoint; a recomputation gets a fresh name.
    name = f"fit-{run.current_hash('classifier')}-{run.attempt('classifier')}"
    trainer = make_trainer(config, run, name, storage.join(stage_dir, "ray_train"))
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in several types
        raise project_error(exc) or StageError(f"classifier training failed: {exc}") from exc
    if result.checkpoint is None:
        raise StageError("classifier training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    model = build_classifier(config.model, info.num_classes, pretrained=False,
                             kur=config.head.kur, mcis=config.regularizers.mcis.enabled)
    model.load_state_dict(state["model"])
    save_classifier(model, config.model, stage_dir, info.classes,
                    {"epochs": state["epoch"] + 1})
    train_root = storage.join(stage_dir, "ray_train")
    for old in storage.listdir(train_root):  # checkpoints of earlier computations
        if old.startswith("fit-") and old != name:
            storage.remove(storage.join(train_root, old))
    storage.write_json_atomic(storage.join(stage_dir, "history.json"), state["history"])
    last = state["history"][-1]
    summary = {k: last[k] for k in ("loss", "val_map", "epoch") if k in last}
    run.write_metrics("classifier", {**summary, "history": state["history"]})
    return summary

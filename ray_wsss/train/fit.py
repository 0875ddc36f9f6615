"""A Ray Train fit, the parts every trainer shares (classifier, segmentation model, and
the fits that follow): the learning-rate schedule, the optimizer, restoring and saving
the per-epoch checkpoint on the workers, the `TorchTrainer` on the driver, and turning
the final checkpoint into a state dict.

Worker side (inside a `train_loop_per_worker`):

    state = restore_checkpoint()                  # None on a fresh start
    ...
    report_epoch(metrics, {"model": ..., "optimizer": ..., "epoch": e, "history": h})

Driver side:

    trainer = build_trainer(loop, loop_config, fit_cfg, name, storage_path, datasets)
    state = run_fit(trainer, "segmenter")          # the last checkpoint's state dict

A fit's Ray Train run name is stable for one computation of a step (its config hash and
attempt id), so a rerun after a crash finds the run and resumes from its last
checkpoint (Ray Train V2 has no `Trainer.restore`: the same name and storage path is
the resume).

`num_workers: 0` runs the fit in Ray Train's local mode: the loop runs in the driver
process (no worker actors, no process group: a debugger and print work as in a script,
and a small fit starts in about 5 s instead of about 20), Ray Data still feeds it, and
nothing is checkpointed on the storage path: a fit killed half way starts over (the
step as a whole still resumes: finished steps are skipped). A Tune trial cannot report
from it (`ray-wsss sweep classifier` refuses it).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from .. import storage
from ..errors import StageError


def lr_at(step: int, total: int, base: float, warmup: int, power: float = 0.9) -> float:
    """Linear warm-up, then polynomial decay (power 0.9) to zero at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    return base * (1 - min(step, total) / max(total, 1)) ** power


def set_lr(optimizer, lr: float) -> None:
    """Every group at `lr` times its `lr_scale` (backbone 1, heads trained from scratch
    10, as IRN, Puzzle-CAM and DeepLab do)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def make_optimizer(groups, cfg, lr_scale: float = 1.0):
    """SGD with real momentum (`cfg.momentum`) and weight decay, or AdamW.

    IRN's and Puzzle-CAM's PolyOptimizer passes weight decay where torch's SGD expects
    momentum, which leaves it at about 0; we keep torch's meaning of both (momentum 0.9
    as DeepLab trains), which converges faster on the short CPU budgets here."""
    import torch

    if getattr(cfg, "optimizer", "sgd") == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr * lr_scale, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay)


def restore_checkpoint() -> dict | None:
    """The state dict of the latest checkpoint of this fit (worker side), or None."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)


def resume(where: str, parts: dict) -> tuple[int, list, int]:
    """Load this fit's latest checkpoint (worker side) into `parts`, {key in the saved
    state: a module or optimizer}; returns (the first epoch to train, the history so far,
    the restart count), (0, [], 0) on a fresh start."""
    state = restore_checkpoint()
    if state is None:
        return 0, [], 0
    for key, obj in parts.items():
        obj.load_state_dict(state[key])
    start, restarts = state["epoch"] + 1, state.get("restarts", 0) + 1
    print(f"[{where}] resuming from the checkpoint of epoch {start} (restart {restarts})")
    return start, state["history"], restarts


def start_worker(where: str, cfg) -> tuple[int, int, object]:
    """The prologue of every fit's worker loop: torch threads (`cfg.torch_threads`, else
    `cfg.cpus_per_worker`) and seed (`cfg.seed`); returns (world size, rank, device)."""
    import ray.train
    import torch

    torch.set_num_threads(max(1, cfg.torch_threads or cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    return ctx.get_world_size(), ctx.get_world_rank(), worker_device(where)


def worker_device(where: str):
    """This Ray Train worker's torch device, announced once per worker (rank, device and
    the process group's backend) so a log shows where a fit really ran."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    print(f"[{where}] worker {ctx.get_world_rank()}/{ctx.get_world_size()} on {device} "
          f"(process group: {backend})")
    return device


class ValBatches:
    """A fit's validation batches (worker side): streamed from the Ray Data shard on the
    first pass, and kept in memory when small (decoded tensors of up to `cache_bytes`),
    so later epochs skip the pipeline's start-up and the decode (about 2 s an epoch on
    a small CPU machine for a few dozen images). `dtypes`: the columns to read and
    their torch dtypes. Iterable any number of times."""

    def __init__(self, shard, batch_size: int, device, dtypes: dict,
                 cache_bytes: int = 512 * 2**20):
        self.shard, self.batch_size, self.device, self.dtypes = shard, batch_size, device, dtypes
        self.cache_bytes = cache_bytes
        self.cache: list | None = None

    def __iter__(self):
        if self.cache is not None:
            yield from self.cache
            return
        kept, size = [], 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size,
                                                   device=self.device, dtypes=self.dtypes):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in batch.values()
                            if hasattr(t, "numel"))
                if size <= self.cache_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.cache = kept


_LOCAL_CHECKPOINT: dict = {}   # local mode: the folder of the fit's last checkpoint


def in_local_mode() -> bool:
    """True inside a fit that Ray Train runs in local mode (`num_workers: 0`, in the
    driver process)."""
    import ray.train
    from ray.train.v2.api.context import LocalTrainContext

    return isinstance(ray.train.get_context(), LocalTrainContext)


def report_epoch(metrics: dict, state: dict) -> None:
    """End an epoch on every worker: rank 0 saves `state` as the checkpoint, the
    others report their metrics only (Ray Train keeps rank 0's)."""
    import ray.train
    import torch

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    if in_local_mode():
        # local mode keeps the Checkpoint object, not a copy: its folder must outlive
        # this call (run_fit removes it); the previous epoch's is dropped
        previous = _LOCAL_CHECKPOINT.pop("dir", None)
        d = tempfile.mkdtemp(prefix="ray-wsss-local-fit-")
        torch.save(state, os.path.join(d, "state.pt"))
        _LOCAL_CHECKPOINT["dir"] = d
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if previous:
            shutil.rmtree(previous, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "state.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def build_trainer(loop, loop_config, fit_cfg, name: str, storage_path: str,
                  datasets: dict, split: tuple[str, ...] = ("train",), callbacks=None,
                  where: str = "fit", allow_cpu_fallback: bool = False):
    """The TorchTrainer of a fit. `fit_cfg` carries the resources (num_workers, use_gpu,
    cpus_per_worker, max_failures); `name` + `storage_path` identify the Ray Train run,
    and the same pair again resumes it. Refused here, before anything starts: a fit
    whose workers would leave no CPU to Ray Data (which decodes and augments its
    batches: it would hang), and GPUs asked for where torch cannot use CUDA (unless
    `ray.allow_cpu_fallback`, which then fits on the CPU)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..runtime import check_train_resources, gpus_usable

    check_train_resources(fit_cfg.num_workers, fit_cfg.cpus_per_worker, fit_cfg.use_gpu,
                          where)
    use_gpu = gpus_usable(fit_cfg.use_gpu, allow_cpu_fallback, f"{where}.use_gpu")
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=fit_cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": fit_cfg.cpus_per_worker,
                                  **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=fit_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(split)),
    )


def run_fit(trainer, what: str) -> dict:
    """Run the fit; returns the state dict of its last checkpoint."""
    import torch

    from ..runtime import project_error

    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in several types
        raise project_error(exc) or StageError(f"{what} training failed: {exc}") from exc
    if result.checkpoint is None:
        raise StageError(f"{what} training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu",
                           weights_only=True)
    if result.path is None:  # local mode: the checkpoint folder is report_epoch's own
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
        _LOCAL_CHECKPOINT.pop("dir", None)
    return state


def fit_name(ctx) -> str:
    """The Ray Train run name of a step's fit: stable for one computation of the step
    (an interrupted one resumes it), new when the step is recomputed."""
    return f"fit-{ctx.hash}-{ctx.attempt}"


def remove_earlier_fits(train_root: str, keep: str) -> None:
    """Checkpoints of earlier computations of this step. Runs only under the run
    directory's lock (pipeline.run_pipeline / run_stage), so no other live run can own
    one of these folders."""
    for old in storage.listdir(train_root):
        if old.startswith("fit-") and old != keep:
            storage.remove(storage.join(train_root, old))

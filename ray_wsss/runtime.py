"""Connecting to Ray: a local instance on a laptop, the cluster under `ray job submit`;
and the checks that what a stage asks of it (CPUs, GPUs) can be used."""
from __future__ import annotations

import copy
import os
import re
import sys

from .config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process.

    `ray job submit` sets RAY_ADDRESS, so a job joins its cluster; otherwise `address`
    from the config, otherwise a new local instance (token authentication stays as Ray
    sets it up: on by default since 2.59).
    """
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            local_environment(cfg)
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard)
    configure_data(cfg)


def local_environment(cfg: RayConfig) -> None:
    """Settings for a local instance, made before it starts (its workers inherit this
    process's environment). Ray Data provisions 32 footer-reading actors for every
    Parquet read and kills them after it: on a laptop each is a ~100 MB process that
    takes a fraction of a second of CPU to start, and how many of them start grows with
    the number of files read. One reads a local dataset's footers as fast (128 IO
    threads of its own)."""
    readers = cfg.local_footer_readers or 1
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, readers)))


def write_parquet(ds, path: str, cfg: RayConfig) -> None:
    """Write a stage's dataset to `path` in files of at least `cfg.output_file_mb`
    (0: a file per block)."""
    if cfg.output_file_mb > 0:
        ds.write_parquet(path, min_bytes_per_file=cfg.output_file_mb * 2**20)
    else:
        ds.write_parquet(path)


def configure_data(cfg: RayConfig) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.enable_operator_progress_bars = cfg.progress_bars
    # Stage outputs are read back in whatever order; keep Ray Data's default streaming.
    ctx.execution_options.preserve_order = False
    # A DataError raised in a UDF (a corrupt image in row X) must reach the driver as
    # itself: wrapped in Ray Data's UserCodeException its type and cause are lost in
    # serialisation, and the user would see a remote traceback instead of one line.
    ctx.raise_original_map_exception = True


def close_stale_progress_bars() -> None:
    """Close the progress bars that processes which are gone left open on the driver.

    Ray Train's dataset-split coordinator is torn down with the trainer before it
    closes its Ray Data bars, and the driver's bar manager (`ray.experimental.tqdm_ray`)
    would redraw those finished bars under every line printed afterwards, the final
    table included. Called between stages, when no Ray Data execution is running.

    It edits Ray's private bar manager, whose shape may change in any Ray release: it
    must never fail or mask a stage whose work is done, so any error here is swallowed
    (the cost of a failure is a stale bar on the screen)."""
    try:
        _close_stale_bars()
    except Exception:  # noqa: BLE001 - cosmetic; see above
        pass


def _close_stale_bars() -> None:
    from ray.experimental import tqdm_ray

    manager = getattr(tqdm_ray, "_manager", None)
    if manager is None:
        return
    with manager.lock:
        for key, group in list(manager.bar_groups.items()):
            if group.pid == manager.pid:
                continue
            for bar in group.bars_by_uuid.values():
                bar.bar.leave = False
                bar.close()
            group.bars_by_uuid.clear()
            del manager.bar_groups[key]


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# The config key that lets a stage asked for GPUs run on the CPU instead.
CPU_FALLBACK_KEY = "ray.allow_cpu_fallback"


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA device in this process, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this torch build has no CUDA (torch {torch.__version__}, "
                "torch.version.cuda is None): install a CUDA build of torch on the GPU nodes")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return (f"no GPU is visible to this process (CUDA_VISIBLE_DEVICES={visible!r}: "
                "Ray gave it no GPU)")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device "
            f"(torch.cuda.device_count() is {torch.cuda.device_count()}, "
            f"CUDA_VISIBLE_DEVICES={visible!r}): no GPU or no working driver on this node")


def torch_device(use_gpu: bool, allow_cpu_fallback: bool, where: str):
    """The torch device of a stage's worker: CUDA when `use_gpu`, the CPU otherwise.

    A stage asked for GPUs that cannot use one fails with a ConfigError naming `where`
    (the stage and key that asked, e.g. "cams.gpus_per_actor=1"), the reason and the key
    that allows the fallback, unless `allow_cpu_fallback`: then it prints a warning and
    runs on the CPU. A user paying for GPU nodes learns at once that they are not used.
    """
    import torch

    if not use_gpu:
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda")
    _no_gpu(problem, allow_cpu_fallback, where)
    return torch.device("cpu")


def _no_gpu(problem: str, allow_cpu_fallback: bool, where: str) -> None:
    """Refuse (ConfigError) or, when the fallback is allowed, warn that GPUs asked for by
    `where` cannot be used because of `problem`."""
    if not allow_cpu_fallback:
        from .errors import ConfigError
        raise ConfigError(f"{where}: GPUs were requested but {problem}; set "
                          f"{CPU_FALLBACK_KEY}: true to run on the CPU instead")
    print(f"[ray-wsss] warning: {where}: GPUs were requested but {problem}; running on the "
          f"CPU ({CPU_FALLBACK_KEY} is true)", file=sys.stderr, flush=True)


def gpus_usable(use_gpu: bool, allow_cpu_fallback: bool, where: str,
                probe_gpus: float = 1, timeout_s: float = 120.0) -> bool:
    """Whether GPU work that `where` asks for (`use_gpu`) will find a usable GPU: asked
    on the driver, before a Ray Train fit or an actor pool starts, by a task placed as
    one of its workers (`probe_gpus` GPUs) that checks torch's CUDA there. One GPU node
    is asked: the nodes of a cluster are alike as a rule.

    A fit's workers set up their NCCL process group before the training function runs,
    so a worker whose torch cannot use CUDA fails there, with NCCL's error, and is
    retried `max_failures` times; an actor pool would start and fail its actors. This
    fails at once instead: a ConfigError as `torch_device` raises it, or, with the
    fallback allowed, a warning and False (pass it on as ScalingConfig's `use_gpu`:
    the fit then runs on the CPU, with gloo). True when the GPU can be used.
    """
    if not use_gpu:
        return False
    import ray

    probe = ray.remote(num_cpus=0, num_gpus=probe_gpus)(cuda_problem)
    ref = probe.remote()
    try:
        problem = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        problem = f"no task could get a GPU of the cluster within {timeout_s:g} s"
    if problem is None:
        return True
    _no_gpu(f"{problem} (on a node Ray schedules GPU work on)", allow_cpu_fallback, where)
    return False


def check_train_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                          where: str, cluster: dict | None = None) -> None:
    """Refuse a Ray Train fit that cannot run on the cluster, before it starts.

    Workers that take every CPU leave none to Ray Data's read and transform tasks, which
    feed them: the fit would wait forever ("Cluster resources are not enough to run any
    task"). On GPUs, each worker needs a GPU of its own. `where`: the config section whose
    keys are named in the message ("classifier", "segmenter"); `cluster`: the cluster's
    total resources ({"CPU": 4, "GPU": 1}), default `ray.cluster_resources()`.
    """
    from .errors import ConfigError

    if cluster is None:
        import ray
        cluster = ray.cluster_resources()
    cpus = float(cluster.get("CPU", 0))
    need = num_workers * cpus_per_worker
    if need > cpus - 1:
        raise ConfigError(
            f"{where}: {num_workers} worker(s) x {cpus_per_worker:g} CPU = {need:g} CPUs, "
            f"and the cluster has {cpus:g}: Ray Data needs at least one CPU left for the "
            f"read and transform tasks that feed the workers (the fit would hang); lower "
            f"{where}.num_workers or {where}.cpus_per_worker"
            + ("" if cpus > 1 else ", or give Ray more CPUs (ray.num_cpus)"))
    if use_gpu:
        gpus = float(cluster.get("GPU", 0))
        if num_workers > gpus:
            raise ConfigError(
                f"{where}: {num_workers} worker(s) with {where}.use_gpu need one GPU each, "
                f"and the cluster has {gpus:g}; lower {where}.num_workers, add GPU nodes, "
                f"or set {where}.use_gpu: false")


def project_error(exc: BaseException):
    """The project's own error (DataError, ...) inside a Ray exception chain, if any.

    Ray re-raises a failure in a task or actor as its own exception types that wrap the
    original; the user should see the original one-line message naming the file or
    row, not a remote traceback."""
    from ray.exceptions import RayActorError, RayError

    from .errors import WsssError

    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # RayTaskError(DataError) is both; its text is the remote traceback, and its
        # `cause` is the original error
        if isinstance(e, WsssError) and not isinstance(e, RayError):
            return _without_retry_note(e)
        if isinstance(e, RayActorError):
            rebuilt = _from_actor_error(e)
            if rebuilt is not None:
                return rebuilt
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


_REMOTE_ERROR_LINE = re.compile(r"^ray_wsss\.errors\.(\w+): (.+)$", re.M)


def _from_actor_error(exc):
    """The project's error that an actor's constructor raised (a MapMaker refusing a GPU
    it cannot use): Ray's ActorDiedError keeps only the remote traceback as text, so the
    error is rebuilt from that traceback's last line."""
    from . import errors

    found = _REMOTE_ERROR_LINE.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.WsssError)):
        return None
    return cls(message)


def _without_retry_note(exc):
    """Ray Data appends its retry advice ("Failed to apply UDF transform after 1/1
    attempts ...") to the message of an exception raised in a UDF; the project's
    errors are not transient, so the one line naming the row is what the user gets."""
    text = str(exc)
    cut = text.find("\nFailed to ")
    if cut < 0:
        return exc
    clean = copy.copy(exc)
    clean.args = (text[:cut],)
    return clean

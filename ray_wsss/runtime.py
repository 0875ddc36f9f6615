"""Connecting to Ray: a local instance on a laptop, the cluster under `ray job submit`."""
from __future__ import annotations

import copy
import os

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
    Parquet read; on a laptop each is a ~100 MB process, and how many of them start
    grows with the number of files read, so peak memory would grow with the dataset."""
    readers = cfg.local_footer_readers or min(32, cfg.num_cpus or os.cpu_count() or 2)
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
    table included. Called between stages, when no Ray Data execution is running."""
    try:
        from ray.experimental import tqdm_ray
    except ImportError:  # pragma: no cover - progress bars are cosmetic
        return
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


def project_error(exc: BaseException):
    """The project's own error (DataError, ...) inside a Ray exception chain, if any.

    Ray re-raises a failure in a task or actor as its own exception types that wrap the
    original; the user should see the original one-line message naming the file or
    row, not a remote traceback."""
    from ray.exceptions import RayError

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
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


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

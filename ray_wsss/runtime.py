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
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard)
    configure_data(cfg)


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

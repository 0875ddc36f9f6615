"""The stage graph: strings the stages together over one run directory.

dataset -> classifier -> cams -> crf -> evaluate -> report. Each stage is one module with
one entry point `run(config, run) -> summary`; this module only decides which of them
to run: a stage that is up to date in the manifest (same config hash, same inputs) is
skipped, so a run that was interrupted resumes at the first unfinished stage.
"""
from __future__ import annotations

import importlib
import time
import uuid
from typing import Callable, Sequence

from . import storage
from .config import PipelineConfig
from .errors import StageError
from .run import STAGES, Run
from .runtime import close_stale_progress_bars, init_ray, project_error

ENTRY_POINTS = {
    "dataset": "ray_wsss.data.stage",
    "classifier": "ray_wsss.train.classifier",
    "cams": "ray_wsss.cams.stage",
    "crf": "ray_wsss.refine.stage",
    "evaluate": "ray_wsss.evaluate",
    "report": "ray_wsss.report",
}
STAGE_NAMES = tuple(STAGES)


def stage_function(name: str) -> Callable:
    if name not in ENTRY_POINTS:
        raise StageError(f"unknown stage {name!r} (stages: {', '.join(STAGE_NAMES)})")
    return importlib.import_module(ENTRY_POINTS[name]).run


def _log(msg: str) -> None:
    print(f"[ray-wsss] {msg}", flush=True)


def run_stage(name: str, config: PipelineConfig, run: Run | None = None, force: bool = False,
              check_upstream: bool = True) -> dict | None:
    """Run one stage unless it is up to date; returns its summary (None when skipped)."""
    run = run or Run(config)
    fn = stage_function(name)
    if not force and run.is_done(name):
        _log(f"stage {name}: up to date, skipped")
        return None
    if check_upstream:
        missing = [u for u in STAGES[name][1] if not run.is_done(u)]
        if missing:
            raise StageError(f"stage {name} needs stage {missing[0]} to be finished first "
                             f"in {run.root} (run `ray-wsss run` or `ray-wsss stage "
                             f"{missing[0]}`)")
    entry = run.stage_entry(name) or {}
    if not force and run.is_current(name) and entry.get("status") == "running":
        # the same computation was interrupted: resume it (e.g. from Ray Train checkpoints)
        attempt = entry.get("attempt") or uuid.uuid4().hex[:8]
    else:
        attempt = uuid.uuid4().hex[:8]
    init_ray(config.ray)
    _log(f"stage {name}: running")
    run.mark(name, "running", attempt=attempt)
    t0 = time.time()
    try:
        summary = fn(config, run) or {}
    except Exception as exc:
        found = project_error(exc)
        if found is not None and found is not exc:
            raise found from None
        raise
    finally:
        close_stale_progress_bars()
    seconds = round(time.time() - t0, 1)
    run.mark(name, "done", seconds=seconds, summary=summary, attempt=attempt)
    _log(f"stage {name}: done in {seconds}s {summary if summary else ''}".rstrip())
    return summary


def run_pipeline(config: PipelineConfig, force: bool = False,
                 stages: Sequence[str] | None = None, run_dir: str | None = None) -> Run:
    """Run every stage in order (or the named ones), skipping those up to date."""
    run = Run(config, run_dir)
    storage.makedirs(run.root)
    _log(f"run directory {run.root}")
    for name in stages or STAGE_NAMES:
        run_stage(name, config, run, force=force)
    return run

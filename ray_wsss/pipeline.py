"""Runs steps of the stage graph (`graph.py`) over one run directory.

`run_pipeline` runs every step in order, `run_step` one; a step that is up to date in
the manifest (same config hash, same input run ids) is skipped, so a run that was
interrupted resumes at the first unfinished step. Each stage is one module with one
entry point `run(config, ctx) -> summary`; this module only decides which to run, and
holds the run directory's lock while it does, so two runs never write one directory.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import Sequence

from . import storage
from .config import PipelineConfig
from .errors import ConfigError, StageError
from .graph import STAGE_NAMES, STAGES, Step, active_inputs, get, steps
from .run import Run, StepContext
from .runtime import close_stale_progress_bars, init_ray, project_error

__all__ = ["run_pipeline", "run_stage", "run_step", "STAGE_NAMES"]


def _log(msg: str) -> None:
    print(f"[ray-wsss] {msg}", flush=True)


@contextlib.contextmanager
def run_lock(run: Run):
    """Hold the run directory for this process (re-entrant: a stage run inside a held
    pipeline does not lock again)."""
    from .lock import RunLock

    if getattr(run, "_lock", None) is not None:
        yield run._lock
        return
    storage.makedirs(run.root)
    with RunLock(run.root) as lock:
        run._lock = lock
        try:
            yield lock
        finally:
            run._lock = None


def run_step(step: Step, config: PipelineConfig, run: Run, force: bool = False,
             check_upstream: bool = True) -> dict | None:
    """Run one step unless it is up to date; returns its summary (None when skipped)."""
    stage = get(step.stage)
    if not stage.enabled(config):
        # (the random-walk stages unless random_walk.enabled, pct unless segmenter.mode
        # is pct, ...: graph.py's `enabled`)
        _log(f"stage {step.key}: off for this config, skipped")
        return None
    if not force and run.is_done(step):
        _log(f"stage {step.key}: up to date, skipped")
        return None
    if check_upstream:
        missing = [u for u in active_inputs(step, config) if not run.is_done(u)]
        if missing:
            raise StageError(f"stage {step.key} needs stage {missing[0].key} to be finished "
                             f"first in {run.root} (run `ray-wsss run` or `ray-wsss stage "
                             f"{missing[0].stage}`)")
    with run_lock(run):
        entry = run.stage_entry(step) or {}
        if not force and run.is_current(step) and entry.get("status") == "running":
            # the same computation was interrupted: resume it (e.g. Ray Train checkpoints)
            attempt = entry.get("attempt") or uuid.uuid4().hex[:8]
        else:
            attempt = uuid.uuid4().hex[:8]
        init_ray(config.ray)
        _log(f"stage {step.key}: running")
        run.mark(step, "running", attempt=attempt)
        t0 = time.time()
        try:
            summary = stage.entry(config, StepContext(run, step)) or {}
        except Exception as exc:
            found = project_error(exc)
            if found is not None and found is not exc:
                raise found from None
            raise
        finally:
            close_stale_progress_bars()
        seconds = round(time.time() - t0, 1)
        run.mark(step, "done", seconds=seconds, summary=summary, attempt=attempt)
    _log(f"stage {step.key}: done in {seconds}s {summary if summary else ''}".rstrip())
    return summary


def run_stage(name: str, config: PipelineConfig, run: Run | None = None, force: bool = False,
              check_upstream: bool = True, round: int = 1) -> dict | None:
    """Run one stage (of round `round`) unless it is up to date."""
    get(name)
    return run_step(Step(name, round), config, run or Run(config), force, check_upstream)


def run_pipeline(config: PipelineConfig, force: bool = False,
                 stages: Sequence[str] | None = None, run_dir: str | None = None,
                 until: str | None = None) -> Run:
    """Run every step in order (or those of the named stages), skipping those up to
    date: round 1's, then, with `loop.rounds` > 1, those of the later rounds; with
    `until` (a step key: `crf`, `crf@2`), stop after that step."""
    order = steps(config.loop)
    if until is not None and until not in {s.key for s in order}:
        raise ConfigError(f"--until {until}: no such step in this run (steps: "
                          f"{', '.join(s.key for s in order)})")
    run = Run(config, run_dir)
    storage.makedirs(run.root)
    _log(f"run directory {run.root}")
    wanted = set(stages or STAGE_NAMES)
    with run_lock(run):
        for step in order:
            if step.stage in wanted:
                run_step(step, config, run, force=force)
            if step.key == until:
                _log(f"stopped after step {until} (--until)")
                break
    return run


def describe_stages() -> str:
    """One line per stage, for the CLI's help."""
    return "\n".join(f"  {s.name:11s} {s.description}" for s in STAGES.values())

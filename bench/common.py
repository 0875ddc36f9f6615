"""Shared set-up of the benchmarks: a demo dataset and a classifier in a scratch run dir.

Speed does not depend on what the weights learned, so the benchmarks use an untrained
classifier of the demo architecture unless --model-dir points at a trained one.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ray_wsss.config import load_config, replace  # noqa: E402
from ray_wsss.data import demo  # noqa: E402
from ray_wsss.models.classifier import build_classifier, save_classifier  # noqa: E402
from ray_wsss.run import Run  # noqa: E402

DEMO_YAML = os.path.join(os.path.dirname(__file__), "..", "ray_wsss", "configs", "demo.yaml")


def scratch_run(num_images: int, image_size: int = 160, model_dir: str | None = None,
                root: str | None = None, overrides=()) -> Run:
    """A run directory whose dataset (all `num_images` in split val) and classifier
    stages are in place, so the CAM and CRF stages can run on it."""
    root = root or tempfile.mkdtemp(prefix="wsss-bench-")
    cfg = load_config(DEMO_YAML, [f"run_dir={root}", "ray.progress_bars=false",
                                  "cams.splits=[val]", *overrides])
    run = Run(cfg)
    demo.ensure(run.dataset_path, num_train=0, num_val=num_images, image_size=image_size)
    if model_dir is None:
        model_dir = run.path("classifier")
        info = run.dataset_info()
        save_classifier(build_classifier(cfg.model, info.num_classes, pretrained=False),
                        cfg.model, model_dir, info.classes)
    return run, model_dir


def start_ray(num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """A local Ray as the pipeline starts one (ray_wsss.runtime), quiet; optionally with
    an object store of `object_store_mb` (Ray's default: 30% of the RAM)."""
    import ray

    from ray_wsss.config import RayConfig
    from ray_wsss.runtime import local_environment

    local_environment(RayConfig(num_cpus=num_cpus))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mb * 2**20 if object_store_mb else None)
    ray.data.DataContext.get_current().enable_progress_bars = False


def write_cams(run: Run, model_dir: str, out: str) -> None:
    """The CAM stage's output for `run`, written as the stage writes it."""
    from ray_wsss.cams.stage import cam_dataset
    from ray_wsss.runtime import write_parquet

    write_parquet(cam_dataset(run.config, run.dataset_path, model_dir), out, run.config.ray)


def with_config(run: Run, **changes) -> Run:
    return Run(replace(run.config, **changes), run.root)


class PeakMemory:
    """Peak proportional set size (PSS, shared pages split between their users) of this
    process and every process under it (Ray's raylet, workers, object store), sampled
    every `interval` seconds."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.peak_detail: list[tuple[str, int, int]] = []  # (process, count, bytes) at peak
        self._stop = threading.Event()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        out, todo = [], [os.getpid()]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _name(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            return "?"
        first = args[0].decode(errors="replace")
        if first.startswith("ray::"):
            return first.split(" ")[0]
        return os.path.basename(first) or "?"

    def sample(self) -> int:
        parts = [(p, self._pss(p)) for p in self._tree()]
        total = sum(size for _, size in parts)
        if total > self.peak:
            self.peak = total
            by_name: dict[str, list[int]] = {}
            for pid, size in parts:
                by_name.setdefault(self._name(pid), []).append(size)
            self.peak_detail = sorted(((name, len(v), sum(v)) for name, v in by_name.items()),
                                      key=lambda t: -t[2])
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

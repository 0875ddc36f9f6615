"""Shared fixtures: the real data folders, a local Ray, and one tiny finished run.

The tiny run (a small demo dataset through every stage on a local Ray) is built once per
session and shared by the end-to-end, resume and report tests.
"""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# the session's local Ray as `ray-wsss run` starts one (runtime.local_environment): one
# Parquet footer-reading actor per read, not Ray Data's 32 (each read starts and kills
# its pool: 2.8 s a read of 20 files with 32, 0.9 s with 1)
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Ray Train's controller polls its workers every 2 s by default: each fit's start, end
# and restart after a kill waits for a poll. The suite runs about 15 fits with workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                           "data"))
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Fits whose results, not their Ray Train workers, are under test run in Ray Train's
# local mode (num_workers 0: in the test process, about 15 s less per fit than a worker
# actor). The tests that kill a worker, the DDP fits, the classifier sweep and the job
# give the fits real workers (WORKER_FITS).
LOCAL_FITS = ["classifier.num_workers=0", "segmenter.num_workers=0"]
WORKER_FITS = ["classifier.num_workers=1", "segmenter.num_workers=1"]

# A small demo run: enough images and epochs that CAMs are meaningful, small enough
# for about a minute of CPU. 224 train images (2026-11-28; 320 before): CAM seeds 0.50,
# CRF 0.77, val mAP 94, model 0.74, as 320 gave (0.50-0.53, 0.74-0.78, 0.71); 160 fell
# to 0.46 / 0.65 / 85 / 0.62.
TINY_OVERRIDES = [*LOCAL_FITS,
    "data.demo.num_train=224", "data.demo.num_val=48", "data.demo.image_size=160",
    "classifier.epochs=8", "classifier.batch_size=16", "classifier.crop_size=128",
    "classifier.torch_threads=2",
    "cams.scales=[1.0,0.5]", "cams.torch_threads=2", "cams.batch_size=16",
    "cams.num_actors=1",
    "segmenter.epochs=3", "segmenter.torch_threads=2", "predict.torch_threads=2",
    # one actor per model stage: each more costs its start (2-3 s of CPU) on 2 cores
    "predict.num_actors=1",
    "predict.splits=[val]",
    # the faithfulness metrics of explain at a few points (their own tests cover them)
    "explain.road_percentiles=[50]", "explain.curve_steps=4",
    "report.num_images=4", "ray.progress_bars=false",
    # the tests that kill `ray-wsss run` / `sweep` start a local Ray in a subprocess,
    # twice each: without its dashboard (the session's Ray keeps one for Tune)
    "ray.include_dashboard=false",
]


def data_dir(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"shared data folder {path} is not here")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (4 logical CPUs on 2 cores: tasks are small)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def tiny_config(run_dir: str, extra=()):
    from ray_wsss.config import load_config

    return load_config(os.path.join(REPO, "configs", "demo.yaml"),
                       TINY_OVERRIDES + [f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """A finished pipeline run on a small demo dataset: returns its Run."""
    from ray_wsss.pipeline import run_pipeline

    root = str(tmp_path_factory.mktemp("tiny") / "run")
    return run_pipeline(tiny_config(root))


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """A private copy of the tiny run directory, for tests that modify it."""
    def make(name: str = "copy") -> str:
        dst = str(tmp_path / name)
        shutil.copytree(tiny_run.root, dst)
        return dst
    return make

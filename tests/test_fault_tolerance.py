"""Faults while stages run: a training worker killed mid-epoch, a Ray Data worker killed
mid-stage, a crash between writing a stage's output and publishing it."""
import glob
import json
import os
import shutil
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from ray_wsss import storage
from ray_wsss.config import replace
from ray_wsss.data.dataset import parquet_files, read_table
from ray_wsss.errors import StageError
from ray_wsss.pipeline import run_stage
from ray_wsss.run import Run

from .conftest import WORKER_FITS, tiny_config

pytestmark = pytest.mark.slow


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ours(pid: int) -> bool:
    """A descendant of this test process (its local Ray's workers are): another Ray on
    the same machine (a second test run, a colleague's job) is left alone."""
    me = os.getpid()
    for _ in range(32):
        pid = _parent(pid)
        if pid == me:
            return True
        if pid <= 1:
            return False
    return False


def _processes(marker: str) -> list[int]:
    """PIDs of this test process's descendants whose command line (Ray's process title)
    contains `marker`."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and _ours(int(pid)):
            pids.append(int(pid))
    return pids


def _in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            box["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _kill_when(marker: str, ready, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = _processes(marker)
        if pids and ready():
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.2)
    pytest.fail(f"no process {marker!r} to kill")


def _first_checkpoint_registered(fits: str, old=frozenset()):
    """A predicate: a fit folder matching `fits` (not in `old`) has registered the
    checkpoint of epoch 1. Ray Train's controller lists a checkpoint in its snapshot
    once it is persisted and registered: a restart from then on must resume from it."""
    def ready() -> bool:
        for fit in set(glob.glob(fits)) - set(old):
            try:
                with open(os.path.join(fit, "checkpoint_manager_snapshot.json")) as fh:
                    results = json.load(fh)["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                continue
            if any(r["metrics"].get("epoch") == 1 for r in results):
                return True
        return False
    return ready


@pytest.fixture
def small_run(copy_run, tmp_path):
    """A copy of the tiny run on its first 96 images (dataset read in place)."""
    root = copy_run("faults")
    table = pq.read_table(parquet_files(os.path.join(root, "dataset"))).slice(0, 96)
    ds = tmp_path / "small_ds"
    ds.mkdir()
    pq.write_table(table, ds / "part-0.parquet", row_group_size=16)
    shutil.copy(os.path.join(root, "dataset", "classes.json"), ds / "classes.json")
    cfg = tiny_config(root, [*WORKER_FITS, "data.source=parquet", f"data.path={ds}", "cams.splits=[train,val]",
                             "cams.batch_size=8", "crf.batch_size=8"])
    return Run(cfg), set(table.column("image_id").to_pylist())


def test_a_data_worker_killed_mid_stage_loses_and_duplicates_no_row(small_run):
    run, ids = small_run
    for stage, marker in (("cams", "CamPredictor"), ("crf", "refine_batch")):
        t, box = _in_thread(lambda s=stage: run_stage(s, run.config, run, force=True,
                                                      check_upstream=False))
        started = time.time()
        killed = _kill_when(marker, lambda: time.time() - started > 4)
        t.join(300)
        assert "error" not in box, box.get("error")
        out = read_table(run.path(stage), ["image_id"]).column("image_id").to_pylist()
        assert len(out) == len(ids) and set(out) == ids, (stage, killed, len(out))


def test_a_crash_before_publishing_never_exposes_a_partial_output(small_run, monkeypatch):
    run, ids = small_run
    real_publish = storage.publish

    def crash(tmp, final):
        raise KeyboardInterrupt("killed between writing and renaming")
    monkeypatch.setattr(storage, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage("cams", run.config, run, force=True, check_upstream=False)
    assert run.stage_entry("cams")["status"] == "running"
    with pytest.raises(StageError, match="needs stage cams to be finished first"):
        run_stage("crf", run.config, run)
    monkeypatch.setattr(storage, "publish", real_publish)
    run_stage("cams", run.config, run, check_upstream=False)
    assert not glob.glob(run.path(".tmp-cams-*"))
    out = read_table(run.path("cams"), ["image_id"]).column("image_id").to_pylist()
    assert sorted(out) == sorted(ids)


def test_a_training_worker_killed_mid_epoch_resumes_from_its_checkpoint(small_run):
    run, _ = small_run
    cfg = replace(run.config, **{"classifier.epochs": 3, "classifier.max_failures": 2})
    run = Run(cfg)
    fits = os.path.join(run.root, "classifier", "ray_train", "fit-*")
    old = set(glob.glob(fits))
    t, box = _in_thread(lambda: run_stage("classifier", cfg, run, force=True,
                                          check_upstream=False))

    _kill_when("RayTrainWorker", _first_checkpoint_registered(fits, old), timeout=240)
    t.join(400)
    assert "error" not in box, box.get("error")
    history = run.read_metrics()["classifier"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] >= 1


def test_a_segmenter_worker_killed_mid_epoch_resumes_from_its_checkpoint(small_run):
    """The segmenter's fit goes through the same fit plumbing as the classifier's: a
    worker killed after the first epoch's checkpoint resumes there (epoch 1 is not
    trained again) and the exported model is the last epoch's."""
    run, _ = small_run
    cfg = replace(run.config, **{"segmenter.epochs": 3, "segmenter.max_failures": 2,
                                 "segmenter.batch_size": 8})
    run = Run(cfg)
    fits = os.path.join(run.root, "segmenter", "ray_train", "fit-*")
    old = set(glob.glob(fits))
    t, box = _in_thread(lambda: run_stage("segmenter", cfg, run, force=True,
                                          check_upstream=False))

    _kill_when("RayTrainWorker", _first_checkpoint_registered(fits, old), timeout=240)
    t.join(400)
    assert "error" not in box, box.get("error")
    history = run.read_metrics()["segmenter"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] >= 1
    assert json.load(open(os.path.join(run.root, "segmenter", "model.json")))["epochs"] == 3
    # only this computation's checkpoints are left
    assert len(glob.glob(fits)) == 1

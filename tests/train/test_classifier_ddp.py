"""Every regularizer at once (KUR, Puzzle, OC-CSE with an adversarial OC = P-NOC, MCIS
pairs) in a real Ray Train fit with 2 DDP workers (gloo) on demo images."""
import os
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_wsss.data.dataset import parquet_files
from ray_wsss.pipeline import run_stage
from ray_wsss.run import Run

from ..conftest import tiny_config

pytestmark = pytest.mark.slow


def test_all_regularizers_train_with_two_ddp_workers(copy_run, tiny_run, tmp_path,
                                                    monkeypatch):
    root = copy_run("ddp")
    table = pq.read_table(parquet_files(os.path.join(root, "dataset")))
    train = table.filter(pc.equal(table["split"], "train")).slice(0, 96)
    val = table.filter(pc.equal(table["split"], "val")).slice(0, 16)
    ds = tmp_path / "ds"
    ds.mkdir()
    pq.write_table(train, ds / "part-0.parquet")
    pq.write_table(val, ds / "part-1.parquet")
    shutil.copy(os.path.join(root, "dataset", "classes.json"), ds / "classes.json")
    # the OC named relative to the driver's working directory (not the workers')
    monkeypatch.chdir(os.path.dirname(tiny_run.path("classifier")))
    cfg = tiny_config(root, [
        "data.source=parquet", f"data.path={ds}", "classifier.num_workers=2",
        "classifier.torch_threads=1", "classifier.epochs=3", "classifier.batch_size=16",
        "head.kur=true", "regularizers.puzzle.alpha=4.0", "regularizers.oc_cse.weight=1.0",
        "regularizers.oc_cse.oc_model=classifier",
        "regularizers.pnoc.enabled=true", "regularizers.mcis.enabled=true",
        "regularizers.mcis.contrast_from_epoch=2", "regularizers.mcis.pair_pool=32"])
    run = Run(cfg)
    run_stage("classifier", cfg, run, force=True, check_upstream=False)
    history = run.read_metrics()["classifier"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["workers"] == 2 for h in history)
    for key in ("loss_puzzle_recon", "loss_oc", "loss_oc_adversary", "loss_mcis_co"):
        assert all(key in h for h in history), key
    assert "loss_mcis_contrast" in history[-1] and "loss_mcis_contrast" not in history[0]
    assert history[-1]["loss_cls"] < history[0]["loss_cls"]
    spec = __import__("json").load(open(run.path("classifier", "model.json")))
    assert spec["kur"] is True and spec["mcis"] is True

"""The shared fit plumbing in Ray Train's local mode (`num_workers: 0`): the loop runs in
this process, each epoch's checkpoint is a folder of its own that the next epoch's
replaces, and `run_fit` returns the last epoch's state and removes its folder."""
from __future__ import annotations

import glob
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch


def _loop(cfg):
    import ray.train

    from ray_wsss.train.fit import in_local_mode, report_epoch, resume, start_worker

    world, rank, device = start_worker("toy", SimpleNamespace(**cfg["fit"]))
    assert (world, rank, str(device)) == (1, 0, "cpu") and in_local_mode()
    weight = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([weight], lr=0.5)
    start, history, restarts = resume("toy", {"weight": _Holder(weight), "opt": opt})
    assert (start, restarts) == (0, 0)       # local mode never resumes a fit
    for epoch in range(start, cfg["epochs"]):
        total = 0.0
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=4):
            x = batch["id"].float()
            loss = ((weight.sum() - x.mean()) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(x.sum())
        history.append({"epoch": epoch + 1, "sum": total})
        report_epoch(history[-1], {"weight": weight.detach().clone(),
                                   "opt": opt.state_dict(), "epoch": epoch,
                                   "history": history, "restarts": restarts})
        # one checkpoint folder at a time: this epoch's replaced the previous one's
        assert len(_local_folders() - set(cfg["before"])) == 1


def _local_folders() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ray-wsss-local-fit-*")))


class _Holder:
    """A tensor behind the load_state_dict interface `resume` expects."""
    def __init__(self, t):
        self.t = t

    def load_state_dict(self, state):
        self.t.data.copy_(state)


def test_a_local_mode_fit_returns_its_last_state_and_leaves_no_folder(ray_local, tmp_path):
    import ray.data

    from ray_wsss.train.fit import build_trainer, run_fit

    before = _local_folders()
    fit = {"num_workers": 0, "use_gpu": False, "cpus_per_worker": 1, "max_failures": 0,
           "torch_threads": 1, "seed": 0}
    trainer = build_trainer(_loop, {"fit": fit, "epochs": 3, "before": sorted(before)},
                            SimpleNamespace(**fit), "local-toy", str(tmp_path),
                            {"train": ray.data.range(12)}, where="toy")
    state = run_fit(trainer, "toy")
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert [h["sum"] for h in state["history"]] == [66.0] * 3   # 0 + 1 + ... + 11 each epoch
    # SGD on (w0 + w1 + w2 - mean)^2 moves the three weights alike, towards a sum that
    # tracks the batch means (1.5, 5.5, 9.5 per epoch): a trained weight, not zeros
    w = state["weight"]
    assert torch.allclose(w, w[0].expand(3)) and float(w.sum()) > 1.0
    assert _local_folders() == before and not os.listdir(tmp_path)  # nothing on storage


@pytest.mark.parametrize("workers", [0, 1])
def test_num_workers_zero_is_a_valid_fit_setting(workers):
    from ray_wsss.config import load_config

    from ..conftest import REPO

    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"),
                      [f"{s}.num_workers={workers}" for s in
                       ("classifier", "segmenter", "affinity", "c2am", "pct")])
    assert cfg.classifier.num_workers == cfg.pct.num_workers == workers


class _CountingShard:
    """A real Ray Data iterator that counts the passes asked of it."""
    def __init__(self, ds):
        self.it, self.passes = ds.iterator(), 0

    def iter_torch_batches(self, **kw):
        self.passes += 1
        return self.it.iter_torch_batches(**kw)


def test_val_batches_read_the_shard_once_when_small_and_every_time_when_not(ray_local):
    """`ValBatches` (the val split of every fit): a small val set is read from Ray Data
    once and served from memory afterwards, the same batches; past `cache_bytes` it is
    streamed on every pass."""
    import ray.data

    from ray_wsss.train.fit import ValBatches

    ds = ray.data.range(10).map_batches(
        lambda b: {"x": b["id"].astype("int64"), "y": (b["id"] % 3).astype("uint8")},
        batch_format="numpy")
    dtypes = {"x": torch.int64, "y": torch.uint8}
    shard = _CountingShard(ds)
    val = ValBatches(shard, 4, "cpu", dtypes)
    first = [{k: v.clone() for k, v in b.items()} for b in val]
    second = list(val)
    assert shard.passes == 1 and [len(b["x"]) for b in first] == [4, 4, 2]
    for a, b in zip(first, second):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert sorted(torch.cat([b["x"] for b in second]).tolist()) == list(range(10))
    # 10 rows of 9 bytes: a 40-byte cache holds four of them, not all
    big = _CountingShard(ds)
    streamed = ValBatches(big, 4, "cpu", dtypes, cache_bytes=40)
    for _ in range(3):
        assert sorted(torch.cat([b["x"] for b in streamed]).tolist()) == list(range(10))
    assert big.passes == 3

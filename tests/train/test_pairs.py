"""MCIS training pairs: every pair shares a class, the draws are deterministic for a seed
and change with the epoch, every class gets paired, and the pool keeps recent images."""
import numpy as np
import torch

from ray_wsss.train.pairs import PairPool, sample_partners


def labels(n=64, k=6, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.uint8)
    y[np.arange(n), rng.integers(0, k, n)] = 1
    return y


def test_every_pair_shares_a_class_deterministic_for_a_seed_and_covers_every_class():
    y = labels()
    own = np.arange(64)
    partners = sample_partners(y, y, own, np.random.default_rng(7))
    for i, j in enumerate(partners):
        assert i != j and (y[i] & y[j]).any()
    assert np.array_equal(partners, sample_partners(y, y, own, np.random.default_rng(7)))
    assert not np.array_equal(partners, sample_partners(y, y, own, np.random.default_rng(8)))
    shared = {int(c) for i, j in enumerate(partners) for c in np.flatnonzero(y[i] & y[j])}
    assert shared == set(range(6))


def test_an_image_without_a_peer_is_its_own_partner():
    y = np.zeros((2, 3), np.uint8)
    y[0, 0] = y[1, 1] = 1
    assert sample_partners(y, y, np.arange(2), np.random.default_rng(0)).tolist() == [0, 1]


def test_each_class_of_a_multi_label_image_gets_its_turn():
    # image 0 holds classes 0 and 1; the pool has one image of each: over many draws both
    # partners appear, about equally often
    pool = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0]])
    rng = np.random.default_rng(0)
    picks = [sample_partners(pool[:1], pool, np.array([0]), rng)[0] for _ in range(400)]
    counts = np.bincount(picks, minlength=3)
    assert counts[0] == 0 and abs(counts[1] - counts[2]) < 80


def test_pool_pairs_with_earlier_images_of_the_epoch_and_resets_each_epoch():
    y = torch.tensor(labels(32, 4, seed=1), dtype=torch.float32)
    x = torch.arange(32, dtype=torch.uint8)[:, None, None, None].expand(32, 2, 2, 3)
    pool = PairPool(size=16, seed=3, per_class=0)
    first_x, first_y = pool.draw(x[:8], y[:8], epoch=0, step=0)
    first_ids = first_x[:, 0, 0, 0].long()
    assert set(first_ids.tolist()) <= set(range(8))                  # only the batch so far
    assert torch.equal(first_y, y[first_ids])
    assert all(j == i or (y[i].bool() & y[j].bool()).any() for i, j in enumerate(first_ids))
    seen = set()
    for step in range(1, 4):
        px, py = pool.draw(x[8 * step:8 * step + 8], y[8 * step:8 * step + 8], 0, step)
        ids = px[:, 0, 0, 0].long()
        assert torch.equal(py, y[ids])
        for i, j in zip(range(8 * step, 8 * step + 8), ids.tolist()):
            assert j == i or (y[i].bool() & y[j].bool()).any()
            assert j == i or 8 * step - 16 <= j < 8 * step + 8           # pool: last 16
        seen |= set(ids.tolist())
    assert any(j < 8 * step for j in seen)                            # earlier batches used
    assert len(pool.images) == 16
    # same epoch and step: same draws; a new epoch starts from an empty pool
    again = PairPool(size=16, seed=3, per_class=0).draw(x[:8], y[:8], epoch=0, step=0)[0]
    assert torch.equal(again, first_x)
    pool.draw(x[:8], y[:8], epoch=1, step=0)
    assert len(pool.images) == 8


def test_an_image_of_a_rare_class_finds_the_last_peers_of_its_class_seen_this_epoch():
    # images 0, 40, 80 hold only class 3; all others only class 0. The recent pool (8
    # images) never holds a second class-3 image; the per-class memory does.
    n = 120
    y = torch.zeros(n, 4)
    y[:, 0] = 1
    y[::40, 0], y[::40, 3] = 0, 1
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 2, 2, 3)
    partner = {}
    for per_class in (0, 2):
        pool = PairPool(size=8, seed=0, per_class=per_class)
        for step in range(n // 4):
            rows = slice(4 * step, 4 * step + 4)
            px, py = pool.draw(x[rows], y[rows], epoch=0, step=step)
            ids = px[:, 0, 0, 0].tolist()
            assert torch.equal(py, y[ids])
            for i, j in enumerate(ids):
                img = 4 * step + i
                assert j == img or (y[img].bool() & y[j].bool()).any()
                if y[img, 3]:
                    partner[per_class, img] = j
        assert len(pool.images) == 8
        assert sorted(len(v[0]) for v in pool.by_class.values()) == \
            ([] if per_class == 0 else [2, 2])
    assert [partner[0, i] for i in (0, 40, 80)] == [0, 40, 80]     # self-pairs
    assert partner[2, 0] == 0 and partner[2, 40] == 0 and partner[2, 80] in (0, 40)

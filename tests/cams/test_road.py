"""ROAD's imputation against a dense solve of the same linear system built pixel by
pixel, and ROAD / deletion / insertion on a hand-built model whose scores are known."""
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ray_wsss.cams.road import (FaithfulnessOptions, curve_area, faithfulness_metrics,
                                faithfulness_sums, linear_imputation,
                                noisy_linear_imputation, relevance_rank)
from ray_wsss.errors import ConfigError

NEIGHBOURS = {(0, 1): 1 / 6, (0, -1): 1 / 6, (1, 0): 1 / 6, (-1, 0): 1 / 6,
              (1, 1): 1 / 12, (1, -1): 1 / 12, (-1, 1): 1 / 12, (-1, -1): 1 / 12}


def dense_imputation(img: np.ndarray, known: np.ndarray) -> np.ndarray:
    """img (C, H, W), known (H, W) bool: each removed pixel = weighted mean of its
    in-image neighbours (ROAD's system), solved densely."""
    h, w = known.shape
    unknown = [(i, j) for i in range(h) for j in range(w) if not known[i, j]]
    index = {p: n for n, p in enumerate(unknown)}
    A = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), img.shape[0]))
    for n, (i, j) in enumerate(unknown):
        for (di, dj), wt in NEIGHBOURS.items():
            y, x = i + di, j + dj
            if not (0 <= y < h and 0 <= x < w):
                continue
            A[n, n] += wt
            if known[y, x]:
                b[n] += wt * img[:, y, x]
            else:
                A[n, index[(y, x)]] -= wt
    out = img.copy()
    if unknown:
        sol = np.linalg.solve(A, b)
        for n, (i, j) in enumerate(unknown):
            out[:, i, j] = sol[n]
    return out


@pytest.mark.parametrize("size", [(7, 9), (36, 40)], ids=["one-level", "multi-level"])
def test_imputation_solves_the_road_system(size):
    rng = np.random.default_rng(0)
    h, w = size
    imgs = rng.uniform(0, 255, (3, 3, h, w))
    known = np.stack([rng.random((h, w)) > 0.6,                     # scattered holes
                      np.ones((h, w), bool),                          # nothing removed
                      np.pad(np.zeros((h - 2, w - 4), bool), ((1, 1), (2, 2)),
                             constant_values=True)])                # one big hole
    out = linear_imputation(torch.from_numpy(imgs), torch.from_numpy(known[:, None]).double(),
                            tol=1e-10, max_iter=20_000)
    for n in range(3):
        np.testing.assert_allclose(out[n].numpy(), dense_imputation(imgs[n], known[n]),
                                   rtol=0, atol=1e-6)


def test_default_tolerance_and_noise():
    """Float32 at the default tolerance stays within a grey level of the exact solution
    (mean error a tenth of that); the noise is N(0, (0.01 * 255)^2) on removed pixels only."""
    rng = np.random.default_rng(1)
    h, w = 48, 40
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)), (0, 0), 3).transpose(2, 0, 1)
    known = np.ones((h, w), bool)
    known[10:40, 5:30] = False
    exact = dense_imputation(img, known)
    x = torch.from_numpy(img).float()[None]
    k = torch.from_numpy(known).float()[None, None]
    err = np.abs(linear_imputation(x, k)[0].numpy() - exact)
    assert err.max() < 1.0 and err.mean() < 0.1
    noisy = noisy_linear_imputation(x.expand(8, -1, -1, -1), k.expand(8, -1, -1, -1), 0.01,
                                    torch.Generator().manual_seed(0))
    diff = (noisy - linear_imputation(x, k)).numpy()
    assert np.all(diff[:, :, known] == 0)
    assert np.std(diff[:, :, ~known]) == pytest.approx(2.55, rel=0.05)


def test_relevance_rank_breaks_ties_in_a_scattered_order():
    m = np.zeros((10, 10))
    m[2, 3], m[5, 5] = 1.0, 0.5
    rank = relevance_rank(m, seed=0)
    assert rank[2, 3] == 0 and rank[5, 5] == 1
    assert sorted(rank.ravel()) == list(range(100))
    first_rows = (rank.reshape(-1) < 20).reshape(10, 10).sum(1)
    assert first_rows.max() < 10          # the first 20 are not two whole rows
    np.testing.assert_array_equal(rank, relevance_rank(m, seed=0))


class Square(nn.Module):
    """s_0 = gain * mean over a square R of (x - 100) / 50 (one colour-blind class), s_1 the
    same for the rest of the image. The input mean is 100: the 'nothing' image."""

    def __init__(self, region, gain=2.0):
        super().__init__()
        self.region, self.gain, self.num_classes = region, gain, 2
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 100.0))

    def forward(self, x):
        z = (x - 100) / 50
        inside = torch.zeros(x.shape[2:], dtype=torch.bool)
        inside[self.region] = True
        return torch.stack([self.gain * z[:, :, inside].mean((1, 2)),
                            self.gain * z[:, :, ~inside].mean((1, 2))], 1)


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_road_deletion_and_insertion_on_a_square_the_map_finds():
    region = (slice(4, 8), slice(6, 10))           # 16 of 256 pixels
    model = Square(region)
    x = torch.full((1, 3, 16, 16), 100.0)
    x[:, :, 4:8, 6:10] = 200.0                     # s_0 = 2 * 2 = 4
    good = np.zeros((16, 16), np.float32)
    good[region] = 1.0
    opts = FaithfulnessOptions(road_percentiles=(10, 50, 90), road_noise=0.0, curve_steps=4,
                               insertion_blur=2.0)
    m = faithfulness_metrics(faithfulness_sums(model, x, good[None], np.array([0]), opts),
                             opts)
    y = sig(4.0)
    # MoRF: the square goes first and is imputed from the flat background -> s_0 = 0;
    # LeRF: up to 90% of 256 = 230 < 240 background pixels go, the square stays
    # (imputed values are exact up to the solver's tolerance: abs 1e-2 on percentages)
    assert m["road_morf"] == pytest.approx(50, abs=1e-2)
    assert m["road_lerf"] == pytest.approx(100 * y, abs=1e-4)
    assert m["road_combined"] == pytest.approx((100 * y - 50) / 2, abs=1e-2)
    # deletion at 0, 1/4, ..., 1: the square is gone from 1/4 on (score of the mean: 0.5)
    assert m["deletion_curve"] == pytest.approx([100 * y, 50, 50, 50, 50], abs=1e-4)
    assert m["deletion_auc"] == pytest.approx(100 * (y / 2 + 0.5 * 3 + 0.5 / 2) / 4, abs=1e-4)
    # insertion starts from the blurred image and has the square back from 1/4 on
    k = 2 * math.ceil(3 * 2.0) + 1
    blurred = cv2.GaussianBlur(x[0].permute(1, 2, 0).numpy(), (k, k), 2.0,
                               borderType=cv2.BORDER_REFLECT_101)
    start = sig(2 * ((blurred[region] - 100) / 50).mean())
    assert m["insertion_curve"] == pytest.approx([100 * start] + [100 * y] * 4, abs=1e-3)
    assert m["insertion_auc"] == pytest.approx(100 * (start / 2 + 3 * y + y / 2) / 4, abs=1e-3)
    # a map that ranks the square last: MoRF keeps it, LeRF removes it
    bad = 1 - good
    m_bad = faithfulness_metrics(faithfulness_sums(model, x, bad[None], np.array([0]), opts),
                                 opts)
    assert m_bad["road_morf"] == pytest.approx(100 * y, abs=1e-4)
    assert m_bad["road_lerf"] == pytest.approx(50, abs=1e-2)
    assert m_bad["deletion_auc"] > m["deletion_auc"]
    assert m_bad["insertion_auc"] < m["insertion_auc"]


def test_sums_add_over_pairs_and_images():
    region = (slice(4, 8), slice(6, 10))
    model = Square(region)
    x = torch.full((1, 3, 16, 16), 100.0)
    x[:, :, 4:8, 6:10] = 200.0
    maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    opts = FaithfulnessOptions(road_percentiles=(20, 60), curve_steps=3)
    both = faithfulness_sums(model, x, maps, np.array([0, 1]), opts)
    one = faithfulness_sums(model, x, maps[:1], np.array([0]), opts)
    other = faithfulness_sums(model, x, maps[1:], np.array([1]), opts)
    assert both[0] == 2
    np.testing.assert_allclose(both, one + other, rtol=1e-5)
    assert curve_area(np.array([1.0, 1.0, 1.0])) == 1.0
    with pytest.raises(ConfigError, match="road_percentiles"):
        FaithfulnessOptions(road_percentiles=(0, 50)).check()



def test_the_smallest_settings_road_off_and_one_curve_step():
    """ROAD off (no percentage) and a single curve step (the ends only) are valid
    settings: the curves are [full, empty] / [blurred, full] and ROAD is nan."""
    region = (slice(4, 8), slice(6, 10))
    model = Square(region)
    x = torch.full((1, 3, 16, 16), 100.0)
    x[:, :, 4:8, 6:10] = 200.0
    good = np.zeros((2, 16, 16), np.float32)
    good[:, 4:8, 6:10] = 1.0
    opts = FaithfulnessOptions(road_percentiles=(), curve_steps=1)
    sums = faithfulness_sums(model, x, good, np.array([0, 1]), opts)
    assert sums.shape == (1 + 2 * 2,) and sums[0] == 2
    m = faithfulness_metrics(sums, opts)
    assert math.isnan(m["road_morf"])
    y = sig(4.0)
    # class 0 (the square's score) ends at the mean image's 0.5; class 1 starts there too
    assert m["deletion_curve"] == pytest.approx([100 * (y + 0.5) / 2, 50], abs=1e-4)

"""XAI metrics on a hand-built model whose class scores depend on one image half each."""
import numpy as np
import pytest
import torch
from torch import nn

from ray_wsss.cams.xai import xai_metrics, xai_sums


class Halves(nn.Module):
    """s_0 = 2 * mean of the normalised left half, s_1 = the same for the right half."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 100.0))

    def forward(self, x):
        z = (x - self.mean) / 50
        w = x.shape[3] // 2
        return torch.stack([2 * z[:, :, :, :w].mean((1, 2, 3)),
                            2 * z[:, :, :, w:].mean((1, 2, 3))], 1)


def sig(v):
    return 1 / (1 + np.exp(-v))


def halves_maps(h=8, w=8):
    left = np.zeros((h, w), np.float32)
    left[:, : w // 2] = 1
    return np.stack([left, 1 - left])


def test_each_map_covering_its_own_half():
    x = torch.full((1, 3, 8, 8), 200.0)           # both halves: logit 2 * 2 = 4
    sums = xai_sums(Halves(), x, [halves_maps()], [np.array([0, 1])])
    m = xai_metrics(sums)
    y = sig(4.0)
    # keeping a class's half leaves its score at y; the other half becomes the mean
    # (logit 0, score 0.5); removing it does the opposite
    assert m["pairs"] == 2
    assert m["increase_in_confidence"] == 0
    assert m["average_drop"] == pytest.approx(0, abs=1e-9)
    assert m["average_retention"] == pytest.approx(100 * (y - 0.5) / y)
    assert m["average_drop_of_others"] == pytest.approx(100 * (y - 0.5) / y)
    assert m["average_retention_of_others"] == pytest.approx(0, abs=1e-9)


def test_increase_in_confidence_and_a_partial_map():
    x = torch.full((1, 3, 8, 8), 200.0)
    x[:, :, :, 4:] = 0                             # right half dark: s_1 = 2 * -2 = -4
    maps = halves_maps()
    maps[0] *= 0.5                                 # min-max normalisation undoes the scale
    maps[1] = 0.25 + 0.5 * maps[1]                 # right half 0.75, left 0.25 -> 1 / 0
    sums = xai_sums(Halves(), x, [maps[1:]], [np.array([1])])
    m = xai_metrics(sums)
    # keeping the (dark) right half of class 1 and greying the left raises nothing for
    # class 1: its score only sees the right half
    assert m["pairs"] == 1 and m["increase_in_confidence"] == 0
    # removing the right half (-> mean) raises s_1 from -4 to 0: an increase, no drop
    sums = xai_sums(Halves(), x, [1 - maps[1:]], [np.array([1])])
    m = xai_metrics(sums)
    assert m["increase_in_confidence"] == 100
    assert m["average_drop"] == 0
    y1 = sig(-4.0)
    assert m["average_retention"] == pytest.approx(0)  # Obar keeps the right half: y1
    assert y1 < 0.5
    # class 0 with its half normalised from 0.5: same as the full map
    sums = xai_sums(Halves(), x, [maps[:1]], [np.array([0])])
    m = xai_metrics(sums)
    assert m["average_retention"] == pytest.approx(100 * (sig(4.0) - 0.5) / sig(4.0))


def test_sums_add_over_batches():
    x = torch.full((2, 3, 8, 8), 200.0)
    one = xai_sums(Halves(), x[:1], [halves_maps()], [np.array([0, 1])])
    two = xai_sums(Halves(), x, [halves_maps(), halves_maps()[:1]],
                   [np.array([0, 1]), np.array([0])])
    assert two[0] == 3
    np.testing.assert_allclose(two - one, xai_sums(Halves(), x[1:], [halves_maps()[:1]],
                                                   [np.array([0])]))

"""Puzzle-CAM, OC-CSE, P-NOC and MCIS: their pieces against references, then a few
optimiser steps of each on one batch (loss must fall), without Ray."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_wsss.config import (McisConfig, OcCseConfig, PnocConfig, PuzzleConfig,
                             RegularizersConfig)
from ray_wsss.models.classifier import Classifier
from ray_wsss.train.regularizers import (TrainingModel, choose_classes, erase, merge_tiles,
                                         pnoc_oc_loss, ramp, tile_images)

K = 3


class NoPadding(nn.Module):
    """1x1 convolutions and non-overlapping pooling only: no padding, so a tile's features
    are exactly the matching part of the full image's features."""
    out_channels = 8

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return F.avg_pool2d(F.relu(self.b(F.avg_pool2d(F.relu(self.a(x)), 4))), 4)


def model(mcis=False, seed=0):
    torch.manual_seed(seed)
    return Classifier(NoPadding(), K, mean=(120, 115, 100), std=(60, 60, 60), mcis=mcis)


def test_reassembled_tile_maps_equal_the_full_image_maps():
    m = model().eval()
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        full = m.class_maps(m.features(x))
        merged = merge_tiles(m.class_maps(m.features(tile_images(x))), 2)
    assert merged.shape == full.shape == (2, K, 4, 6)
    torch.testing.assert_close(merged, full)
    # tiles are row-major: [top-left; top-right; bottom-left; bottom-right]
    tiles = tile_images(x)
    torch.testing.assert_close(tiles[2], x[0, :, :32, 48:])


def test_ramp():
    assert ramp(0.0, 0.3, 1.0) == 0.3 and ramp(1.0, 0.3, 1.0) == 1.0
    assert ramp(0.25, 0.0, 4.0, 0.5) == 2.0 and ramp(0.9, 0.0, 4.0, 0.5) == 4.0


class Pool(nn.Module):
    """Features = 8x8 average of the normalised image (3 channels)."""
    out_channels = 3

    def forward(self, x):
        return F.avg_pool2d(x, 8)


def test_erasing_removes_the_chosen_class_region():
    m = Classifier(Pool(), 2, mean=(100, 100, 100), std=(50, 50, 50))
    with torch.no_grad():
        m.classifier.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])
    x = torch.full((1, 3, 32, 32), 100.0)
    x[:, 0, 8:24, 8:24] = 250.0                           # class 0 (red) in the middle
    with torch.no_grad():
        maps = m.class_maps(m.features(x))
        erased, mask = erase(x, maps, torch.tensor([0]), m.mean)
    assert mask.max() == pytest.approx(1, abs=1e-4)
    peak = mask[0, 0] > 0.999
    assert peak.any() and torch.allclose(erased[0, :, peak], torch.tensor(100.0), atol=0.1)
    assert torch.equal(erased[0, :, mask[0, 0] == 0], x[0, :, mask[0, 0] == 0])
    before = F.relu(maps[0, 0]).sum()
    with torch.no_grad():
        after = F.relu(m.class_maps(m.features(erased))[0, 0]).sum()
    # the soft mask fades at the region's border (bilinear upsampling of stride-8 maps),
    # so a little activation remains there
    assert after < 0.3 * before


def test_choose_classes_picks_ground_truth_only():
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    g = torch.Generator().manual_seed(0)
    picks = {tuple(choose_classes(labels, g).tolist()) for _ in range(50)}
    assert all(p[0] in (0, 2) and p[1] == 1 for p in picks) and len(picks) == 2


CONFIGS = {
    "puzzle": RegularizersConfig(puzzle=PuzzleConfig(alpha=4.0)),
    "oc-cse": RegularizersConfig(oc_cse=OcCseConfig(weight=1.0, oc_model="x")),
    "p-noc": RegularizersConfig(puzzle=PuzzleConfig(alpha=4.0),
                                oc_cse=OcCseConfig(weight=1.0, oc_model="x"),
                                pnoc=PnocConfig(enabled=True)),
    "mcis": RegularizersConfig(mcis=McisConfig(enabled=True, contrast_from_epoch=1)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_each_regularizer_lowers_its_loss_on_a_batch(name):
    reg = CONFIGS[name]
    net = TrainingModel(model(mcis=reg.mcis.enabled), reg)
    oc = model(seed=1).eval() if reg.oc_cse.weight > 0 else None
    oc_start = None if oc is None else [p.detach().clone() for p in oc.parameters()]
    g = torch.Generator().manual_seed(0)
    # four images of distinct colours, so that their features can tell them apart
    colours = torch.tensor([[220.0, 40, 40], [40, 220, 40], [220, 220, 40], [40, 40, 220]])
    x = colours[:, :, None, None] + 20 * torch.rand(4, 3, 64, 64, generator=g)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    partner, yp = x.flip(0), y.flip(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    oc_opt = torch.optim.Adam(oc.parameters(), lr=0.02) if reg.pnoc.enabled else None
    losses, oc_losses = [], []
    for step in range(30):
        loss, parts = net(x, y, progress=1.0, epoch=3, partner=partner, partner_labels=yp,
                          oc=oc, generator=torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        expected = {"puzzle": {"puzzle_cls", "puzzle_recon"}, "oc-cse": {"oc"},
                    "p-noc": {"puzzle_recon", "oc"}, "mcis": {"mcis_co", "mcis_contrast"}}
        assert expected[name] <= set(parts), parts.keys()
        if oc_opt is not None:
            ol = pnoc_oc_loss(oc, x, parts["maps"], parts["chosen"], y, net.classifier.mean,
                              0.2)
            oc_opt.zero_grad()
            ol.backward()
            oc_opt.step()
            oc_losses.append(ol.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    if oc is not None:
        moved = [not torch.equal(a, b) for a, b in zip(oc_start, oc.parameters())]
        if reg.pnoc.enabled:   # P-NOC: the adversary learns (its target moves with the CAMs)
            assert all(moved) and np.isfinite(oc_losses).all()
        else:                  # OC-CSE: the ordinary classifier stays fixed
            assert not any(moved) and all(p.grad is None for p in oc.parameters())

import math

import numpy as np
import pytest
import torch

from ray_wsss.config import ModelConfig
from ray_wsss.models.affinity import (AffinityNet, affinity_loss, build_affinity_net,
                                      path_max_affinity)
from ray_wsss.refine.affinity import pair_labels, pair_offsets, segment_pixels


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the
    threads' spinning makes these tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_affinity(boundary: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    h, w = boundary.shape
    out = np.zeros((len(offsets), h, w))
    for p, o in enumerate(offsets):
        path = segment_pixels(o)
        for y in range(h):
            for x in range(w):
                if 0 <= y + o[0] < h and 0 <= x + o[1] < w:
                    out[p, y, x] = 1 - max(boundary[y + dy, x + dx] for dy, dx in path)
    return out


def wall_boundary(h=8, w=9, column=4):
    """0 everywhere but a vertical wall in `column` whose strength grows downwards."""
    b = np.zeros((h, w))
    b[:, column] = 0.5 + 0.05 * np.arange(h)
    return b


def test_path_max_affinity_on_a_wall():
    b = wall_boundary()
    offsets = pair_offsets(5)
    index = {tuple(o): p for p, o in enumerate(offsets.tolist())}
    aff = path_max_affinity(torch.tensor(b)[None, None], offsets)[0].numpy()
    assert aff.shape == (34, 8, 9)
    wall = b[:, 4]
    for y in range(8):
        # across the wall, straight: 1 - the wall where it is crossed
        assert aff[index[(0, 4)], y, 2] == pytest.approx(1 - wall[y])
        assert aff[index[(0, 1)], y, 3] == pytest.approx(1 - wall[y])
        # the same side: no boundary on the way
        assert aff[index[(0, 3)], y, 5] == pytest.approx(1.0)
        assert aff[index[(0, 2)], y, 0] == pytest.approx(1.0)
        if y + 2 < 8:
            # across, diagonally: the segment (2, 2) is the 3x3 box less its two far
            # corners, so it meets column 4 in rows y, y + 1, y + 2
            assert sorted(segment_pixels((2, 2)).tolist()) == [
                [0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [2, 1], [2, 2]]
            assert aff[index[(2, 2)], y, 3] == pytest.approx(1 - wall[y:y + 3].max())
            # along the wall: 1 - the local maximum, here the lower end
            assert aff[index[(2, 0)], y, 4] == pytest.approx(1 - wall[y + 2])
            # from the wall into the ground: the wall pixel itself counts (both ends do)
            assert aff[index[(2, 1)], y, 4] == pytest.approx(1 - wall[y:y + 3].max())
    # destinations outside the image: 0
    assert (aff[index[(0, 1)], :, 8] == 0).all() and (aff[index[(4, 0)], 4:] == 0).all()
    np.testing.assert_allclose(aff, brute_force_affinity(b, offsets), atol=1e-12)


def test_path_max_affinity_random_batch_matches_brute_force_and_has_gradients():
    rng = np.random.default_rng(0)
    b = rng.random((2, 1, 7, 6))
    offsets = pair_offsets(4)
    boundary = torch.tensor(b, requires_grad=True)
    aff = path_max_affinity(boundary, offsets)
    for i in range(2):
        np.testing.assert_allclose(aff[i].detach().numpy(),
                                   brute_force_affinity(b[i, 0], offsets), atol=1e-12)
    aff.sum().backward()
    assert boundary.grad is not None and (boundary.grad <= 0).all()
    assert boundary.grad.abs().sum() > 0


def test_affinity_loss_by_hand():
    aff = torch.tensor([[0.9, 0.6, 0.2, 0.5]]).view(1, 1, 2, 2)
    bg = torch.tensor([[True, False], [False, False]]).view(1, 1, 2, 2)
    fg = torch.tensor([[False, True], [False, True]]).view(1, 1, 2, 2)
    neg = torch.tensor([[False, False], [True, False]]).view(1, 1, 2, 2)
    total, parts = affinity_loss(aff, bg, fg, neg)
    eps = 1e-5
    want_bg = -math.log(0.9 + eps)
    want_fg = -(math.log(0.6 + eps) + math.log(0.5 + eps)) / 2
    want_neg = -math.log(1 + eps - 0.2)
    assert parts["bg_pos"].item() == pytest.approx(want_bg, rel=1e-6)
    assert parts["fg_pos"].item() == pytest.approx(want_fg, rel=1e-6)
    assert parts["neg"].item() == pytest.approx(want_neg, rel=1e-6)
    assert total.item() == pytest.approx(want_bg / 4 + want_fg / 4 + want_neg / 2, rel=1e-6)
    # empty sets contribute 0
    none = torch.zeros_like(bg)
    total, parts = affinity_loss(aff, none, fg, none)
    assert parts["bg_pos"].item() == 0 and parts["neg"].item() == 0
    assert total.item() == pytest.approx(want_fg / 4, rel=1e-6)
    total, _ = affinity_loss(aff, none, none, none)
    assert total.item() == 0
    # affinities of exactly 0 and 1 stay finite
    total, _ = affinity_loss(torch.tensor([0.0, 1.0]), torch.tensor([True, False]),
                             torch.tensor([False, False]), torch.tensor([False, True]))
    assert math.isfinite(total.item())


def tiny_net() -> AffinityNet:
    torch.manual_seed(0)
    return build_affinity_net(ModelConfig(backbone="resnet_mini", pretrained=None))


def test_affinity_net_shapes_and_frozen_backbone():
    net = tiny_net()
    assert len(net.stage_heads) == 4 and net.fuse.in_channels == 128
    images = torch.rand(2, 3, 37, 30) * 255
    net.train()
    assert not net.backbone.training and net.stage_heads.training
    stats = [b.clone() for b in net.backbone.buffers()]
    boundary = net(images)
    assert boundary.shape == (2, 1, 10, 8)
    assert ((boundary >= 0) & (boundary <= 1)).all()
    # frozen: BatchNorm statistics unchanged, no parameter of the backbone trains
    assert all(torch.equal(a, b) for a, b in zip(stats, net.backbone.buffers()))
    assert not any(p.requires_grad for p in net.backbone.parameters())
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names and all(not n.startswith("backbone.") for n in names)
    assert len(net.trainable_parameters()) == len(names)


def test_a_few_adam_steps_lower_the_affinity_loss():
    net = tiny_net()
    net.train()
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 255
    # two regions per image at stride 4 (8x8): left background, right class 2, a band
    # of unsure between
    labels = np.zeros((8, 8), np.uint8)
    labels[:, 5:] = 2
    labels[:, 4] = 255
    offsets = pair_offsets(3)
    masks = [torch.from_numpy(m)[None].expand(2, -1, -1, -1)
             for m in pair_labels(labels, offsets)]
    optimizer = torch.optim.Adam(net.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        total, _ = affinity_loss(path_max_affinity(net(images), offsets), *masks)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses

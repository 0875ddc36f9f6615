"""C²AM's losses against hand computations (pull, push, rank weights, the memory of past
embeddings, the hint term) and the model: embeddings as the pooled maps say, frozen
BatchNorm statistics, the polarity saved and loaded with the weights."""
import math

import numpy as np
import pytest
import torch

from ray_wsss.config import ModelConfig
from ray_wsss.models.c2am import (SIM_MAX, SIM_MIN, EmbeddingMemory, border_activation,
                                  build_c2am, contrastive_loss, hint_loss, pull_loss,
                                  push_loss, rank_weights, save_c2am)
from ray_wsss.models.registry import load_model

W1 = math.exp(-0.25)   # the weight of rank 1


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_rank_weights_follow_the_order_of_each_row():
    sim = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]])
    w = rank_weights(sim, 0.25)
    assert torch.allclose(w, torch.exp(-0.25 * torch.tensor([[2., 0, 1], [0, 2, 1]])))
    # entries outside `valid` rank after every valid one
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.allclose(rank_weights(sim, 0.5, valid)[0],
                          torch.exp(-0.5 * torch.tensor([1., 2, 0])))


def test_pull_loss_is_the_rank_weighted_mean_over_pairs_of_different_images():
    # x0 at 0°, x1 at 60°, x2 at 90°: similarities 0.5 (0,1), 0 -> clamped (0,2), 0.866 (1,2)
    x = torch.tensor([unit(0), unit(60), unit(90)])
    s01, s02, s12 = 0.5, SIM_MIN, math.cos(math.radians(30))
    expected = np.mean([-math.log(s01), -math.log(s02) * W1,        # row 0: x1 first
                        -math.log(s12), -math.log(s01) * W1,        # row 1: x2 first
                        -math.log(s12), -math.log(s02) * W1])       # row 2: x1 first
    assert pull_loss(x, alpha=0.25).item() == pytest.approx(expected, rel=1e-5)
    # alpha 0: no rank weighting, the plain mean of -log s
    plain = np.mean([-math.log(s) for s in (s01, s02, s01, s12, s02, s12)])
    assert pull_loss(x, alpha=0.0).item() == pytest.approx(plain, rel=1e-5)
    # the memory adds partners (the same direction clamps to SIM_MAX), not anchors
    mem = torch.tensor([unit(0), unit(90)])
    one = torch.tensor([unit(0)])
    assert pull_loss(one, mem).item() == pytest.approx(
        np.mean([-math.log(SIM_MAX), -math.log(SIM_MIN) * W1]), rel=1e-5)
    # a lone embedding has no pair: 0, and still differentiable
    lone = torch.tensor([unit(0)], requires_grad=True)
    loss = pull_loss(lone)
    loss.backward()
    assert loss.item() == 0.0 and lone.grad is not None


def test_push_loss_is_the_mean_of_minus_log_one_minus_s_over_fg_bg_pairs():
    fg = torch.tensor([unit(0), unit(90)])
    bg = torch.tensor([unit(45), unit(0)])
    sims = [math.cos(math.radians(45)), SIM_MAX, math.cos(math.radians(45)), SIM_MIN]
    assert push_loss(fg, bg).item() == pytest.approx(
        np.mean([-math.log(1 - s) for s in sims]), rel=1e-5)
    # with memories: fg x (bg + remembered bg), and bg x remembered fg
    fg_mem, bg_mem = torch.tensor([unit(45)]), torch.tensor([unit(90)])
    more = sims + [SIM_MIN, SIM_MAX]                         # fg0, fg1 against bg_mem (90°)
    more += [SIM_MAX, math.cos(math.radians(45))]            # bg0 (45°), bg1 (0°) vs fg_mem
    assert push_loss(fg, bg, fg_mem, bg_mem).item() == pytest.approx(
        np.mean([-math.log(1 - s) for s in more]), rel=1e-5)


def test_contrastive_loss_sums_the_three_terms_and_orders_good_and_bad_embeddings():
    fg, bg = torch.tensor([unit(0), unit(10)]), torch.tensor([unit(90), unit(100)])
    total, parts = contrastive_loss(fg, bg)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()))
    assert set(parts) == {"fg_pull", "bg_pull", "push"}
    # fg and bg apart, each side together: low; the sides swapped within images: high
    mixed, _ = contrastive_loss(torch.tensor([unit(0), unit(90)]),
                                torch.tensor([unit(90), unit(0)]))
    assert total.item() < 1.0 < mixed.item()


def test_memory_keeps_the_last_embeddings_detached():
    mem = EmbeddingMemory(3)
    assert mem.get() == (None, None)
    a = torch.arange(8.).view(4, 2).requires_grad_()
    mem.add(a, -a)
    fg, bg = mem.get()
    assert fg.tolist() == [[2., 3.], [4., 5.], [6., 7.]] and torch.equal(bg, -fg)
    assert not fg.requires_grad
    off = EmbeddingMemory(0)
    off.add(a, a)
    assert off.get() == (None, None)


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_hint_loss_pulls_only_hinted_pixels_towards_the_smoothed_target():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 5.0]]]])
    hints = torch.tensor([[[[0.5, 0.1], [0.4, 0.39]]]])
    # foreground hints only (P-NOC): the pixels at 0.5 and 0.4, target 1 - 0.1 / 2
    assert hint_loss(logits, hints, 0.4, 0.1).item() == pytest.approx(
        (bce(2.0, 0.95) + bce(0.5, 0.95)) / 2, rel=1e-5)
    # with background hints: the pixel at 0.1 towards 0.05 too
    assert hint_loss(logits, hints, 0.4, 0.1, bg_threshold=0.2).item() == pytest.approx(
        (bce(2.0, 0.95) + bce(0.5, 0.95) + bce(-1.0, 0.05)) / 3, rel=1e-5)
    # hints at the image's size are area-averaged to the map's: a 4x4 whose top-left 2x2
    # block is 1 gives 1 in the top-left cell only
    big = torch.zeros(1, 1, 4, 4)
    big[..., :2, :2] = 1
    assert hint_loss(logits, big, 0.4, 0.0).item() == pytest.approx(bce(2.0, 1.0), rel=1e-5)
    # no hinted pixel: 0
    assert hint_loss(logits, torch.zeros_like(hints)).item() == 0.0


def test_border_activation_is_the_mean_over_the_outer_ring():
    a = torch.zeros(1, 1, 4, 4)
    a[..., 0, :] = 1                     # the top row: 4 of the 12 border pixels
    assert border_activation(a).item() == pytest.approx(4 / 12)


def test_the_model_pools_its_map_and_saves_its_polarity(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet_mini", output_stride=16)
    model = build_c2am(cfg, pretrained=False)
    model.train()
    assert not model.backbone.training and model.head_norm.training
    images = torch.rand(2, 3, 64, 64) * 255
    fg, bg, logits = model(images)
    assert logits.shape == (2, 1, 4, 4) and fg.shape == (2, 256 + 128)
    model.eval()
    feats = model.features(images)
    a = model.activation(images)
    assert torch.allclose(model(images)[0], (a * feats).mean((2, 3)), atol=1e-5)
    assert torch.allclose(model(images)[1], ((1 - a) * feats).mean((2, 3)), atol=1e-5)
    # an inverted map is saved as such: the loaded model gives 1 - A
    model.polarity.fill_(-1.0)
    save_c2am(model, cfg, str(tmp_path), {"kind": "classifier"})
    loaded = load_model(str(tmp_path), kind="c2am").eval()
    assert torch.allclose(loaded.activation(images), 1 - a, atol=1e-5)

"""CAM and TTA against closed forms computed with numpy and OpenCV."""
import cv2
import numpy as np
import torch
from torch import nn

from ray_wsss.cams.methods import cam
from ray_wsss.cams.tta import tta_maps
from ray_wsss.models.classifier import Classifier


class PoolBackbone(nn.Module):
    """Features = 4x4 average pooling of the normalised image (3 channels, stride 4)."""
    out_channels = 3

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 4)


def hand_model(weights: np.ndarray) -> Classifier:
    model = Classifier(PoolBackbone(), weights.shape[0], mean=(100.0, 110.0, 120.0),
                       std=(50.0, 60.0, 70.0))
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weights)[:, :, None, None])
    return model.eval()


def reference_cam(img: np.ndarray, weights: np.ndarray, cls: int) -> np.ndarray:
    """ReLU(sum_k W_ck A_k) at stride 4, bilinear (half-pixel) to full size, over max."""
    x = (img.astype(np.float64) - [100, 110, 120]) / [50, 60, 70]
    h, w = img.shape[:2]
    feats = x.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))  # (h/4, w/4, 3)
    m = np.maximum(feats @ weights[cls], 0).astype(np.float32)
    up = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return up / (up.max() + 1e-5)


def test_cam_of_a_hand_set_head_equals_the_closed_form():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3))
    model = hand_model(weights)
    imgs = rng.integers(0, 255, (2, 32, 48, 3)).astype(np.uint8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    maps, probs = tta_maps(model, cam, x, [np.array([0, 2]), np.array([3])], scales=(1.0,))
    assert maps[0].shape == (2, 32, 48) and maps[1].shape == (1, 32, 48)
    for b, classes in enumerate([[0, 2], [3]]):
        for j, c in enumerate(classes):
            np.testing.assert_allclose(maps[b][j], reference_cam(imgs[b], weights, c),
                                       rtol=1e-4, atol=1e-5)
    # probabilities: sigmoid of W . GAP(features)
    xn = (imgs.astype(np.float64) - [100, 110, 120]) / [50, 60, 70]
    logits = xn.mean(axis=(1, 2)) @ weights.T
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5)


def test_flip_tta_sums_the_mirrored_map():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(2, 3))
    model = hand_model(weights)
    img = rng.integers(0, 255, (1, 32, 32, 3)).astype(np.uint8)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float()
    maps, _ = tta_maps(model, cam, x, [np.array([1])], scales=(1.0,), flip=True)
    # the passes are summed first and normalised once: rebuild the unnormalised sum
    xn = (img[0].astype(np.float64) - [100, 110, 120]) / [50, 60, 70]

    def raw(a):
        f = a.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
        return cv2.resize(np.maximum(f @ weights[1], 0).astype(np.float32), (32, 32))
    total = raw(xn) + raw(xn[:, ::-1].copy())[:, ::-1]
    np.testing.assert_allclose(maps[0][0], total / (total.max() + 1e-5), rtol=1e-4, atol=1e-5)


def test_maps_are_relu_and_zero_for_unwanted_classes():
    model = hand_model(-np.ones((2, 3)))  # every logit map negative -> ReLU gives 0
    x = torch.full((1, 3, 16, 16), 200.0)
    maps, logits = cam(model, x, torch.tensor([[1.0, 0.0]]))
    assert maps.shape == (1, 2, 4, 4) and torch.all(maps == 0)
    model = hand_model(np.ones((2, 3)))
    maps, _ = cam(model, x, torch.tensor([[1.0, 0.0]]))
    assert torch.all(maps[0, 0] > 0) and torch.all(maps[0, 1] == 0)

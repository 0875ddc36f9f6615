"""The iterative loop's prior M_t: its formula, a classifier fed it as extra channels,
and the augmentation that must move it with the image."""
import numpy as np
import pytest
import torch

from ray_wsss.cams.methods import get_method
from ray_wsss.cams.tta import tta_maps
from ray_wsss.config import ModelConfig
from ray_wsss.data.codecs import encode_array, encode_image
from ray_wsss.data.transforms import EvalTransform, TrainTransform
from ray_wsss.models.classifier import build_classifier, warm_start, zero_extra_inputs
from ray_wsss.train.prior import class_weights, compute_prior


def test_the_prior_equals_a_hand_computation_on_two_classes():
    """Two classes (1, 2), image tagged with both, 1x2 pixels. Softmax scores of the
    segmentation model over (background, 1, 2, 3); class 3 is not the image's, so the
    restricted softmax renormalises over (background, 1, 2)."""
    scores = np.array([[[0.2, 0.5]],     # background
                       [[0.6, 0.1]],     # class 1
                       [[0.1, 0.2]],     # class 2
                       [[0.1, 0.2]]],    # class 3 (not in the image)
                      np.float32)
    probs = np.array([0.9, 0.5, 0.99], np.float32)
    weights = class_weights([1.0, 0.5, 2.0], 3)       # alpha / max alpha
    assert weights.tolist() == [0.5, 0.25, 1.0]
    m = compute_prior(scores, [1, 2], probs, weights, per_class=False)
    # pixel 0: restricted (0.2, 0.6, 0.1) / 0.9; pixel 1: (0.5, 0.1, 0.2) / 0.8
    expected = np.array([[0.5 * 0.9 * 0.6 / 0.9 + 0.25 * 0.5 * 0.1 / 0.9,
                          0.5 * 0.9 * 0.1 / 0.8 + 0.25 * 0.5 * 0.2 / 0.8]])
    assert m.shape == (1, 1, 2)
    assert np.allclose(m[0], expected, atol=1e-6)
    per_class = compute_prior(scores, [1, 2], probs, weights, per_class=True)
    assert per_class.shape == (3, 1, 2)
    assert np.allclose(per_class.sum(0), m[0], atol=1e-6)
    assert (per_class[2] == 0).all()                   # class 3 is not in the image
    # alpha null: every weight 1; the prior stays in [0, 1]
    ones = compute_prior(scores, [1, 2], np.ones(3, np.float32), class_weights(None, 3),
                         False)
    assert np.allclose(ones[0], 1 - scores[0] / scores[:3].sum(0), atol=1e-6)
    with pytest.raises(Exception, match="loop.alpha: 2 weights for 3 classes"):
        class_weights([1.0, 2.0], 3)


@pytest.mark.parametrize("backbone", ["resnet_mini", "resnet18"])
def test_a_zero_initialised_prior_channel_changes_no_logit_and_no_cam(backbone):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone)
    rgb = build_classifier(cfg, 4, 3, pretrained=False).eval()
    fed = build_classifier(cfg, 4, 4, pretrained=False)
    zero_extra_inputs(fed)
    warm_start(fed, rgb)
    fed.eval()
    images = torch.rand(2, 3, 64, 80) * 255
    for prior in (torch.zeros(2, 1, 64, 80), torch.rand(2, 1, 64, 80) * 255,
                  torch.full((2, 1, 64, 80), 255.0)):
        x = torch.cat([images, prior], 1)
        with torch.no_grad():
            assert torch.allclose(fed(x), rgb(images), atol=1e-5)
        classes = [np.array([0, 2]), np.array([1])]
        for method in ("cam", "gradcam"):
            ours, _ = tta_maps(fed, get_method(method), x, classes, (1.0, 0.5), True)
            ref, _ = tta_maps(rgb, get_method(method), images, classes, (1.0, 0.5), True)
            for a, b in zip(ours, ref):
                assert np.allclose(a, b, atol=1e-5)


def test_augmentation_moves_the_prior_with_the_image():
    """A prior computed from the image (its red channel) is still the red channel of
    the augmented image: rescale, crop, pad and flip treat both alike; jitter touches
    the colours only."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    image = np.ascontiguousarray(np.repeat(np.repeat(image[::5, ::5], 5, 0), 5, 1)[:70, :90])
    prior = image[None, :, :, 0].copy()
    batch = {"image_id": np.array(["a"], object),
             "image": np.array([encode_image(image)], object),
             "prior": np.array([encode_array(prior, np.uint8)], object),
             "label_vector": np.ones((1, 2), np.uint8)}
    for seed in range(6):
        out = TrainTransform(64, (0.5, 1.5), True, 0.0, seed=seed, prior_channels=1)(batch)
        img = out["image"][0]
        assert img.shape == (64, 64, 4)
        inside = ~(img[..., :3] == np.array([124, 116, 104], np.uint8)).all(-1)
        assert (img[..., 3][inside] == img[..., 0][inside]).all()
        assert (img[..., 3][~inside] == 0).all()   # padding: no prior
        jittered = TrainTransform(64, (0.5, 1.5), True, 0.4, seed=seed,
                                  prior_channels=1)(batch)["image"][0]
        assert (jittered[..., 3] == img[..., 3]).all()
    ev = EvalTransform(48, prior_channels=1)(batch)["image"][0]
    assert ev.shape == (48, 48, 4)
    inside = ~(ev[..., :3] == np.array([124, 116, 104], np.uint8)).all(-1)
    assert np.abs(ev[..., 3][inside].astype(int) - ev[..., 0][inside]).max() <= 1


def test_per_class_priors_resize_like_the_image_in_every_path():
    """`loop.prior: per_class` gives the classifier 3 + K channels; OpenCV's area
    resize refuses more than 4 at a non-integer ratio (the demo's round-2 classifier
    failed in validation on it). Letterboxing for validation and the CAMs' shrinking of
    large images treat each prior channel as they treat the red one."""
    import cv2

    from ray_wsss.data.transforms import resize_any

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    prior = np.stack([image[..., 0]] * 6)                        # K = 6 copies of red
    batch = {"image_id": np.array(["a"], object),
             "image": np.array([encode_image(image)], object),
             "prior": np.array([encode_array(prior, np.uint8)], object),
             "label_vector": np.ones((1, 2), np.uint8)}
    ev = EvalTransform(48, prior_channels=6)(batch)["image"][0]  # 90 -> 48: area, 0.53
    assert ev.shape == (48, 48, 9)
    inside = ~(ev[..., :3] == np.array([124, 116, 104], np.uint8)).all(-1)
    assert inside.mean() > 0.5
    for k in range(3, 9):
        assert (ev[..., k][inside] == ev[..., 0][inside]).all()
        assert (ev[..., k][~inside] == 0).all()
    stacked = np.concatenate([image, prior.transpose(1, 2, 0)], axis=2)
    small = resize_any(stacked, (37, 29), cv2.INTER_AREA)
    assert small.shape == (29, 37, 9)
    np.testing.assert_array_equal(small[..., :3], cv2.resize(image, (37, 29),
                                                              interpolation=cv2.INTER_AREA))
    assert (small[..., 3:] == small[..., :1]).all()


def test_the_summed_prior_is_flat_without_a_background_class_and_warned_of():
    """On a dataset without background (CamVid) the model never predicts label 0, the
    restricted softmax sums to 1 over the image's classes, and with equal alpha the
    summed prior is about the classes' probabilities everywhere: it carries no mask.
    The per-class channels still do. The prior stage warns of that case only."""
    from ray_wsss.train.prior import flat_prior_warning

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 6, 6)).astype(np.float32)
    logits[0] = -30                                  # label 0: never predicted
    scores = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    probs = np.array([0.95, 0.9, 0.02], np.float32)  # classes 1 and 2 are the image's
    m = compute_prior(scores, [1, 2], probs, class_weights(None, 3), per_class=False)
    assert m.min() >= 0.9 - 1e-6 and m.max() <= 0.95 + 1e-6   # flat: P, not the masks
    per_class = compute_prior(scores, [1, 2], probs, class_weights(None, 3), True)
    assert per_class[0].max() - per_class[0].min() > 0.5     # the masks are there
    assert "use loop.prior: per_class" in flat_prior_warning("sum", False, None, 3)
    assert flat_prior_warning("sum", False, [1.0, 1.0, 1.0], 3) is not None
    for args in (("sum", True, None), ("per_class", False, None),
                 ("sum", False, [1.0, 0.5, 1.0])):
        assert flat_prior_warning(*args, 3) is None, args

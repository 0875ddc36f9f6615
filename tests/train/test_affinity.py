"""The affinity network's training data: image and affinity label augmented together,
the label sampled at stride 4, and the pair labels of a batch in torch."""
import cv2
import numpy as np
import pytest
import torch

from ray_wsss.data.codecs import encode_image, encode_mask
from ray_wsss.refine.affinity import UNSURE, labels_at_stride, pair_labels, pair_offsets
from ray_wsss.train.affinity import AffinityTrainTransform, batch_pair_labels


def test_batch_pair_labels_equal_the_numpy_pair_labels():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, 2, UNSURE], np.uint8), size=(3, 9, 11),
                        p=[0.4, 0.25, 0.2, 0.15])
    for radius in (2, 5, 10):
        offsets = pair_offsets(radius)
        got = batch_pair_labels(torch.from_numpy(labels), offsets)
        for b in range(3):
            want = pair_labels(labels[b], offsets)
            for g, w in zip(got, want):
                assert g.dtype == torch.bool and torch.equal(g[b], torch.from_numpy(w))


def _labelled_image(h=70, w=90):
    """Colour encodes the label: background grey (0), red squares class 1, blue class
    2, green bands unsure (255)."""
    label = np.zeros((h, w), np.uint8)
    label[10:40, 10:45] = 1
    label[35:65, 55:85] = 2
    label[:, 47:52] = UNSURE
    colours = {0: (90, 90, 90), 1: (230, 20, 20), 2: (20, 20, 230), UNSURE: (20, 230, 20)}
    image = np.zeros((h, w, 3), np.uint8)
    for k, c in colours.items():
        image[label == k] = c
    return image, label, colours


def test_augmentation_keeps_image_and_label_aligned_and_samples_stride_4():
    image, label, colours = _labelled_image()
    batch = {"image_id": np.array(["a"], object),
             "image": np.array([encode_image(image)], object),
             "affinity_label": np.array([encode_mask(label)], object)}
    for seed in range(6):
        out = AffinityTrainTransform(64, (0.7, 1.3), True, seed=seed)(batch)
        assert out["image"].shape == (1, 64, 64, 3) and out["label"].shape == (1, 16, 16)
        img, lab = out["image"][0], out["label"][0]
        # at each stride-4 cell's sampled pixel the image's colour says the label, away
        # from the label's edges (bilinear resizing blends the image's colours there)
        ys = np.minimum(np.arange(0, 64, 4) + 2, 63)
        sampled = img[np.ix_(ys, ys)].astype(int)
        edges = cv2.morphologyEx(lab, cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0
        checked = 0
        for k, c in colours.items():
            hit = (np.abs(sampled - c).sum(-1) < 30) & ~edges
            assert (lab[hit] == k).all(), (seed, k)
            checked += hit.sum()
        assert checked > 0.3 * lab.size
        # padding (outside the rescaled image) is unsure
        pad = (sampled == np.array([124, 116, 104])).all(-1)
        assert (lab[pad] == UNSURE).all()


def test_labels_at_stride_matches_the_backbone_grid():
    """The stride-4 label of a crop S has the size of resnet_mini's first stage."""
    from ray_wsss.config import ModelConfig
    from ray_wsss.models.affinity import build_affinity_net

    net = build_affinity_net(ModelConfig(backbone="resnet_mini"), pretrained=False).eval()
    for s in (64, 66, 90):
        with torch.no_grad():
            b = net(torch.zeros(1, 3, s, s))
        assert b.shape[-2:] == labels_at_stride(np.zeros((s, s), np.uint8)).shape


@pytest.mark.parametrize("radius", [5, 10])
def test_the_loss_of_a_perfect_boundary_is_near_zero(radius):
    """A boundary map that is 1 exactly between differently labelled cells and 0
    elsewhere gives affinity 1 within regions and 0 across: each loss term ~ 0."""
    from ray_wsss.models.affinity import affinity_loss, path_max_affinity

    labels = np.zeros((1, 24, 24), np.uint8)
    labels[0, :, 12:] = 1
    boundary = torch.zeros(1, 1, 24, 24)
    boundary[0, 0, :, 11:13] = 1.0
    labels[0, :, 11:13] = UNSURE  # the boundary pixels themselves: no pair uses them
    offsets = pair_offsets(radius)
    aff = path_max_affinity(boundary, offsets)
    total, parts = affinity_loss(aff, *batch_pair_labels(torch.from_numpy(labels), offsets))
    assert total.item() < 1e-3 and all(v.item() < 1e-3 for v in parts.values())

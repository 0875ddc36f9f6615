import numpy as np
import pytest

from ray_wsss.refine.affinity import (IRN_LABEL_CRF, UNSURE, affinity_labels,
                                      labels_at_stride, pair_labels, pair_offsets,
                                      segment_pixels)
from ray_wsss.refine.crf import crf_from_labels


def brute_force_half_disk(radius: int) -> set[tuple[int, int]]:
    """All offsets closer than r, one of each ± pair: the one that is later in raster
    order."""
    every = {(y, x) for y in range(-radius, radius + 1) for x in range(-radius, radius + 1)
             if 0 < y * y + x * x < radius * radius}
    assert all((-y, -x) in every for y, x in every)
    return {(y, x) for y, x in every if (y, x) > (0, 0)}


def test_pair_offsets_radius_5_are_irns_34_each_once():
    offsets = pair_offsets(5)
    assert offsets.shape == (34, 2) and offsets.dtype == np.int64
    as_set = {tuple(o) for o in offsets.tolist()}
    assert len(as_set) == 34
    assert as_set == brute_force_half_disk(5)
    assert not any((-y, -x) in as_set for y, x in as_set)
    # IRN's search order: the row to the right first, then row by row, left to right
    assert offsets[:4].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert offsets[4].tolist() == [1, -4] and offsets[-1].tolist() == [4, 2]


@pytest.mark.parametrize("radius", [1, 2, 3, 10])
def test_pair_offsets_count_matches_brute_force(radius):
    offsets = pair_offsets(radius)
    assert {tuple(o) for o in offsets.tolist()} == brute_force_half_disk(radius)
    assert len(offsets) == len(brute_force_half_disk(radius))
    if radius == 10:
        assert len(offsets) == 152  # (305 lattice points with |v| < 10 - 1) / 2


def test_segment_pixels():
    assert segment_pixels((0, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    assert segment_pixels((3, 0)).tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]
    # a one-step diagonal touches its whole 2x2 box
    assert sorted(segment_pixels((1, 1)).tolist()) == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert sorted(segment_pixels((1, -1)).tolist()) == [[0, -1], [0, 0], [1, -1], [1, 0]]
    # (4, 2): pixels whose distance to the line is below 1: (2x - y)² < 5 in the box
    assert sorted(map(tuple, segment_pixels((4, 2)).tolist())) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1),
        (4, 2)]
    for o in pair_offsets(5):
        path = segment_pixels(o)
        assert path[0].tolist() == [0, 0] and path[-1].tolist() == o.tolist()
        assert len({tuple(p) for p in path.tolist()}) == len(path)
        # mirror image of the mirrored offset
        mirrored = {(y, -x) for y, x in segment_pixels((o[0], -o[1])).tolist()}
        assert {tuple(p) for p in path.tolist()} == mirrored


LABELS = np.array([[0, 0, 1, 1],
                   [0, 255, 1, 1],
                   [0, 0, 2, 2],
                   [0, 0, 2, 2]], np.uint8)


def test_pair_labels_pair_by_pair():
    offsets = pair_offsets(3)
    bg_pos, fg_pos, neg = pair_labels(LABELS, offsets)
    assert bg_pos.shape == fg_pos.shape == neg.shape == (len(offsets), 4, 4)
    assert bg_pos.dtype == bool
    for p, (dy, dx) in enumerate(offsets.tolist()):
        for y in range(4):
            for x in range(4):
                ty, tx = y + dy, x + dx
                got = (bg_pos[p, y, x], fg_pos[p, y, x], neg[p, y, x])
                if not (0 <= ty < 4 and 0 <= tx < 4):
                    assert got == (False, False, False)
                    continue
                a, b = LABELS[y, x], LABELS[ty, tx]
                if a == 255 or b == 255:
                    want = (False, False, False)
                elif a == b:
                    want = (a == 0, a > 0, False)
                else:
                    want = (False, False, True)
                assert got == want, (p, dy, dx, y, x)
    # a few pairs spelled out
    right, down = 0, offsets.tolist().index([1, 0])
    assert bg_pos[right, 0, 0] and neg[right, 0, 1] and fg_pos[right, 0, 2]
    assert not fg_pos[right, 0, 3] and not neg[right, 0, 3]  # destination outside
    assert neg[down, 1, 2] and fg_pos[down, 2, 2]             # 1 over 2, 2 over 2
    assert not (bg_pos[down, 0, 1] or neg[down, 0, 1])        # 0 over unsure
    assert not (bg_pos[:, 1, 1].any() or fg_pos[:, 1, 1].any() or neg[:, 1, 1].any())
    # every valid pair is exactly one of the three
    assert not (bg_pos & fg_pos).any() and not (bg_pos & neg).any() and not (fg_pos & neg).any()


def test_labels_at_stride_samples_cell_centres():
    big = np.repeat(np.repeat(LABELS, 4, 0), 4, 1)
    assert np.array_equal(labels_at_stride(big), LABELS)
    odd = np.arange(10 * 7, dtype=np.uint8).reshape(10, 7)
    small = labels_at_stride(odd)
    assert small.shape == (3, 2)
    assert small.tolist() == [[odd[2, 2], odd[2, 6]], [odd[6, 2], odd[6, 6]],
                              [odd[9, 2], odd[9, 6]]]


def square_scene():
    """A bright square on a dark ground, with a CAM peaked on it (1 at the centre, 0.05
    about 24 pixels out). Around the square the ground brightens towards it with the
    CAM, so the CRF's appearance kernel ties each pixel to its own ring and leaves the
    thresholds' decisions between the square and the far ground."""
    size, lo, hi, sigma = 96, 40, 56, 10.0
    yy, xx = np.mgrid[:size, :size]
    dist = np.hypot(yy - 47.5, xx - 47.5)
    cam = np.exp(-dist ** 2 / (2 * sigma ** 2)).astype(np.float32)
    image = np.repeat((30 + 150 * cam).astype(np.uint8)[..., None], 3, axis=2)
    image[lo:hi, lo:hi] = 220
    return image, cam[None], (lo, hi), dist


def test_affinity_labels_square():
    image, cams, (lo, hi), dist = square_scene()
    out = affinity_labels(image, cams, [3])
    assert out.dtype == np.uint8 and out.shape == (96, 96)
    assert set(np.unique(out)) == {0, 3, UNSURE}
    assert (out[lo:hi, lo:hi] == 3).all()
    # background far away (CAM below 0.03), unsure in between (CAM 0.10 to 0.25)
    assert (out[dist > 27] == 0).all()
    ring = out[(dist > 17) & (dist < 21)]
    assert (ring == UNSURE).all(), np.unique(ring, return_counts=True)
    assert not (out[dist > 17] == 3).any()


def test_affinity_labels_without_background_or_classes():
    image, cams, _, _ = square_scene()
    out = affinity_labels(image, cams, [3], background=False)
    assert set(np.unique(out)) == {3, UNSURE}
    empty = affinity_labels(image, cams[:0], [])
    assert (empty == 0).all()


def test_crf_from_labels_cleans_flipped_labels_along_image_edges():
    image = np.full((40, 60, 3), 40, np.uint8)
    image[:, 30:] = 200
    truth = np.zeros((40, 60), np.int64)
    truth[:, 30:] = 1
    flips = np.random.default_rng(0).random(truth.shape) < 0.15
    noisy = np.where(flips, 1 - truth, truth)
    out = crf_from_labels(image, noisy, 2, IRN_LABEL_CRF)
    assert out.shape == (40, 60) and (out == truth).mean() > 0.99
    assert (crf_from_labels(image, np.zeros_like(truth), 1, IRN_LABEL_CRF) == 0).all()


def test_the_stage_batch_functions_label_each_row_of_a_batch():
    """The affinity_labels stage's batch functions (CAMs, and C²AM saliency) give each
    row the labels of the single-image functions, with the config's label CRF; a
    saliency map of the wrong size is refused naming the row. (The stage itself runs
    in tests/test_random_walk_stages.py, from saliency.)"""
    from ray_wsss.config import AffinityConfig
    from ray_wsss.data.codecs import decode_mask, encode_array, encode_image, encode_mask
    from ray_wsss.errors import DataError
    from ray_wsss.refine.affinity import saliency_affinity_labels
    from ray_wsss.refine.affinity_stage import (label_batch, label_crf_config,
                                                saliency_label_batch)

    image, cam, _, dist = square_scene()
    images = [image, image[:, ::-1].copy()]
    cams = [np.concatenate([cam, 0.5 * cam]), cam[:, :, ::-1].copy()]
    vectors = [np.array([0, 1, 1], np.uint8), np.array([1, 0, 0], np.uint8)]
    classes = [[2, 3], [1]]
    saliency = (dist < 20).astype(np.float32) * 0.9 + 0.05
    batch = {"image_id": np.array(["a", "b"], object), "split": np.array(["train"] * 2, object),
             "image": np.array([encode_image(i) for i in images], object),
             "cam": np.array([encode_array(c) for c in cams], object),
             "label_vector": np.stack(vectors),
             "saliency": np.array([encode_mask((saliency * 255).round().astype(np.uint8))] * 2,
                                  object)}
    cfg = AffinityConfig()
    crf = label_crf_config(cfg)
    for background in (True, False):
        out = label_batch(batch, cfg, background)
        assert list(out["image_id"]) == ["a", "b"] and list(out["split"]) == ["train"] * 2
        for k in range(2):
            c = decode_array_f16(cams[k])
            np.testing.assert_array_equal(
                decode_mask(out["affinity_label"][k]),
                affinity_labels(images[k], c, classes[k], cfg.fg_threshold, cfg.bg_threshold,
                                crf, background, cfg.label_crf.gt_prob))
    out = saliency_label_batch(batch, cfg)
    s = np.round(saliency * 255) / 255
    for k in range(2):
        expected = saliency_affinity_labels(
            images[k], decode_array_f16(cams[k]), classes[k], s.astype(np.float32),
            cfg.saliency_threshold, cfg.saliency_fg_threshold, crf, cfg.label_crf.gt_prob)
        np.testing.assert_array_equal(decode_mask(out["affinity_label"][k]), expected)
        assert (expected == 0).any() and (expected == UNSURE).any()
    batch["saliency"] = np.array([encode_mask(np.zeros((8, 8), np.uint8))] * 2, object)
    with pytest.raises(DataError, match="row a: saliency is 8x8, the image 96x96"):
        saliency_label_batch(batch, cfg)


def decode_array_f16(cams):
    """The CAMs as the stage reads them back (stored as float16)."""
    return cams.astype(np.float16).astype(np.float32)

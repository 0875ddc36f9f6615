import numpy as np

from ray_wsss.refine.seeds import background_score, seed_mask, seed_sweep


def test_seed_mask_is_the_argmax_over_background_and_classes():
    cams = np.array([[[0.9, 0.2, 0.4]], [[0.5, 0.1, 0.6]]], np.float32)  # (2, 1, 3)
    out = seed_mask(cams, [4, 9], threshold=0.3)
    assert out.tolist() == [[4, 0, 9]]
    assert seed_mask(cams, [4, 9], 0.3, background=False).tolist() == [[4, 4, 9]]


def test_sweep_equals_one_seed_per_threshold():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 20, 30)).astype(np.float32)
    classes = [2, 5, 6]
    thresholds = [0.05, 0.3, 0.5, 0.75, 0.95]
    sweep = seed_sweep(cams, classes, thresholds)
    for t, s in zip(thresholds, sweep):
        assert np.array_equal(s, seed_mask(cams, classes, t))


def test_power_background():
    cams = np.array([[[1.0, 0.5, 0.0]]], np.float32)
    assert np.allclose(background_score(cams, 0.3, power=2.0), [[0.0, 0.25, 1.0]])
    assert seed_mask(cams, [1], 0.3, power=2.0).tolist() == [[1, 1, 0]]

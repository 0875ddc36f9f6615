"""The random-walk stage's per-image work (refine/walk_stage.py): CAMs to the boundary
map's grid, the sparse walk inside walls of a boundary map, the mask rule with and
without the Puzzle-CAM CRF, shrunk images."""
import numpy as np
import pytest
import torch

from ray_wsss.config import RandomWalkConfig, WalkCrfConfig
from ray_wsss.refine.affinity import pair_offsets
from ray_wsss.refine.random_walk import walk_to_mask
from ray_wsss.refine.walk_stage import RandomWalker, walked_scores


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _walker(cfg: RandomWalkConfig, boundary: np.ndarray, background: bool = True):
    """A RandomWalker whose network is replaced by a fixed boundary map (stride 4)."""
    walker = RandomWalker.__new__(RandomWalker)
    walker.cfg, walker.background = cfg, background
    walker.offsets = pair_offsets(cfg.radius)
    walker.device = torch.device("cpu")
    walker.boundary = lambda images: torch.from_numpy(np.stack([boundary] * len(images))).float()
    return walker


def _walled_square(size=96, lo=32, hi=64):
    """An object [lo, hi)² whose boundary ring (one stride-4 cell outside it) the
    boundary map marks, and a CAM that covers only the object's middle."""
    cells = (size + 3) // 4
    boundary = np.full((cells, cells), 0.02, np.float32)
    a, b = lo // 4 - 1, hi // 4
    boundary[a:b + 1, [a, b]] = 1.0
    boundary[[a, b], a:b + 1] = 1.0
    yy, xx = np.mgrid[:size, :size]
    centre = (lo + hi - 1) / 2
    cam = np.exp(-((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * 7.0 ** 2))
    truth = np.zeros((size, size), np.uint8)
    truth[lo:hi, lo:hi] = 2
    image = np.full((size, size, 3), 60, np.uint8)
    image[truth > 0] = (200, 60, 60)
    return image, cam[None].astype(np.float32), truth, boundary


def _iou(a, b):
    return ((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum()


@pytest.mark.parametrize("options", [{}, {"walked_background": True},
                                     {"crf": WalkCrfConfig(iterations=1)}])
def test_the_walk_fills_the_walled_object_and_stops_at_its_boundary(options):
    image, cams, truth, boundary = _walled_square()
    cfg = RandomWalkConfig(enabled=True, **options)
    mask, boundary_png = _walker(cfg, boundary).walk(image, cams, [2])
    assert mask.shape == truth.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 2}
    seed = np.where(cams[0] > 0.25, 2, 0)
    assert _iou(seed, truth) < 0.6          # the CAM covers the middle only
    # (a walked background map keeps more of its weight near the object's edges, where
    # the CAM is low, after 256 steps: 0.79 against 0.90 with IRN's rule)
    floor = 0.75 if cfg.walked_background else 0.85
    assert _iou(mask, truth) > floor, _iou(mask, truth)
    assert not mask[:24].any() and not mask[72:].any()  # nothing beyond the wall
    assert boundary_png.shape == boundary.shape and boundary_png.max() == 255


def test_a_large_image_is_walked_shrunk_and_its_mask_has_the_image_size():
    image, cams, truth, boundary = _walled_square()
    big = np.repeat(np.repeat(image, 2, 0), 2, 1)
    big_cams = np.repeat(np.repeat(cams, 2, 1), 2, 2)
    cfg = RandomWalkConfig(enabled=True, max_image_side=96)
    mask, _ = _walker(cfg, boundary).walk(big, big_cams, [2])
    assert mask.shape == (192, 192)
    assert _iou(mask, np.repeat(np.repeat(truth, 2, 0), 2, 1)) > 0.85


def test_an_image_without_classes_is_background():
    image, cams, _, boundary = _walled_square()
    mask, _ = _walker(RandomWalkConfig(enabled=True), boundary).walk(image, cams[:0], [])
    assert not mask.any()


@pytest.mark.parametrize("walked_background, background", [(False, True), (True, True),
                                                           (False, False)])
def test_the_crf_scores_are_those_of_the_mask_rule(walked_background, background):
    """Without CRF iterations the argmax of `walked_scores` is `walk_to_mask`: the CRF
    option changes only what the CRF adds."""
    rng = np.random.default_rng(0)
    classes = [1, 4]
    walked = torch.from_numpy(rng.random((3 if walked_background else 2, 9, 11))
                              .astype(np.float32))
    cfg = RandomWalkConfig(walked_background=walked_background, background_threshold=0.4)
    scores, keys = walked_scores(walked, classes, cfg, background, (35, 41))
    want = walk_to_mask(walked, classes, 0.4, walked_background, background, size=(35, 41))
    assert np.array_equal(keys[scores.argmax(0)], want)


@pytest.mark.parametrize("options", [{}, {"walked_background": True}])
def test_a_batch_of_images_gives_each_image_its_own_walk(options):
    """walk_many (one boundary pass and one batched walk per input size, as the stage
    calls it) equals walking each image alone, whatever the number of classes."""
    image, cams, _, boundary = _walled_square()
    walker = _walker(RandomWalkConfig(enabled=True, **options), boundary)
    rng = np.random.default_rng(0)
    two = np.concatenate([cams, np.roll(cams, 20, axis=2)])
    cases = [(image, cams, [2]), (image[:, ::-1].copy(), two, [1, 3]),
             (image, cams[:0], []), (image, rng.random((1, 96, 96), np.float32), [4])]
    together = walker.walk_many(*zip(*cases))
    for (img, c, k), (mask, bnd) in zip(cases, together):
        alone, alone_bnd = walker.walk(img, c, k)
        np.testing.assert_array_equal(mask, alone)
        np.testing.assert_array_equal(bnd, alone_bnd)
    assert len({m.tobytes() for m, _ in together}) == 4   # four different masks

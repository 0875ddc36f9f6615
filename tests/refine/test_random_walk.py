import numpy as np
import pytest
import torch

from ray_wsss.refine.affinity import pair_offsets
from ray_wsss.refine.random_walk import (dense_random_walk, random_walk,
                                         transition_weights, walk_to_mask)
from ray_wsss.refine.seeds import background_score


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the
    threads' spinning makes these tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def explicit_transition(affinity: np.ndarray, radius: int, beta: float) -> np.ndarray:
    """T built pixel pair by pixel pair from the definition, independently of the offsets'
    order: A_ij = a(i, j) for every two pixels closer than r (read from whichever of the
    two is the pair's source), A_ii = 1; A_β = A ** β; T = A_β / column sums."""
    offsets = {tuple(o): p for p, o in enumerate(pair_offsets(radius).tolist())}
    _, h, w = affinity.shape
    n = h * w
    a = np.eye(n)
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            d = (yj - yi, xj - xi)
            if d in offsets:
                a[i, j] = a[j, i] = affinity[offsets[d], yi, xi]
    a = a ** beta
    return a / a.sum(0, keepdims=True)


def small_case(h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    offsets = pair_offsets(5)
    # mostly strong affinities with a weak wall, as a trained net gives
    affinity = 0.7 + 0.3 * rng.random((len(offsets), h, w))
    affinity[:, :, 4:6] *= 0.3
    cams = rng.random((2, h, w))
    maps = np.concatenate([background_score(cams, 0.0, power=2.0)[None], cams])
    return offsets, affinity, maps


def test_sparse_walk_equals_dense_t256_built_explicitly():
    offsets, affinity, maps = small_case()
    beta, steps = 10.0, 256
    t = explicit_transition(affinity, 5, beta)
    assert not np.allclose(t, t.T)  # column-normalised, not symmetric: orientation matters
    want = (maps.reshape(3, -1) @ np.linalg.matrix_power(t, steps)).reshape(maps.shape)
    got = random_walk(torch.from_numpy(maps), torch.from_numpy(affinity), offsets,
                      beta=beta, steps=steps)
    assert got.dtype == torch.float64 and got.shape == (3, 12, 10)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)
    # the wrong orientation (T v, row-normalised) is far from it: the test can tell
    wrong = (np.linalg.matrix_power(t, steps) @ maps.reshape(3, -1).T).T.reshape(maps.shape)
    assert np.abs(wrong - want).max() > 1e-3
    # IRN's formulation (dense T squared 8 times) agrees too
    dense = dense_random_walk(torch.from_numpy(maps), torch.from_numpy(affinity), offsets,
                              beta=beta, steps=steps)
    np.testing.assert_allclose(dense.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [0, 1, 3, 16])
def test_sparse_and_dense_agree_for_any_steps_and_a_boundary(steps):
    offsets, affinity, maps = small_case(7, 9, seed=1)
    boundary = np.random.default_rng(2).random((7, 9))
    args = (torch.from_numpy(maps), torch.from_numpy(affinity), offsets, 10.0, steps,
            torch.from_numpy(boundary))
    np.testing.assert_allclose(random_walk(*args).numpy(), dense_random_walk(*args).numpy(),
                               atol=1e-12)
    if steps == 0:
        np.testing.assert_allclose(random_walk(*args).numpy(), maps * (1 - boundary))


def test_a_batch_walks_each_image_over_its_own_affinities():
    """A batch of images of one size (the stage's GPU path) gives each image's own walk,
    an image with fewer classes padded with a zero map that stays zero."""
    cases = [small_case(seed=s) for s in range(3)]
    offsets = cases[0][0]
    boundary = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0)) * 0.5
    alone = [random_walk(torch.tensor(m[:2 + i % 2]), torch.tensor(a), offsets, steps=32,
                         boundary=boundary[i].double())
             for i, (_, a, m) in enumerate(cases)]
    maps = torch.zeros(3, 3, 12, 10, dtype=torch.float64)
    for i, (_, _, m) in enumerate(cases):
        maps[i, :2 + i % 2] = torch.tensor(m[:2 + i % 2])
    batch = random_walk(maps, torch.tensor(np.stack([a for _, a, _ in cases])), offsets,
                        steps=32, boundary=boundary.double())
    assert batch.shape == (3, 3, 12, 10)
    for i, walked in enumerate(alone):
        torch.testing.assert_close(batch[i, :len(walked)], walked, rtol=0, atol=1e-12)
        assert not batch[i, len(walked):].any()
    # and the images really differ (else the test could not tell them apart)
    assert (alone[0][:2] - alone[1][:2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="does not match"):
        random_walk(maps, torch.tensor(cases[0][1]), offsets)


def test_transition_columns_sum_to_one():
    offsets, affinity, _ = small_case()
    shifts, weights = transition_weights(torch.from_numpy(affinity), offsets, 10.0)
    assert shifts.shape == (69, 2) and weights.shape == (69, 12, 10)
    np.testing.assert_allclose(weights.sum(0).numpy(), 1.0, atol=1e-12)
    t = explicit_transition(affinity, 5, 10.0)
    for k in (0, 1, 40):
        dy, dx = shifts[k]
        y, x = 5, 5
        assert t[(y + dy) * 10 + x + dx, y * 10 + x] == pytest.approx(weights[k, y, x].item())


def test_walk_properties():
    offsets = pair_offsets(5)
    h, w = 10, 12
    constant = torch.full((1, h, w), 0.4)
    affinity = torch.rand(len(offsets), h, w)
    # every step is a weighted mean: a constant map stays constant
    torch.testing.assert_close(random_walk(constant, affinity, offsets, steps=64), constant)
    # no affinity: T is the identity
    maps = torch.rand(2, h, w)
    unmoved = random_walk(maps, torch.zeros_like(affinity), offsets, steps=64)
    torch.testing.assert_close(unmoved, maps)
    # a wall of zero affinity between columns 5 and 6 keeps the left map on the left
    wall = torch.ones_like(affinity)
    for p, (dy, dx) in enumerate(offsets.tolist()):
        xs = torch.arange(w)
        crosses = ((xs <= 5) & (xs + dx >= 6)) | ((xs >= 6) & (xs + dx <= 5))
        wall[p, :, crosses] = 0
    left = torch.zeros(1, h, w)
    left[0, :, :3] = 1
    walked = random_walk(left, wall, offsets, steps=64)
    assert (walked[0, :, 6:] == 0).all() and (walked[0, :, :6] > 0.1).all()


def test_walk_to_mask_irn_background():
    walked = torch.tensor([[[4.0, 0.9, 0.0]],
                           [[1.0, 2.0, 0.5]]])  # (2, 1, 3): max 4 -> /4
    # scaled: [[1, 0.225, 0], [0.25, 0.5, 0.125]]
    mask = walk_to_mask(walked, [3, 7])
    assert mask.dtype == np.uint8 and mask.tolist() == [[3, 7, 0]]
    assert walk_to_mask(walked, [3, 7], background_threshold=0.1).tolist() == [[3, 7, 7]]
    assert walk_to_mask(walked, [3, 7], background_threshold=0.6).tolist() == [[3, 0, 0]]
    # exactly at the threshold: background (the constant plane comes first)
    assert walk_to_mask(torch.tensor([[[1.0, 0.25]]]), [5]).tolist() == [[5, 0]]
    # upsampled x4 to the image size
    big = walk_to_mask(torch.rand(2, 3, 4), [1, 2], size=(11, 14))
    assert big.shape == (11, 14)
    assert walk_to_mask(torch.zeros(0, 3, 4), []).tolist() == np.zeros((3, 4)).tolist()


def test_walk_to_mask_walked_background_and_no_background():
    walked = torch.tensor([[[0.5, 0.1, 0.3]],    # the walked background map
                           [[0.2, 0.4, 0.3]],
                           [[0.1, 0.2, 0.6]]])
    assert walk_to_mask(walked, [2, 9], walked_background=True).tolist() == [[0, 2, 9]]
    with pytest.raises(ValueError):
        walk_to_mask(walked, [2, 9, 4], walked_background=True)
    assert walk_to_mask(walked[1:], [2, 9], background=False).tolist() == [[2, 2, 9]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_walk_on_cuda_matches_cpu():
    offsets, affinity, maps = small_case()
    cpu = random_walk(torch.from_numpy(maps), torch.from_numpy(affinity), offsets)
    gpu = random_walk(torch.from_numpy(maps).cuda(), torch.from_numpy(affinity).cuda(),
                      offsets)
    assert gpu.is_cuda
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-10)

import cv2
import numpy as np
import pytest
from PIL import Image

from ray_wsss.config import CrfConfig
from ray_wsss.refine.crf import crf_mask, dense_crf, softmax

from ..conftest import data_dir


@pytest.mark.parametrize("image_id", ["2011_000003", "2011_000006", "2011_000025"])
def test_crf_improves_a_noisy_two_region_unary_on_a_real_photo(image_id):
    root = data_dir("voc_sample")
    img = cv2.cvtColor(cv2.imread(f"{root}/JPEGImages/{image_id}.jpg"), cv2.COLOR_BGR2RGB)
    gt = np.array(Image.open(f"{root}/SegmentationClass/{image_id}.png"))
    fg = ((gt > 0) & (gt < 255)).astype(np.float32)
    valid = gt != 255
    h, w = fg.shape
    # a CAM-like unary: the object at 1/16 resolution, blurred back up, plus smooth noise
    coarse = cv2.resize(cv2.resize(fg, (w // 16, h // 16), interpolation=cv2.INTER_AREA),
                        (w, h), interpolation=cv2.INTER_LINEAR)
    noise = cv2.resize(np.random.default_rng(0).normal(0, 0.25, (h // 8, w // 8))
                       .astype(np.float32), (w, h))
    p_fg = np.clip(0.5 + 0.4 * (coarse - 0.5) + noise, 0.02, 0.98)
    probs = np.stack([1 - p_fg, p_fg]).astype(np.float32)

    def iou(pred):
        f = fg > 0
        return ((pred & f & valid).sum()) / (((pred | f) & valid).sum())

    q = dense_crf(img, probs, CrfConfig())
    assert q.shape == (2, h, w)
    assert np.allclose(q.sum(0), 1, atol=1e-4)
    before, after = iou(p_fg > 0.5), iou(q[1] > q[0])
    assert after >= before + 0.08, (before, after)


def test_crf_mask_uses_only_background_and_the_image_classes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 50, 3), np.uint8)
    cams = rng.random((2, 40, 50)).astype(np.float32)
    out = crf_mask(img, cams, [3, 7], CrfConfig(iterations=3), threshold=0.5)
    assert set(np.unique(out)) <= {0, 3, 7}
    # no background class: only the image's classes appear
    out = crf_mask(img, cams, [3, 7], CrfConfig(iterations=3), threshold=0.5, background=False)
    assert set(np.unique(out)) <= {3, 7}
    # one label only: returned as is without running the CRF
    assert np.all(crf_mask(img, cams[:1], [4], CrfConfig(), 0.5, background=False) == 4)


def test_softmax_temperature():
    s = np.array([[0.2], [0.5]], np.float32)
    p = softmax(s, 0.1)
    assert p[:, 0] == pytest.approx([1 / (1 + np.exp(3)), 1 / (1 + np.exp(-3))], rel=1e-5)

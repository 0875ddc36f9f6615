"""C²AM-H saliency: affinity labels from a known saliency map and CAMs, the saliency
mask's threshold rule and the hint maps the fit learns from. The c2am, saliency and
affinity_labels stages run on a copy of the tiny run in tests/test_random_walk_stages.py
(the saliency's polarity, the labels against the ground truth)."""
import numpy as np
import pytest

from ray_wsss.config import CrfConfig, LabelCrfConfig, SaliencyConfig
from ray_wsss.refine.affinity import UNSURE, saliency_affinity_labels
from ray_wsss.refine.saliency import foreground_truth, saliency_mask
from ray_wsss.train.c2am import C2amTrainTransform, hint_map

NO_CRF = CrfConfig(iterations=0)   # the CRF's unary alone: its argmax is the label map


def scene():
    """8x8: class 3's map is 0.8 on the left half, 0.2 on the right; the saliency is 0.9
    on the top six rows, 0.05 on the bottom two."""
    cams = np.full((1, 8, 8), 0.2, np.float32)
    cams[0, :, :4] = 0.8
    saliency = np.full((8, 8), 0.05, np.float32)
    saliency[:6] = 0.9
    return cams, saliency


def test_affinity_labels_from_saliency_on_a_hand_built_case():
    cams, saliency = scene()
    image = np.full((8, 8, 3), 128, np.uint8)
    labels = saliency_affinity_labels(image, cams, [3], saliency, 0.10, 0.40, NO_CRF)
    expected = np.full((8, 8), UNSURE, np.uint8)
    expected[:6, :4] = 3       # salient and the class map beats 0.40
    expected[6:] = 0           # not salient: background, whatever the CAM says (0.8 left)
    np.testing.assert_array_equal(labels, expected)
    # the low CAM threshold plays no part: a CAM of 0.2 under salient pixels stays unsure
    # (IRN's labels would call it foreground at 0.05), and raising the saliency threshold
    # above 0.9 makes every pixel background
    all_bg = saliency_affinity_labels(image, cams, [3], saliency, 0.95, 0.40, NO_CRF)
    assert (all_bg == 0).all()
    # no class: salient pixels unsure, the rest background
    none = saliency_affinity_labels(image, cams[:0], [], saliency, 0.10, 0.40, NO_CRF)
    assert (none[:6] == UNSURE).all() and (none[6:] == 0).all()


def test_the_label_crf_keeps_regions_that_follow_the_image():
    """With the real label CRF the same labels come back where the image's colours
    follow the regions (the CRF moves boundaries to edges, it does not invent labels)."""
    cams, saliency = scene()
    cams = np.kron(cams, np.ones((1, 8, 8), np.float32))       # 64x64
    saliency = np.kron(saliency, np.ones((8, 8), np.float32))
    image = np.zeros((64, 64, 3), np.uint8)
    image[:48, :32] = (200, 40, 40)      # the object
    image[:48, 32:] = (40, 200, 40)      # salient, no confident class
    image[48:] = (40, 40, 200)           # background
    labels = saliency_affinity_labels(image, cams, [3], saliency, 0.10, 0.40)
    assert (labels[:48, :32] == 3).mean() > 0.98
    assert (labels[:48, 32:] == UNSURE).mean() > 0.98
    assert (labels[48:] == 0).mean() > 0.98


def test_saliency_mask_is_the_argmax_against_the_constant():
    a = np.array([[0.1, 0.2], [0.21, 0.9]], np.float32)
    cfg = SaliencyConfig(threshold=0.2, crf=LabelCrfConfig(iterations=0))
    image = np.zeros((2, 2, 3), np.uint8)
    # a tie with the constant is background (argmax takes the first maximum)
    np.testing.assert_array_equal(saliency_mask(image, a, cfg), [[0, 0], [1, 1]])
    truth = foreground_truth(np.array([[0, 4], [255, 1]], np.uint8))
    np.testing.assert_array_equal(truth, [[0, 1], [255, 1]])


def test_hints_are_the_max_cam_and_travel_with_the_image():
    from ray_wsss.data.codecs import encode_array, encode_image

    cams = np.zeros((2, 32, 32), np.float32)
    cams[0, :16] = 0.5
    cams[1, :, :8] = 1.0
    hint = hint_map(cams)
    assert hint[0, 0] == 255 and hint[0, 20] == round(0.5 * 255) and hint[20, 20] == 0
    assert (hint_map(cams[:0]) == 0).all()
    # the image is red exactly where the hint is 255: after scale, crop and flip the
    # hint must still sit on the red pixels
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :8] = (255, 0, 0)
    batch = {"image_id": np.array(["a"] * 6, object),
             "image": np.array([encode_image(image)] * 6, object),
             "cam": np.array([encode_array(cams)] * 6, object)}
    out = C2amTrainTransform(24, (0.9, 1.1), hflip=True, seed=1)(batch)
    assert out["image"].shape == (6, 24, 24, 3) and out["hint"].shape == (6, 24, 24)
    red = (out["image"][..., 0] > 200) & (out["image"][..., 1] < 50)
    assert red.any() and (out["hint"][red] >= 250).mean() > 0.9


def test_saliency_hints_are_refused_for_a_dataset_without_background(tmp_path):
    """C²AM-H needs a background class: on a dataset whose every pixel has a class
    (CamVid) the c2am stage refuses before fitting, naming the key and the way out."""
    from PIL import Image

    from ray_wsss.config import load_config
    from ray_wsss.data import importers
    from ray_wsss.errors import StageError
    from ray_wsss.pipeline import run_stage
    from ray_wsss.run import Run

    from ..conftest import REPO

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for k in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * k, np.uint8)).save(images / f"f{k}.png")
        Image.fromarray(np.full((16, 16), k, np.uint8)).save(masks / f"f{k}.png")
    run_dir = tmp_path / "run"
    importers.import_folder([("train", str(images), str(masks))], str(run_dir / "dataset"),
                            classes=["road", "car"], background=False,
                            opts=importers.ImportOptions(mask_offset=1))
    config = load_config(f"{REPO}/configs/demo.yaml", [
        f"run_dir={run_dir}", "random_walk.enabled=true", "affinity.labels_from=saliency"])
    with pytest.raises(StageError, match="affinity.labels_from: saliency needs a dataset "
                                         "with a background class.*labels_from: cams"):
        run_stage("c2am", config, Run(config), check_upstream=False)
    assert not (run_dir / "c2am").exists()

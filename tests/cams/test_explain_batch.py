"""`explain`'s actor class on one batch, without Ray: the ROAD, deletion / insertion and
box sums it hands the driver (the end-to-end run is in test_explain.py, marked slow)."""
import numpy as np
import torch

from ray_wsss.cams.road import FaithfulnessOptions, faithfulness_metrics


def test_explainer_batch_gives_the_new_sums_without_ray(tmp_path):
    """One batch through `explain`'s actor class (no Ray): ROAD, deletion / insertion
    and box sums per method, in the shapes the driver adds up."""
    from ray_wsss.cams.explain import Explainer, format_table
    from ray_wsss.cams.road import sums_length
    from ray_wsss.config import ModelConfig
    from ray_wsss.data.codecs import encode_image, encode_mask
    from ray_wsss.models.classifier import build_classifier, save_classifier

    cfg = ModelConfig(backbone="resnet_mini", output_stride=16, pretrained=None)
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg, 3, pretrained=False), cfg, str(tmp_path), "abc")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), np.uint8) for _ in range(2)]
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 6:22] = 1
    batch = {"image_id": np.array(["a", "b"], object),
             "image": np.array([encode_image(i) for i in images], object),
             "mask": np.array([encode_mask(mask), None], object),
             "label_vector": np.array([[1, 0, 0], [0, 1, 1]], np.uint8)}
    opts = FaithfulnessOptions(road_percentiles=(20, 60), curve_steps=2)
    ex = Explainer(str(tmp_path), ["cam", "gradient"], (1.0,), False, [0.3], 4, True, ["a"],
                   faithfulness=opts)
    ex.maker.probs = lambda imgs: np.full((len(imgs), 3), 0.9, np.float32)  # all detected
    out = ex(batch)
    assert out["faith"].shape == (1, 2, sums_length(opts))
    assert np.all(out["faith"][0, :, 0] == 6)       # every class detected in both
    assert out["boxes"].shape == (1, 2, 2) and np.all(out["boxes"][0, :, 1] == 1)
    m = faithfulness_metrics(out["faith"][0, 0], opts)
    assert all(0 <= m[k] <= 100 for k in ("road_morf", "road_lerf", "deletion_auc",
                                          "insertion_auc"))
    row = {"method": "cam", "increase_in_confidence": 0.0, "average_drop": 1.0,
           "average_retention": 2.0, "average_drop_of_others": 3.0,
           "average_retention_of_others": 4.0, **m, "box_accuracy": None,
           "images_per_second": 5.0}
    assert "MoRF" in format_table([row]).splitlines()[0]


def test_explainer_makes_the_labelled_maps_again_only_for_images_that_need_them(tmp_path):
    """The seed and box maps take the image's labelled classes, the XAI metrics its
    detected ones: only an image whose detected classes differ from its labels has its
    maps made a second time, and they equal those of making every image's labelled maps
    (what the actor did before)."""
    import base64
    import json

    from ray_wsss.cams.explain import Explainer
    from ray_wsss.cams.methods import get_method
    from ray_wsss.config import ModelConfig
    from ray_wsss.data.codecs import decode_array, encode_image, encode_mask
    from ray_wsss.evaluate import ConfusionMatrix
    from ray_wsss.models.classifier import build_classifier, save_classifier
    from ray_wsss.refine.seeds import seed_sweep

    cfg = ModelConfig(backbone="resnet_mini", output_stride=16, pretrained=None)
    torch.manual_seed(1)
    save_classifier(build_classifier(cfg, 3, pretrained=False), cfg, str(tmp_path), "abc")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (32, 32, 3), np.uint8) for _ in range(3)]
    masks = [np.zeros((32, 32), np.uint8) for _ in range(3)]
    masks[0][4:20, 6:22] = 1
    masks[1][2:14, 2:30], masks[1][16:30, 8:24] = 2, 3
    masks[2][10:30, 10:30] = 1
    labels = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0]], np.uint8)
    batch = {"image_id": np.array(["a", "b", "c"], object),
             "image": np.array([encode_image(i) for i in images], object),
             "mask": np.array([encode_mask(m) for m in masks], object),
             "label_vector": labels}
    thresholds = [0.2, 0.4]
    ex = Explainer(str(tmp_path), ["cam", "gradcam"], (1.0,), False, thresholds, 4, True,
                   ["a", "b", "c"])
    # a and c: detected = labelled; b: class 2 of its labels {1, 2} not detected
    ex.maker.probs = lambda imgs: np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1],
                                            [0.9, 0.1, 0.1]], np.float32)[:len(imgs)]
    calls = []
    maps = ex.maker.maps

    def counting(fn, imgs, class_sets, *a, **k):
        calls.append([list(c) for c in class_sets])
        return maps(fn, imgs, class_sets, *a, **k)
    ex.maker.maps = counting
    out = ex(batch)
    assert calls == [[[0], [1], [0]], [[1, 2]]] * 2          # per method: all, then b only
    samples = {(i, m): decode_array(base64.b64decode(s))
               for i, m, s in json.loads(out["samples"][0])}
    labelled = [np.flatnonzero(v) for v in labels]
    for mi, name in enumerate(["cam", "gradcam"]):
        every = maps(get_method(name), images, labelled)[0]   # the old way: all again
        conf = np.zeros_like(out["confusion"][0, mi])
        for i, image_id in enumerate("abc"):
            assert samples[(image_id, name)].shape == (len(labelled[i]), 32, 32)
            np.testing.assert_allclose(samples[(image_id, name)], every[i], atol=2e-3)
            for t, seed in enumerate(seed_sweep(every[i], labelled[i] + 1, thresholds)):
                conf[t] += ConfusionMatrix(4).update(masks[i], seed).mat
        assert np.abs(out["confusion"][0, mi] - conf).sum() <= 4  # float16 / batch noise

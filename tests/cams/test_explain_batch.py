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

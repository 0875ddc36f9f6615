import numpy as np
import pytest

from ray_wsss.evaluate import ConfusionMatrix, average_precision


def test_miou_matches_a_hand_computed_case():
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 255, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 2],
                     [2, 0, 0, 1]], np.uint8)
    m = ConfusionMatrix(3).update(gt, pred).metrics(["bg", "a", "b"])
    # class 0: TP 3 (gt 0 at (0,0),(1,0),(1,1)), FP 1 ((2,1)), FN 1 ((0,1)) -> 3/5
    # class 1: TP 3, FP 1 ((0,1)), FN 1 ((1,3)) -> 3/5 (predictions under 255 ignored)
    # class 2: TP 1, FP 1 ((1,3)), FN 1 ((2,1)) -> 1/3
    assert m["per_class"]["bg"]["iou"] == pytest.approx(3 / 5)
    assert m["per_class"]["a"]["iou"] == pytest.approx(3 / 5)
    assert m["per_class"]["b"]["iou"] == pytest.approx(1 / 3)
    assert m["miou"] == pytest.approx((3 / 5 + 3 / 5 + 1 / 3) / 3)
    assert m["pixel_accuracy"] == pytest.approx(7 / 10)
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))


def test_predicted_ignore_counts_as_a_miss_and_absent_classes_are_left_out():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    pred = np.array([[1, 255, 0, 0]], np.uint8)
    m = ConfusionMatrix(4).update(gt, pred).metrics()
    assert m["per_class"]["1"]["iou"] == pytest.approx(0.5)  # FN, no FP elsewhere
    assert m["per_class"]["0"]["iou"] == pytest.approx(1.0)
    assert m["per_class"]["3"]["iou"] is None  # no gt, no prediction: not in the mean
    assert m["miou"] == pytest.approx(0.75)
    both = ConfusionMatrix(4).update(gt, pred) + ConfusionMatrix(4).update(gt, gt)
    assert both.mat.sum() == 8


def test_exclude_background_from_the_mean():
    gt = np.array([[1, 2, 0]], np.uint8)
    pred = np.array([[1, 1, 0]], np.uint8)
    m = ConfusionMatrix(3).update(gt, pred).metrics(exclude=(0,))
    assert "0" not in m["per_class"]
    assert m["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_average_precision_against_hand_computed_values():
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = np.array([[1], [0], [1], [0], [1]])
    # precision at each positive: 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3
    assert average_precision(scores, targets)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    tied = average_precision(np.array([[0.5], [0.5]]), np.array([[1], [0]]))
    assert tied[0] == pytest.approx(0.5)
    assert np.isnan(average_precision(np.array([[0.1]]), np.array([[0]]))[0])

"""Boxes from hand-built maps and masks, box accuracy on a hand-built case, the JSON
records."""
import json

import numpy as np
import pytest

from ray_wsss.cams.boxes import (box_iou, box_records, localisation_hits, map_box,
                                 mask_boxes, write_box_records)


def blob_map():
    """A strong blob at rows 2..5, cols 3..8 (6 x 4 pixels) and a weaker, smaller one
    apart; a faint level everywhere below the threshold."""
    m = np.full((12, 16), 0.1, np.float32)
    m[2:6, 3:9] = 1.0
    m[8:10, 12:14] = 0.6
    return m


def test_box_of_the_largest_region_above_the_threshold():
    m = blob_map()
    # min-max: 0.1 -> 0, 0.6 -> 0.56, 1 -> 1; both blobs pass 0.2, the larger one wins
    assert map_box(m) == (3, 2, 9, 6)
    assert map_box(m, threshold=0.6) == (3, 2, 9, 6)
    m[8:10, 12:16] = 0.6
    m[7:12, 12:16] = 0.6                           # now 5 x 4 = 20 < 24 pixels: still the first
    assert map_box(m) == (3, 2, 9, 6)
    m[6:12, 10:16] = 0.6                           # 36 pixels: the weaker region is larger
    assert map_box(m) == (10, 6, 16, 12)
    assert map_box(m, threshold=0.6) == (3, 2, 9, 6)  # above 0.6 only the strong blob
    diagonal = np.zeros((5, 5), np.float32)
    diagonal[[0, 1, 2], [0, 1, 2]] = 1.0           # 8-connected: one region
    assert map_box(diagonal) == (0, 0, 3, 3)
    assert map_box(np.zeros((4, 4), np.float32)) is None


def test_mask_boxes_are_the_components_of_the_class():
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:4] = 2                             # class 1 (value 2), two instances
    mask[6:9, 5:10] = 2
    mask[4, 4] = 1
    mask[0, :] = 255
    assert sorted(mask_boxes(mask, 2)) == [(1, 1, 4, 3), (5, 6, 10, 9)]
    assert mask_boxes(mask, 1) == [(4, 4, 5, 5)]
    assert mask_boxes(mask, 3) == []


def test_iou():
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)
    assert box_iou((0, 0, 2, 2), (3, 3, 5, 5)) == 0


def test_box_accuracy_on_a_hand_built_image():
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 3:9] = 1                             # class 0: the blob of blob_map
    mask[9:12, 0:4] = 1                            # ... and a second instance elsewhere
    mask[7:11, 10:16] = 3                          # class 2: a box the map misses
    good = blob_map()                              # exact box on the first instance
    shifted = np.roll(blob_map(), 3, axis=1)       # (6, 2, 12, 6): IoU 12/36 < 0.5
    near = np.roll(blob_map(), 1, axis=1)          # IoU 20/28 >= 0.5
    miss = np.zeros((12, 16), np.float32)
    miss[0:2, 0:2] = 1
    maps = np.stack([good, miss, miss])
    # class 1 has no pixels in the mask: not counted
    assert localisation_hits(maps, [0, 1, 2], mask) == (1, 2)
    assert localisation_hits(np.stack([shifted]), [0], mask) == (0, 1)
    assert localisation_hits(np.stack([near]), [0], mask) == (1, 1)
    assert localisation_hits(np.stack([near]), [0], mask, iou=0.75) == (0, 1)
    assert localisation_hits(np.zeros((1, 12, 16), np.float32), [0], mask) == (0, 1)


def test_records_and_their_json(tmp_path):
    maps = np.stack([blob_map(), np.zeros((12, 16), np.float32)])
    records = box_records("img7", maps, [0, 2], ["cat", "dog", "cow"],
                          scores=np.array([0.9, 0.1, 0.4], np.float32))
    assert records == [
        {"image_id": "img7", "class": "cat", "box": [3, 2, 9, 6], "score": pytest.approx(0.9)},
        {"image_id": "img7", "class": "cow", "box": None, "score": pytest.approx(0.4)}]
    path = str(tmp_path / "boxes" / "boxes.json")
    assert write_box_records(iter(records), path) == 2
    with open(path) as fh:
        assert json.load(fh)[0]["box"] == [3, 2, 9, 6]

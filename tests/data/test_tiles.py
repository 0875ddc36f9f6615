"""Tiles at import (ray_wsss/data/tiles.py and the importers' tiling options), and the
label statistics every import records."""
import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_wsss.data import importers
from ray_wsss.data.codecs import IGNORE_INDEX, decode_image, decode_mask, encode_image
from ray_wsss.data.dataset import (COLUMNS, TILE_COLUMNS, DatasetInfo, check_columns,
                                   crowded_class_warnings, label_statistics, parquet_files,
                                   read_tiling)
from ray_wsss.data.tiles import (frame_size, group_by_parent, parse_tile_id, stitch,
                                 tile_boxes, tile_boxes_by_size, tile_id, tile_tags)
from ray_wsss.errors import ConfigError, DataError


def _rows(path):
    return {r["image_id"]: r for r in pq.read_table(parquet_files(path)).to_pylist()}


def _coverage(boxes, h, w):
    seen = np.zeros((h, w), np.int32)
    for _, _, (y0, x0, y1, x1) in boxes:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        seen[y0:y1, x0:x1] += 1
    return seen


# ---------------------------------------------------------------- pure functions

def test_tile_ids_are_stable_unique_and_parse_back():
    assert tile_id("0001TP_006690", 2, 1) == "0001TP_006690@r2c1"
    assert tile_id("a", 0, 0) == tile_id("a", 0, 0)
    ids = [tile_id(p, i, j) for p in ("a", "a@r1c1", "a.b", "b") for i in range(12)
           for j in range(12)]
    assert len(set(ids)) == len(ids)
    assert parse_tile_id("a@r1c1@r10c3") == ("a@r1c1", 10, 3)
    assert parse_tile_id("photo.v2@r0c11") == ("photo.v2", 0, 11)
    assert parse_tile_id("plain") is None and parse_tile_id("x@rc1") is None


@pytest.mark.parametrize("h,w,rows,cols", [(7, 5, 3, 2), (360, 480, 3, 3), (13, 17, 4, 5),
                                           (10, 10, 1, 1), (5, 9, 5, 9)])
def test_grid_boxes_cover_the_frame_exactly_once(h, w, rows, cols):
    boxes = tile_boxes(h, w, rows, cols)
    assert [(i, j) for i, j, _ in boxes] == [(i, j) for i in range(rows) for j in range(cols)]
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for _, _, b in boxes) == h * w
    assert np.all(_coverage(boxes, h, w) == 1)  # no gap, no overlap
    heights = {b[2] - b[0] for _, _, b in boxes}
    assert max(heights) - min(heights) <= 1  # an even split


@pytest.mark.parametrize("h,w,th,tw", [(360, 480, 160, 200), (7, 5, 3, 2), (100, 100, 100, 100),
                                       (101, 33, 50, 64)])
def test_size_boxes_cover_the_frame_and_respect_the_size(h, w, th, tw):
    boxes = tile_boxes_by_size(h, w, th, tw)
    assert np.all(_coverage(boxes, h, w) == 1)
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for _, _, b in boxes) == h * w
    assert all(b[2] - b[0] <= th and b[3] - b[1] <= tw for _, _, b in boxes)
    # 360 high at 160: 3 rows of 120, not 160 + 160 + 40
    if (h, th) == (360, 160):
        assert {b[2] - b[0] for _, _, b in boxes} == {120}


def test_a_frame_smaller_than_the_grid_is_refused():
    with pytest.raises(ValueError, match="cannot be cut into 3x3"):
        tile_boxes(2, 10, 3, 3)


def test_tile_tags_equal_a_direct_count():
    rng = np.random.default_rng(3)
    for trial in range(20):
        mask = rng.choice([0, 1, 2, 3, 4, IGNORE_INDEX], size=(23, 31),
                          p=[0.5, 0.3, 0.1, 0.05, 0.004, 0.046]).astype(np.uint8)
        threshold = [0.0, 0.005, 0.01, 0.05, 0.2][trial % 5]
        labelled = np.sum(mask != IGNORE_INDEX)
        expected = [c for c in range(1, 5) if np.sum(mask == c) > 0
                    and np.sum(mask == c) / labelled >= threshold]
        assert tile_tags(mask, threshold, 4) == expected
    # a class on exactly the threshold is a tag; nothing labelled gives no tag
    m = np.zeros((10, 10), np.uint8)
    m[0, 0] = 2
    assert tile_tags(m, 0.01, 3) == [2] and tile_tags(m, 0.011, 3) == []
    assert tile_tags(np.full((4, 4), IGNORE_INDEX, np.uint8), 0.01, 3) == []
    with pytest.raises(ValueError, match="no background"):
        tile_tags(np.zeros((2, 2), np.uint8), 0.01, 3, background=False)


def test_stitching_the_tiles_of_a_mask_gives_it_back_bit_for_bit():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 256, (37, 53)).astype(np.uint8)
    for boxes in (tile_boxes(37, 53, 3, 4), tile_boxes_by_size(37, 53, 10, 20)):
        parts = [(b, mask[b[0]:b[2], b[1]:b[3]].copy()) for _, _, b in boxes]
        out = stitch(parts[::-1], 37, 53)  # any order
        assert out.dtype == mask.dtype and np.array_equal(out, mask)
    image = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    parts = [(b, image[b[0]:b[2], b[1]:b[3]]) for _, _, b in tile_boxes(37, 53, 2, 2)]
    assert np.array_equal(stitch(parts, 37, 53), image)
    # a missing tile is "ignore"
    out = stitch(parts[:3], 37, 53, fill=0)
    y0, x0, y1, x1 = tile_boxes(37, 53, 2, 2)[3][2]
    assert np.all(out[y0:y1, x0:x1] == 0)
    with pytest.raises(ValueError, match="does not fit its box"):
        stitch([((0, 0, 2, 2), np.zeros((3, 2), np.uint8))], 4, 4)


def test_group_by_parent_orders_tiles_and_keeps_untiled_rows_alone():
    rows = [
        {"image_id": "a@r1c0", "parent_id": "a", "tile_box": [5, 0, 10, 4], "parent_size": [10, 8]},
        {"image_id": "solo", "parent_id": None, "tile_box": None, "height": 3, "width": 4},
        {"image_id": "a@r0c1", "parent_id": "a", "tile_box": [0, 4, 5, 8], "parent_size": [10, 8]},
        {"image_id": "a@r0c0", "parent_id": "a", "tile_box": [0, 0, 5, 4], "parent_size": [10, 8]},
    ]
    groups = group_by_parent(rows)
    assert list(groups) == ["a", "solo"]
    assert [r["image_id"] for r in groups["a"]] == ["a@r0c0", "a@r0c1", "a@r1c0"]
    assert frame_size(groups["a"]) == (10, 8) and frame_size(groups["solo"]) == (3, 4)
    no_size = [{k: v for k, v in r.items() if k != "parent_size"} for r in groups["a"]]
    assert frame_size(no_size) == (10, 8)


def test_label_statistics_and_the_crowded_class_warning():
    info = DatasetInfo(("road", "car", "bike"))
    stats = label_statistics({"train": 40, "val": 4},
                             {"train": np.array([39, 20, 0]), "val": np.array([4, 4, 4])}, info)
    assert stats["train"] == {"rows": 40, "share": {"road": 0.975, "car": 0.5, "bike": 0.0}}
    assert stats["val"]["share"]["bike"] == 1.0
    assert crowded_class_warnings(stats, "train") == [
        "class road is in 98% of the train images: its CAM will not localise; "
        "consider --tiles"]
    assert crowded_class_warnings(stats, "nosuchsplit") == []
    assert "smaller tiles" in crowded_class_warnings(stats, "train", tiled=True)[0]


# ---------------------------------------------------------------- imports

def _folder_with_masks(tmp_path, n=2, h=30, w=41):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(1)
    truth = {}
    for k in range(n):
        (images / f"im{k}.png").write_bytes(encode_image(rng.integers(0, 255, (h, w, 3),
                                                                      np.uint8)))
        # at 30x41 in 2x2 tiles (rows 0-15-30, columns 0-20-41): class 1 in every tile
        # (4.8% of the bottom-right one), class 2 in the bottom-right tile and one pixel
        # (1 of 315: 0.3%) in the top-right one
        m = np.zeros((h, w), np.uint8)
        m[:18, :25] = 1
        m[20:, 30:] = 2
        m[0, w - 1] = 2
        m[h - 1, 0] = IGNORE_INDEX
        Image.fromarray(m).save(masks / f"im{k}.png")
        truth[f"im{k}"] = m
    return images, masks, truth


def test_a_2x2_tiled_import_gives_four_rows_per_image_with_their_box_and_mask(tmp_path):
    images, masks, truth = _folder_with_masks(tmp_path)
    out = str(tmp_path / "ds")
    result = importers.import_folder([("train", str(images), str(masks))], out,
                                     classes=["a", "b"],
                                     opts=importers.ImportOptions(tiles=(2, 2)))
    rows = _rows(out)
    assert result.counts == {"train": 8} and result.tiles == 8 and not result.skipped_tiles
    assert sorted(rows) == sorted(tile_id(f"im{k}", i, j) for k in range(2)
                                  for i in range(2) for j in range(2))
    originals = {f"im{k}": decode_image((images / f"im{k}.png").read_bytes()) for k in range(2)}
    for image_id, row in rows.items():
        parent, i, j = parse_tile_id(image_id)
        y0, x0, y1, x1 = row["tile_box"]
        assert row["parent_id"] == parent and row["parent_size"] == [30, 41]
        assert (y0, x0, y1, x1) == tile_boxes(30, 41, 2, 2)[2 * i + j][2]
        assert (row["height"], row["width"]) == (y1 - y0, x1 - x0)
        assert np.array_equal(decode_mask(row["mask"]), truth[parent][y0:y1, x0:x1])
        assert np.array_equal(decode_image(row["image"]), originals[parent][y0:y1, x0:x1])
    # tags from the masks: the top-right tile's 1 pixel of class 2 (0.3%) is no tag
    assert rows["im0@r0c0"]["labels"] == [1] and rows["im0@r1c1"]["labels"] == [1, 2]
    assert rows["im0@r0c1"]["labels"] == [1] and rows["im0@r1c0"]["labels"] == [1]
    # stitched tiles give back the mask bit for bit
    for parent, group in group_by_parent(rows.values()).items():
        frame = stitch([(r["tile_box"], decode_mask(r["mask"])) for r in group],
                       *frame_size(group))
        assert np.array_equal(frame, truth[parent])
    schema = pq.read_schema(parquet_files(out)[0])
    assert set(schema.names) == set(COLUMNS) | set(TILE_COLUMNS)
    check_columns(out)  # readers that need only the old columns still work
    assert read_tiling(out) == {"grid": [2, 2], "splits": None, "tags": "masks",
                                "min_fraction": 0.01, "tiles": 8, "skipped_tiles": 0}


def test_tiles_without_a_class_are_skipped_and_counted(tmp_path):
    images, masks, _ = _folder_with_masks(tmp_path, n=1, h=20, w=20)
    m = np.zeros((20, 20), np.uint8)
    m[:10, :10] = 1
    Image.fromarray(m).save(masks / "im0.png")  # three tiles of background only
    result = importers.import_folder([("train", str(images), str(masks))],
                                     str(tmp_path / "ds"), classes=["a"],
                                     opts=importers.ImportOptions(tiles=(2, 2)))
    assert result.counts == {"train": 1}
    assert sorted(result.skipped_tiles) == ["im0@r0c1", "im0@r1c0", "im0@r1c1"]
    assert read_tiling(str(tmp_path / "ds"))["skipped_tiles"] == 3


def test_tile_size_and_tile_splits(tmp_path):
    images, masks, _ = _folder_with_masks(tmp_path, n=1, h=30, w=41)
    out = str(tmp_path / "ds")
    result = importers.import_folder(
        [("train", str(images), str(masks)), ("val", str(images), str(masks))], out,
        classes=["a", "b"],
        opts=importers.ImportOptions(tile_size=(16, 16), tile_splits=("train",)))
    rows = _rows(out)  # the same image, tiled in train and whole in val
    assert rows["im0"]["parent_id"] is None and rows["im0"]["tile_box"] is None
    tiles = [r for r in rows.values() if r["parent_id"] == "im0"]
    # 30 / 16 -> 2 rows of 15, 41 / 16 -> 3 columns of 13-14
    assert len(tiles) + len(result.skipped_tiles) == 2 * 3 and result.tiles == len(tiles)
    assert {r["height"] for r in tiles} == {15} and {r["width"] for r in tiles} <= {13, 14}
    assert read_tiling(out)["tile_size"] == [16, 16]


def test_user_written_tile_tags_are_read(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.b.png").write_bytes(encode_image(np.zeros((20, 20, 3), np.uint8)))
    tags = tmp_path / "tags.csv"
    with open(tags, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([("image", "labels"), ("a.b@r0c0", "cat"), ("a.b@r0c1", "dog;cat"),
                     ("a.b@r1c0", "2"), ("a.b@r1c1", "")])
    out = str(tmp_path / "ds")
    result = importers.import_folder([("train", str(images), None)], out,
                                     classes=["cat", "dog"],
                                     opts=importers.ImportOptions(tiles=(2, 2),
                                                                  tile_tags=str(tags)))
    rows = _rows(out)
    assert {k: r["labels"] for k, r in rows.items()} == {
        "a.b@r0c0": [1], "a.b@r0c1": [1, 2], "a.b@r1c0": [2]}
    assert result.skipped_tiles == ["a.b@r1c1"] and rows["a.b@r0c0"]["mask"] is None
    tiling = read_tiling(out)
    assert tiling["tags"] == "csv" and tiling["tags_csv"] == str(tags)
    # a tile the CSV forgets, and a row naming a tile the grid does not make
    tags.write_text("image,labels\na.b@r0c0,cat\n")
    with pytest.raises(DataError, match=r"tile a\.b@r0c1 has no row in the tile tags CSV"):
        importers.import_folder([("train", str(images), None)], str(tmp_path / "x"),
                                classes=["cat", "dog"],
                                opts=importers.ImportOptions(tiles=(2, 2), tile_tags=str(tags)))
    tags.write_text("image,labels\na.b@r0c0,cat\na.b@r0c1,cat\na.b@r1c0,cat\na.b@r1c1,cat\n"
                    "a.b@r2c0,cat\n")
    with pytest.raises(DataError, match=r"tags\.csv: the tile tags CSV names 1 tile\(s\) .*"
                                        r"'a\.b@r2c0'"):
        importers.import_folder([("train", str(images), None)], str(tmp_path / "x"),
                                classes=["cat", "dog"],
                                opts=importers.ImportOptions(tiles=(2, 2), tile_tags=str(tags)))
    assert not (tmp_path / "x").exists()


def test_tiling_options_are_checked(tmp_path):
    images, masks, _ = _folder_with_masks(tmp_path, n=1)
    for opts, match in [(importers.ImportOptions(tiles=(2, 2), tile_size=(8, 8)), "exclude"),
                        (importers.ImportOptions(tile_tags="t.csv"), "need tiles"),
                        (importers.ImportOptions(tiles=(2, 2), tile_min_fraction=2.0),
                         "tile_min_fraction")]:
        with pytest.raises(ConfigError, match=match):
            importers.import_folder([("train", str(images), str(masks))],
                                    str(tmp_path / "ds"), classes=["a", "b"], opts=opts)
    with pytest.raises(DataError, match=r"im0\.png: row im0: tiles are tagged from masks"):
        importers.import_folder([("train", str(images), None)], str(tmp_path / "ds"),
                                classes=["a", "b"], opts=importers.ImportOptions(tiles=(2, 2)))


def test_label_statistics_at_import_and_the_cli_warning(tmp_path, capsys):
    from ray_wsss.cli import main

    images = tmp_path / "images"
    images.mkdir()
    lines = ["image,labels"]
    for k in range(20):
        (images / f"p{k}.png").write_bytes(encode_image(np.full((8, 8, 3), k, np.uint8)))
        lines.append(f"p{k}.png,{'road;car' if k % 2 else 'road'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    assert main(["import", "folder", str(images), "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rows holding each class, train (20 rows):" in printed
    assert "car 50%, road 100%" in printed
    assert ("warning: class road is in 100% of the train images: its CAM will not localise; "
            "consider --tiles") in printed
    meta = json.loads((out / "classes.json").read_text())
    assert meta["label_stats"] == {"train": {"rows": 20, "share": {"car": 0.5, "road": 1.0}}}
    assert meta["warnings"] == [printed.split("warning: ")[1].strip()]
    assert "tiling" not in meta and meta["orientation"] == "stored"
    assert set(pq.read_schema(parquet_files(str(out))[0]).names) == set(COLUMNS)


def test_cli_tiles_flag(tmp_path, capsys):
    from ray_wsss.cli import main

    images, masks, _ = _folder_with_masks(tmp_path, n=2)
    out = tmp_path / "ds"
    assert main(["import", "folder", str(images), "--masks", str(masks), "--classes", "a,b",
                 "--tiles", "2x2", "--tile-min-fraction", "0.0005", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imported 8 train rows" in printed and "tiles: 8 written, 0 skipped" in printed
    # 1 pixel of 315 (0.3%) is above 0.05%: the top-right tile now holds class 2 too
    assert _rows(str(out))["im0@r0c1"]["labels"] == [1, 2]
    assert read_tiling(str(out))["min_fraction"] == 0.0005
    with pytest.raises(SystemExit):
        main(["import", "folder", str(images), "--tiles", "3by3", "--out", str(out)])
    assert "--tiles '3by3': expected ROWSxCOLS" in capsys.readouterr().err

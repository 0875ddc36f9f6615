"""Importers on the real fixtures in ../shared/data, and every bad-input error."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_wsss.data import importers
from ray_wsss.data.codecs import decode_mask, encode_image
from ray_wsss.data.dataset import COLUMNS, parquet_files, read_info
from ray_wsss.errors import DataError

from ..conftest import data_dir


def _rows(path):
    table = pq.read_table(parquet_files(path))
    return {r["image_id"]: r for r in table.to_pylist()}


def test_voc_importer_labels_equal_the_classes_in_the_masks(tmp_path):
    root = data_dir("voc_sample")
    out = tmp_path / "voc"
    result = importers.import_voc(root, str(out))
    assert result.counts == {"train": 3}
    rows = _rows(str(out))
    # the known classes of the three photos (SOURCE.md): bottle+person, chair+person+sofa,
    # bus+car
    assert rows["2011_000003"]["labels"] == [5, 15]
    assert rows["2011_000006"]["labels"] == [9, 15, 18]
    assert rows["2011_000025"]["labels"] == [6, 7]
    for image_id, row in rows.items():
        with Image.open(f"{root}/SegmentationClass/{image_id}.png") as im:
            ref = np.array(im)
        assert np.array_equal(decode_mask(row["mask"]), ref)
        assert (row["height"], row["width"]) == ref.shape
        assert row["label_vector"] == [1 if c + 1 in row["labels"] else 0 for c in range(20)]
        with open(f"{root}/JPEGImages/{image_id}.jpg", "rb") as fh:
            assert row["image"] == fh.read()  # the encoded file as it came
    info = read_info(str(out))
    assert info.classes[14] == "person" and info.background
    assert set(pq.read_schema(parquet_files(str(out))[0]).names) == set(COLUMNS)


def test_voc12_sample_splits_and_mixed_extensions(tmp_path):
    root = data_dir("voc12_sample")
    result = importers.import_voc(root, str(tmp_path / "voc12"))
    assert result.counts == {"train": 6, "val": 23}
    rows = _rows(str(tmp_path / "voc12"))
    per_class = np.zeros(21, int)
    for row in rows.values():
        per_class[row["labels"]] += 1
    assert per_class[15] == 15 and per_class[8] == 4  # person 15 images, cat 4 (SOURCE.md)
    assert sum(per_class > 0) == 16


def test_folder_importer_on_camvid_with_masks_offset_and_void(tmp_path):
    root = data_dir("camvid")
    ids = tmp_path / "ids.txt"
    names = sorted(os.listdir(f"{root}/val"))[:4]
    ids.write_text("\n".join(os.path.splitext(n)[0] for n in names))
    classes = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
               "Car", "Pedestrian", "Bicyclist"]
    result = importers.import_folder(
        [("val", f"{root}/val", f"{root}/valannot")], str(tmp_path / "cv"),
        classes=classes, background=False, ids_files=[str(ids)],
        opts=importers.ImportOptions(mask_offset=1, ignore_values=(11,)))
    assert result.counts == {"val": 4}
    rows = _rows(str(tmp_path / "cv"))
    for name in names:
        raw = np.array(Image.open(f"{root}/valannot/{name}"))
        row = rows[os.path.splitext(name)[0]]
        mask = decode_mask(row["mask"])
        assert np.array_equal(mask == 255, raw == 11)
        assert np.array_equal(mask[raw != 11], raw[raw != 11] + 1)
        assert row["labels"] == sorted(int(v) + 1 for v in np.unique(raw) if v != 11)
        assert 0 not in mask
    assert read_info(str(tmp_path / "cv")).background is False


def _folder(tmp_path, n=3, size=(24, 32)):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (*size, 3), np.uint8)
        (img_dir / f"im{i}.png").write_bytes(encode_image(img))
    return img_dir


def _csv(path, rows, header=("image", "labels")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_folder_importer_with_labels_csv_by_name(tmp_path):
    img_dir = _folder(tmp_path)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "cat;dog"), ("im1.png", "dog"),
                                       ("im2.png", "bird dog")])
    result = importers.import_folder([("train", str(img_dir), None)], str(tmp_path / "ds"),
                                     labels_csv=labels)
    rows = _rows(str(tmp_path / "ds"))
    assert read_info(str(tmp_path / "ds")).classes == ("bird", "cat", "dog")
    assert rows["im0"]["labels"] == [2, 3] and rows["im2"]["labels"] == [1, 3]
    assert rows["im1"]["mask"] is None
    assert result.counts == {"train": 3}


# ---------------------------------------------------------------- bad input

def _expect_error(tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as err:
        importers.import_folder(out=str(out), **kwargs)
    assert not out.exists(), "a failed import must not leave a dataset"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-out")]
    return err.value


def test_unreadable_image_names_the_file(tmp_path):
    img_dir = _folder(tmp_path)
    (img_dir / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    labels = _csv(tmp_path / "l.csv", [(f"im{i}.png", "a") for i in range(3)])
    err = _expect_error(tmp_path, r"im1\.png: cannot decode image",
                        subsets=[("train", str(img_dir), None)], labels_csv=labels)
    assert err.path.endswith("im1.png")


def test_truncated_jpeg_is_caught(tmp_path):
    img_dir = _folder(tmp_path, n=1)
    jpg = encode_image(np.full((64, 64, 3), 120, np.uint8), ".jpg")
    (img_dir / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    labels = _csv(tmp_path / "l.csv", [("im0.png", "a"), ("cut.jpg", "a")])
    _expect_error(tmp_path, r"cut\.jpg: cannot decode image",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels)


def test_mask_size_mismatch_names_the_mask(tmp_path):
    img_dir = _folder(tmp_path, n=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "im0.png")
    _expect_error(tmp_path, r"masks/im0\.png.*mask is 10x10 but its image .* is 32x24",
                  subsets=[("train", str(img_dir), str(masks))], classes=["a", "b"])


def test_mask_value_beyond_the_classes(tmp_path):
    img_dir = _folder(tmp_path, n=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((24, 32), np.uint8)
    m[3, 3] = 7
    Image.fromarray(m).save(masks / "im0.png")
    _expect_error(tmp_path, r"im0\.png.*value 7, beyond the 2 classes",
                  subsets=[("train", str(img_dir), str(masks))], classes=["a", "b"])


def test_label_out_of_range_names_the_row(tmp_path):
    img_dir = _folder(tmp_path, n=2)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "1"), ("im1.png", "5")])
    _expect_error(tmp_path, r"im1\.png: row im1: label 5 out of range 1\.\.2",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels,
                  classes=["a", "b"])


def test_unknown_class_name_names_the_csv_line(tmp_path):
    img_dir = _folder(tmp_path, n=2)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "a"), ("im1.png", "zebra")])
    _expect_error(tmp_path, r"l\.csv: row 3: unknown class 'zebra'",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels,
                  classes=["a", "b"])


def test_duplicate_image_id(tmp_path):
    img_dir = _folder(tmp_path, n=1)
    other = tmp_path / "other"
    shutil.copytree(img_dir, other)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "a")])
    _expect_error(tmp_path, r"duplicate image_id 'im0'",
                  subsets=[("train", str(img_dir), None), ("val", str(other), None)],
                  labels_csv=labels)


def test_empty_label_list(tmp_path):
    img_dir = _folder(tmp_path, n=2)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "a"), ("im1.png", "")])
    _expect_error(tmp_path, r"im1\.png: row im1: empty label list",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels)


def test_skip_bad_reports_and_keeps_the_good_rows(tmp_path):
    img_dir = _folder(tmp_path, n=4)
    (img_dir / "im1.png").write_bytes(b"")
    labels = _csv(tmp_path / "l.csv", [("im0.png", "a"), ("im1.png", "a"), ("im2.png", ""),
                                       ("im3.png", "a;b")])
    result = importers.import_folder([("train", str(img_dir), None)], str(tmp_path / "ds"),
                                     labels_csv=labels,
                                     opts=importers.ImportOptions(skip_bad=True))
    assert result.counts == {"train": 2}
    reasons = {s["image_id"]: s["reason"] for s in result.skipped}
    assert reasons == {"im1": "empty image file (0 bytes)",
                       "im2": "empty label list (every image needs at least one class)"}
    meta = json.loads((tmp_path / "ds" / "classes.json").read_text())
    assert len(meta["skipped"]) == 2 and meta["counts"] == {"train": 2}
    assert sorted(_rows(str(tmp_path / "ds"))) == ["im0", "im3"]


def test_existing_dataset_is_never_overwritten_by_accident(tmp_path):
    img_dir = _folder(tmp_path, n=1)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "a")])
    out = str(tmp_path / "ds")
    importers.import_folder([("train", str(img_dir), None)], out, labels_csv=labels)
    before = _rows(out)
    with pytest.raises(DataError, match="already exists"):
        importers.import_folder([("train", str(img_dir), None)], out, labels_csv=labels)
    assert _rows(out) == before


# ---------------------------------------------------------------- COCO

def _rle_encode_string(mask: np.ndarray) -> str:
    """Reference encoder (the COCO API's column-major RLE + LEB128-like string),
    written independently of the importer's decoder."""
    flat = mask.T.flatten()
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_coco_importer_polygons_rle_and_crowd(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes(encode_image(np.zeros((40, 60, 3), np.uint8), ".jpg"))
    rle_mask = np.zeros((40, 60), np.uint8)
    rle_mask[5:15, 40:55] = 1
    crowd = np.zeros((40, 60), np.uint8)
    crowd[30:35, 0:10] = 1
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 200,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 150,
             "segmentation": {"size": [40, 60], "counts": _rle_encode_string(rle_mask)}},
            {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 50,
             "segmentation": {"size": [40, 60], "counts": _rle_encode_string(crowd)}},
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    importers.import_coco([("val", str(ann), str(img_dir))], str(tmp_path / "ds"))
    row = _rows(str(tmp_path / "ds"))["a"]
    assert read_info(str(tmp_path / "ds")).classes == ("person", "dog")  # by category id
    assert row["labels"] == [1, 2]
    mask = decode_mask(row["mask"])
    assert (mask == 2).sum() == rle_mask.sum() and np.all(mask[5:15, 40:55] == 2)
    assert np.all(mask[30:35, 0:10] == 255)
    assert np.all(mask[11:30, 11:30] == 1) and mask[0, 0] == 0


def test_a_re_import_into_the_same_folder_makes_runs_that_read_it_stale(tmp_path):
    from ray_wsss.config import load_config
    from ray_wsss.run import Run

    img_dir = _folder(tmp_path)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "cat"), ("im1.png", "dog"),
                                       ("im2.png", "dog")])
    out = str(tmp_path / "ds")
    importers.import_folder([("train", str(img_dir), None)], out, labels_csv=labels)
    cfg = load_config(None, ["data.source=parquet", f"data.path={out}",
                             f"run_dir={tmp_path / 'run'}"])
    first = {s: Run(cfg).current_hash(s) for s in ("dataset", "classifier", "crf")}
    assert first == {s: Run(cfg).current_hash(s) for s in first}        # stable
    importers.import_folder([("train", str(img_dir), None)], out, labels_csv=labels,
                            opts=importers.ImportOptions(overwrite=True))
    again = {s: Run(cfg).current_hash(s) for s in first}
    assert all(again[s] != first[s] for s in first)
    assert len(json.loads((tmp_path / "ds" / "classes.json").read_text())["dataset_id"]) == 32


# ---------------------------------------------------------------- hostile names and lists

def _coco_with_file_name(tmp_path, file_name):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes(encode_image(np.zeros((40, 60, 3), np.uint8), ".jpg"))
    # a readable image outside the images folder: the import must not reach it
    (tmp_path / "outside.jpg").write_bytes(encode_image(np.zeros((40, 60, 3), np.uint8),
                                                        ".jpg"))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
                       {"id": 2, "file_name": file_name, "height": 40, "width": 60}],
            "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "iscrowd": 0,
                             "area": 100, "segmentation": [[1, 1, 20, 1, 20, 20, 1, 20]]}
                            for k in (1, 2)]}
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    return ann, img_dir


@pytest.mark.parametrize("file_name", ["../outside.jpg", "sub/../../outside.jpg", "ABSOLUTE"])
def test_a_coco_file_name_outside_the_images_folder_is_refused(tmp_path, file_name):
    if file_name == "ABSOLUTE":
        file_name = str(tmp_path / "outside.jpg")
    ann, img_dir = _coco_with_file_name(tmp_path, file_name)
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=rf"instances\.json: file_name '{re.escape(file_name)}' "
                                        r"points outside the images folder"):
        importers.import_coco([("val", str(ann), str(img_dir))], str(out))
    assert not out.exists()


def test_a_coco_file_name_in_a_sub_folder_is_fine(tmp_path):
    ann, img_dir = _coco_with_file_name(tmp_path, "sub/b.jpg")
    (img_dir / "sub").mkdir()
    (img_dir / "sub" / "b.jpg").write_bytes((img_dir / "a.jpg").read_bytes())
    result = importers.import_coco([("val", str(ann), str(img_dir))], str(tmp_path / "ds"))
    assert result.counts == {"val": 2} and "sub/b" in _rows(str(tmp_path / "ds"))


def test_class_names_that_differ_only_in_case_are_refused(tmp_path):
    img_dir = _folder(tmp_path, n=2)
    labels = _csv(tmp_path / "l.csv", [("im0.png", "Car"), ("im1.png", "car")])
    _expect_error(tmp_path, r"l\.csv: class names 'Car' and 'car' differ only in case",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels)
    labels = _csv(tmp_path / "l2.csv", [("im0.png", "1"), ("im1.png", "2")])
    _expect_error(tmp_path, r"class names 'A' and 'a' differ only in case",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels,
                  classes="A,a")
    (tmp_path / "c").mkdir()
    ann, images = _coco_with_file_name(tmp_path / "c", "a.jpg")
    coco = json.loads(ann.read_text())
    coco["images"] = coco["images"][:1]
    coco["categories"] = [{"id": 1, "name": "Dog"}, {"id": 2, "name": "dog"}]
    ann.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"instances\.json: class names 'Dog' and 'dog' differ"):
        importers.import_coco([("val", str(ann), str(images))], str(tmp_path / "cds"))


def test_a_header_only_labels_csv_says_it_has_no_rows(tmp_path):
    img_dir = _folder(tmp_path, n=1)
    labels = _csv(tmp_path / "l.csv", [])
    _expect_error(tmp_path, r"l\.csv: labels CSV has no rows",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels)
    _expect_error(tmp_path, r"l\.csv: labels CSV has no rows",
                  subsets=[("train", str(img_dir), None)], labels_csv=labels, classes="a,b")

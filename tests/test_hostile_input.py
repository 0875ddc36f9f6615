"""Hostile input, table-driven: each case is either refused with an error naming the file
or row, or handled; and no finished output is ever corrupted by it."""
import hashlib
import io
import os
import struct
import zlib

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_wsss.config import CrfConfig, ModelConfig
from ray_wsss.data import importers
from ray_wsss.data.codecs import decode_image, decode_mask, encode_image, image_size
from ray_wsss.data.dataset import check_columns, parquet_files
from ray_wsss.errors import DataError


def png(arr, mode=None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(out, format="PNG")
    return out.getvalue()


def rgb(h=32, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)


def truncated_jpeg():
    data = encode_image(rgb(64, 64), ".jpg")
    return data[: len(data) // 2]


def png_without_end():
    """A PNG cut before its IEND chunk: Pillow loads it, OpenCV (training) does not."""
    data = png(rgb(64, 80))
    return data[:-12]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def claims(w: int, h: int) -> bytes:
    """A few hundred bytes whose PNG header claims w x h pixels (1-bit grey)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(bytes(1 + w // 8) * 50, 9))
            + png_chunk(b"IEND", b""))


def png16():
    ok, buf = cv2.imencode(".png", (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16))
    return buf.tobytes()


# name, file content, expected: ("error", regex) or ("ok", (h, w))
IMAGE_CASES = [
    ("truncated.jpg", truncated_jpeg, ("error", r"truncated\.jpg: cannot decode image")),
    # accepted by the import's Pillow check before, refused by training's OpenCV decode
    ("no_end.png", png_without_end, ("error", r"no_end\.png: cannot decode image")),
    ("bomb.png", lambda: claims(25000, 25000),
     ("error", r"bomb\.png: image claims 25000x25000 pixels \(625 megapixels, a \d+-byte "
               r"file\), over the limit of 200 megapixels")),
    ("empty.png", lambda: b"", ("error", r"empty\.png: empty image file \(0 bytes\)")),
    ("text.png", lambda: b"hello, I am not a picture", ("error", r"text\.png: cannot decode")),
    ("alpha.png", lambda: png(np.dstack([rgb(), np.full((32, 40), 128, np.uint8)]), "RGBA"),
     ("ok", (32, 40))),
    ("deep.png", png16, ("ok", (32, 40))),
    ("gray.png", lambda: png(rgb()[..., 0]), ("ok", (32, 40))),
    ("dot.png", lambda: png(rgb(1, 1)), ("ok", (1, 1))),
]


@pytest.mark.parametrize("name,content,expected", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_files(tmp_path, name, content, expected):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(encode_image(rgb()))
    (images / name).write_bytes(content())
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image,labels\ngood.png,a\n{name},b\n")
    out = tmp_path / "ds"
    kind, detail = expected
    if kind == "error":
        with pytest.raises(DataError, match=detail):
            importers.import_folder([("train", str(images), None)], str(out),
                                    labels_csv=str(labels))
        assert not out.exists()
        result = importers.import_folder([("train", str(images), None)], str(out),
                                         labels_csv=str(labels),
                                         opts=importers.ImportOptions(skip_bad=True))
        assert result.counts == {"train": 1} and len(result.skipped) == 1
    else:
        importers.import_folder([("train", str(images), None)], str(out),
                                labels_csv=str(labels))
        row = {r["image_id"]: r for r in pq.read_table(parquet_files(str(out))).to_pylist()}
        stem = os.path.splitext(name)[0]
        img = decode_image(row[stem]["image"])
        assert img.shape == (*detail, 3) and img.dtype == np.uint8
        assert (row[stem]["height"], row[stem]["width"]) == detail


def test_mask_value_beyond_the_class_count(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    (images / "a.png").write_bytes(encode_image(rgb()))
    m = np.zeros((32, 40), np.uint8)
    m[5, 5] = 9
    Image.fromarray(m).save(masks / "a.png")
    with pytest.raises(DataError, match=r"masks/a\.png: row a: mask holds value 9, beyond"):
        importers.import_folder([("val", str(images), str(masks))], str(tmp_path / "ds"),
                                classes=["x", "y"])


def test_labels_naming_an_unknown_class(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_image(rgb()))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\na.png,cat;unicorn\n")
    with pytest.raises(DataError, match=r"labels\.csv: row 2: unknown class 'unicorn'"):
        importers.import_folder([("train", str(images), None)], str(tmp_path / "ds"),
                                labels_csv=str(labels), classes=["cat", "dog"])


def test_non_utf8_file_name(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_image(rgb()))
    bad = os.path.join(os.fsencode(str(images)), b"caf\xe9.png")  # Latin-1, not UTF-8
    with open(bad, "wb") as fh:
        fh.write(encode_image(rgb()))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\na.png,x\n")
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"caf\\xe9\.png: file name is not valid UTF-8"):
        importers.import_folder([("train", str(images), None)], str(out),
                                labels_csv=str(labels))
    assert not out.exists()
    result = importers.import_folder([("train", str(images), None)], str(out),
                                     labels_csv=str(labels),
                                     opts=importers.ImportOptions(skip_bad=True))
    assert result.counts == {"train": 1} and "UTF-8" in result.skipped[0]["reason"]


def test_very_large_image_is_shrunk_at_import_with_its_mask(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    big = np.zeros((4000, 6000, 3), np.uint8)
    big[1000:3000, 2000:4000] = 200
    (images / "big.jpg").write_bytes(encode_image(big, ".jpg", 90))
    mask = np.zeros((4000, 6000), np.uint8)
    mask[1000:3000, 2000:4000] = 1
    Image.fromarray(mask).save(masks / "big.png")
    importers.import_folder([("val", str(images), str(masks))], str(tmp_path / "ds"),
                            classes=["box"],
                            opts=importers.ImportOptions(max_image_side=600))
    row = pq.read_table(parquet_files(str(tmp_path / "ds"))).to_pylist()[0]
    assert (row["height"], row["width"]) == (400, 600)
    assert image_size(row["image"]) == (400, 600)
    m = decode_mask(row["mask"])
    assert m.shape == (400, 600) and m[200, 300] == 1 and m[50, 50] == 0
    assert row["labels"] == [1]


def test_very_large_image_cams_run_on_a_shrunk_copy_and_come_back_full_size(tmp_path):
    from ray_wsss.cams.methods import cam
    from ray_wsss.cams.predict import MapMaker
    from ray_wsss.models.classifier import build_classifier, save_classifier
    from ray_wsss.refine.crf import crf_mask

    model_dir = str(tmp_path / "model")
    cfg = ModelConfig(backbone="resnet_mini")
    save_classifier(build_classifier(cfg, 2), cfg, model_dir, ["a", "b"])
    maker = MapMaker(model_dir, scales=(1.0, 2.0), flip=True, max_side=256)
    seen = []
    maker.model.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    big = np.full((3000, 4500, 3), 90, np.uint8)
    maps, probs = maker.maps(cam, [big, rgb(1, 1)], [np.array([0, 1]), np.array([1])])
    assert maps[0].shape == (2, 3000, 4500) and maps[1].shape == (1, 1, 1)
    assert max(max(s[-2:]) for s in seen) <= 512  # 256 at scale 2: never the full photo
    assert probs.shape == (2, 2)
    # the CRF on a 1x1 image
    out = crf_mask(rgb(1, 1), maps[1], [2], CrfConfig(iterations=2), threshold=0.3)
    assert out.shape == (1, 1) and out[0, 0] in (0, 2)


def test_parquet_file_with_a_missing_column(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"]}), ds / "part-0.parquet")
    with pytest.raises(DataError, match=r"part-0\.parquet: missing column\(s\) height"):
        check_columns(str(ds))


def _digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_a_failed_overwrite_leaves_the_finished_dataset_intact(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_image(rgb()))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\na.png,x\n")
    out = str(tmp_path / "ds")
    importers.import_folder([("train", str(images), None)], out, labels_csv=str(labels))
    before = _digest(out)
    (images / "b.jpg").write_bytes(truncated_jpeg())
    labels.write_text("image,labels\na.png,x\nb.jpg,x\n")
    with pytest.raises(DataError, match=r"b\.jpg"):
        importers.import_folder([("train", str(images), None)], out, labels_csv=str(labels),
                                opts=importers.ImportOptions(overwrite=True))
    assert _digest(out) == before


@pytest.mark.slow
def test_a_corrupt_row_in_a_stage_names_the_row_and_keeps_the_finished_cams(copy_run,
                                                                           tiny_run, tmp_path):
    from ray_wsss.pipeline import run_stage
    from ray_wsss.run import Run

    from .conftest import tiny_config

    root = copy_run("corrupt")
    # a dataset written by another tool: 8 rows of the tiny run, one image truncated
    table = pq.read_table(parquet_files(os.path.join(root, "dataset"))).slice(0, 8)
    images = table.column("image").to_pylist()
    images[3] = images[3][: len(images[3]) // 3]
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, pa.binary()))
    bad = tmp_path / "bad_ds"
    bad.mkdir()
    pq.write_table(table, bad / "part-0.parquet")
    os.link(os.path.join(root, "dataset", "classes.json"), bad / "classes.json")
    bad_id = table.column("image_id")[3].as_py()
    before = _digest(os.path.join(root, "cams"))
    cfg = tiny_config(root, ["data.source=parquet", f"data.path={bad}"])
    with pytest.raises(DataError, match=f"image_id {bad_id}: cannot decode image"):
        run_stage("cams", cfg, Run(cfg), force=True, check_upstream=False)
    assert _digest(os.path.join(root, "cams")) == before
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-cams")]


def _exif_jpeg(img, orientation=6):
    ex = Image.Exif()
    ex[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", exif=ex.tobytes(), quality=95)
    return out.getvalue()


def _rotated_photo(tmp_path, mask_on="stored"):
    """A 400x240 photo stored sideways (EXIF orientation 6) with a bright box, and its
    mask drawn on the stored pixels or on the displayed (rotated) picture."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    img = np.full((240, 400, 3), 20, np.uint8)
    img[20:120, 40:200] = 230
    mask = np.zeros((240, 400), np.uint8)
    mask[20:120, 40:200] = 1
    if mask_on == "displayed":
        mask = np.ascontiguousarray(np.rot90(mask, -1))  # orientation 6: turned clockwise
    (images / "photo.jpg").write_bytes(_exif_jpeg(img))
    Image.fromarray(mask).save(masks / "photo.png")
    return images, masks


def _image_mask_iou(row):
    img = decode_image(row["image"])
    bright = img.mean(axis=2) > 125
    labelled = decode_mask(row["mask"]) == 1
    assert bright.shape == labelled.shape
    return (bright & labelled).sum() / (bright | labelled).sum()


@pytest.mark.parametrize("max_side", [None, 300, 100])
def test_an_exif_rotated_photo_is_used_as_stored_on_every_path(tmp_path, max_side):
    # the reduced decode of --max-image-side used to apply the rotation and the shrink
    # squashed it back: image-to-mask IoU 1.0 -> 0.0
    images, masks = _rotated_photo(tmp_path)
    out = str(tmp_path / "ds")
    importers.import_folder([("train", str(images), str(masks))], out, classes=["box"],
                            opts=importers.ImportOptions(max_image_side=max_side))
    row = pq.read_table(parquet_files(out)).to_pylist()[0]
    assert row["width"] > row["height"]  # stored orientation: landscape
    assert _image_mask_iou(row) > 0.9


def test_masks_drawn_on_the_displayed_picture_need_apply_exif(tmp_path):
    images, masks = _rotated_photo(tmp_path, mask_on="displayed")
    subsets = [("train", str(images), str(masks))]
    with pytest.raises(DataError, match=r"masks/photo\.png: row photo: mask is 240x400 but its "
                                        r"image .*photo\.jpg is 400x240 as stored; its EXIF "
                                        r"orientation tag \(6: rotated 90 degrees clockwise\) "
                                        r"displays it as 240x400: .* --apply-exif"):
        importers.import_folder(subsets, str(tmp_path / "ds"), classes=["box"])
    for max_side in (None, 100):
        out = str(tmp_path / f"ds{max_side}")
        importers.import_folder(subsets, out, classes=["box"],
                                opts=importers.ImportOptions(apply_exif=True,
                                                             max_image_side=max_side))
        row = pq.read_table(parquet_files(out)).to_pylist()[0]
        assert row["height"] > row["width"] and _image_mask_iou(row) > 0.9
        assert '"orientation": "exif"' in open(os.path.join(out, "classes.json")).read()
    # and the other way round: stored-pixel masks with --apply-exif
    (tmp_path / "x").mkdir()
    images2, masks2 = _rotated_photo(tmp_path / "x")
    with pytest.raises(DataError, match=r"after applying its EXIF orientation tag .* matches "
                                        r"the stored pixels: import without --apply-exif"):
        importers.import_folder([("train", str(images2), str(masks2))], str(tmp_path / "y"),
                                classes=["box"],
                                opts=importers.ImportOptions(apply_exif=True))


def test_a_mask_claiming_a_huge_size_is_refused_before_it_is_decoded(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    (images / "a.png").write_bytes(encode_image(rgb()))
    (masks / "a.png").write_bytes(claims(25000, 25000))
    with pytest.raises(DataError, match=r"masks/a\.png: row a: mask is 25000x25000 but its "
                                        r"image .* is 40x32"):
        importers.import_folder([("val", str(images), str(masks))], str(tmp_path / "ds"),
                                classes=["x"])


def test_the_megapixel_limit_is_an_import_option(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_image(rgb(100, 200)))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,labels\na.png,x\n")
    with pytest.raises(DataError, match=r"a\.png: image claims 200x100 pixels .* over the "
                                        r"limit of 0\.01 megapixels"):
        importers.import_folder([("train", str(images), None)], str(tmp_path / "ds"),
                                labels_csv=str(labels),
                                opts=importers.ImportOptions(max_megapixels=0.01))
    importers.import_folder([("train", str(images), None)], str(tmp_path / "ds"),
                            labels_csv=str(labels),
                            opts=importers.ImportOptions(max_megapixels=0.02))

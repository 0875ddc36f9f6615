"""`ray-wsss export`: one readable PNG per image id, equal to what the run stored."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ray_wsss.data.codecs import PALETTE, decode_mask
from ray_wsss.data.dataset import read_table
from ray_wsss.errors import StageError
from ray_wsss.export import export

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("what,folder,column", [("pseudo-masks", "crf", "pseudo_mask"),
                                                 ("predictions", "predictions", "prediction")])
def test_export_writes_one_png_per_image_equal_to_the_stored_mask(tiny_run, tmp_path, what,
                                                                    folder, column):
    out = tmp_path / what
    result = export(tiny_run.root, what, str(out), splits=["val"])
    stored = read_table(tiny_run.path(folder), ["image_id", column], ["val"]).to_pylist()
    assert result["files"] == len(stored) == 48
    assert sorted(os.listdir(out)) == sorted([f"{r['image_id']}.png" for r in stored]
                                             + ["classes.json", "val.txt"])
    for r in stored[:12]:
        png = Image.open(out / f"{r['image_id']}.png")
        assert png.mode == "P"  # VOC-style palette PNG: values are the labels
        assert (np.array(png) == decode_mask(r[column])).all()
        assert np.array_equal(np.array(png.getpalette()[:21 * 3]).reshape(21, 3),
                              PALETTE[:21])
    names = json.load(open(out / "classes.json"))["values"]
    assert names["0"] == "background" and len(names) == 7
    assert sorted(open(out / "val.txt").read().split()) == sorted(r["image_id"]
                                                                  for r in stored)


def test_export_of_the_model_loads_and_refuses_to_overwrite(tiny_run, tmp_path):
    from ray_wsss.models.registry import load_model

    out = tmp_path / "model"
    export(tiny_run.root, "model", str(out))
    model = load_model(str(out))
    assert model.num_labels == 7
    with pytest.raises(StageError, match="exists"):
        export(tiny_run.root, "model", str(out))
    cli = subprocess.run([sys.executable, "-m", "ray_wsss.cli", "export", tiny_run.root,
                          "--what", "seeds", "--out", str(tmp_path / "seeds"),
                          "--splits", "val"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "exported 48 file(s) (seeds, step crf)" in cli.stdout


def _largest_region_box(binary: np.ndarray):
    """The tight [x0, y0, x1, y1] of the largest 8-connected region, by a flood fill
    (the exporter uses OpenCV's connected components)."""
    seen = np.zeros_like(binary, bool)
    best, best_box = 0, None
    h, w = binary.shape
    for y0, x0 in zip(*np.nonzero(binary)):
        if seen[y0, x0]:
            continue
        stack, seen[y0, x0], pixels = [(y0, x0)], True, []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and binary[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        if len(pixels) > best:
            ys, xs = np.array(pixels).T
            best, best_box = len(pixels), [int(xs.min()), int(ys.min()),
                                           int(xs.max()) + 1, int(ys.max()) + 1]
    return best_box


def test_export_of_boxes_from_the_cams(tiny_run, tmp_path):
    from ray_wsss.data.codecs import decode_array
    from ray_wsss.data.dataset import vector_to_labels

    out = tmp_path / "boxes"
    result = export(tiny_run.root, "boxes", str(out), splits=["val"])
    assert result == {"files": 1, "path": str(out), "step": "cams"}
    records = json.load(open(out / "boxes.json"))
    rows = read_table(tiny_run.path("cams"), ["image_id", "cam", "label_vector", "probs"],
                      ["val"]).to_pylist()
    names = tiny_run.dataset_info().classes
    # one record per (val image, labelled class), in the order of the image's classes
    assert len(records) == sum(len(vector_to_labels(r["label_vector"])) for r in rows)
    by_image = {}
    for rec in records:
        assert rec["split"] == "val"
        by_image.setdefault(rec["image_id"], []).append(rec)
    threshold = tiny_run.config.explain.box_threshold
    for r in rows[:12]:
        maps = decode_array(r["cam"]).astype(np.float32)
        classes = vector_to_labels(r["label_vector"]) - 1
        recs = by_image[r["image_id"]]
        assert [rec["class"] for rec in recs] == [names[c] for c in classes]
        for m, c, rec in zip(maps, classes, recs):
            lo, hi = m.min(), m.max()
            expected = _largest_region_box((m - lo) / (hi - lo) > threshold) if hi > lo \
                else None
            assert rec["box"] == expected, (r["image_id"], names[c])
            assert rec["score"] == pytest.approx(r["probs"][c], abs=1e-6)
    with pytest.raises(StageError, match="--stitch"):
        export(tiny_run.root, "boxes", str(tmp_path / "stitched"), stitch=True)

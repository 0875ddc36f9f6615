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

"""`ray-wsss explain` on the tiny run: the table, and its CAM row against the pipeline."""
import csv

import pytest

from ray_wsss.cams.explain import run_explain
from ray_wsss.errors import ConfigError
from ray_wsss.run import Run

pytestmark = pytest.mark.slow


def test_explain_table_and_cam_seed_miou_match_the_pipeline(tiny_run, copy_run):
    root = copy_run("explain")
    run = Run(tiny_run.config, root)
    result = run_explain(run.config, run, ["cam", "minmax", "gradcam"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"cam", "minmax", "gradcam"} and result["images"] == 48
    for r in rows.values():
        for key in ("increase_in_confidence", "average_drop", "average_retention",
                    "average_drop_of_others", "average_retention_of_others"):
            assert 0 <= r[key] <= 100
        assert r["pairs"] > 0 and r["images_per_second"] > 0
        for key in ("road_morf", "road_lerf", "deletion_auc", "insertion_auc",
                    "box_accuracy"):
            assert 0 <= r[key] <= 100, key
        steps = run.config.explain.curve_steps
        assert r["box_pairs"] > 0 and len(r["deletion_curve"]) == steps + 1
    # the same maps (method, TTA, labels) as the CAM stage, evaluated another way
    evaluated = tiny_run.read_metrics()["evaluate"]["cams"]["best"]["miou"]
    assert rows["cam"]["seed_miou"] == pytest.approx(100 * evaluated, abs=0.05)
    with open(run.path("explain", "comparison.csv")) as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == ["cam", "minmax", "gradcam"]
    assert {"road_morf", "road_lerf", "road_combined", "deletion_auc", "insertion_auc",
            "box_accuracy"} <= set(table[0])
    assert run.read_metrics()["explain"]["rows"][0]["method"] == "cam"


def test_max_images_is_the_number_explained(tiny_run, copy_run):
    from ray_wsss.config import replace

    run = Run(replace(tiny_run.config, **{"explain.max_images": 10}), copy_run("subset"))
    result = run_explain(run.config, run, ["cam"])
    assert result["images"] == 10


def test_explain_rejects_unknown_methods(tiny_run):
    with pytest.raises(ConfigError, match=r"unknown 'gradcam\+'"):
        run_explain(tiny_run.config, tiny_run, ["cam", "gradcam+"])

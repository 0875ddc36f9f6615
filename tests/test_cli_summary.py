"""The final table (`print_summary`) and the report's per-class heading show only rows
that mean something: no threshold row without a background class, a flag on a
classifier mAP measured without negatives."""
import json

from ray_wsss.cli import print_summary
from ray_wsss.config import PipelineConfig
from ray_wsss.data.dataset import DatasetInfo
from ray_wsss.report import render_page
from ray_wsss.run import Run


def _scores(miou, classes=("car", "road")):
    return {"miou": miou, "pixel_accuracy": 0.9, "mean_f1": 0.7,
            "per_class": {c: {"iou": miou, "f1": 0.7, "gt_pixels": 100} for c in classes}}


def _metrics(background: bool, best=0.45, configured=0.3, all_positive=None):
    cams = {"best": _scores(0.62), "best_threshold": best if background else None,
            "thresholds": [0.3, 0.45] if background else None,
            "miou_curve": [0.57, 0.62] if background else None}
    classifier = {"val_map": 100.0 if all_positive else 98.5, "epoch": 8, "loss": 0.1}
    if all_positive is not None:
        classifier["val_all_positive"] = all_positive
    return {"evaluate": {"splits": ["val"], "images": 160, "cams": cams,
                         "seeds": {**_scores(0.62 if not background else 0.571),
                                   "background_threshold": configured},
                         "crf": _scores(0.862)},
            "classifier": classifier}


def _summary(tmp_path, capsys, metrics) -> str:
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    print_summary(str(tmp_path))
    return capsys.readouterr().out


def test_with_a_background_class_both_seed_rows_are_shown(tmp_path, capsys):
    out = _summary(tmp_path, capsys, _metrics(background=True))
    assert "CAM seeds (best threshold 0.45)" in out and "62.0" in out
    assert "CAM seeds (threshold 0.3)" in out and "57.1" in out
    assert "CRF pseudo masks" in out and "86.2" in out
    assert "classifier: val mAP 98.5 after 8 epochs" in out
    assert "measures nothing" not in out


def test_the_configured_threshold_row_is_not_repeated_when_it_is_the_best(tmp_path, capsys):
    out = _summary(tmp_path, capsys, _metrics(background=True, best=0.3))
    assert "CAM seeds (threshold 0.3, the best)" in out
    assert out.count("CAM seeds") == 1


def test_without_background_no_threshold_row(tmp_path, capsys):
    out = _summary(tmp_path, capsys, _metrics(background=False))
    assert "CAM seeds (argmax)" in out
    assert "threshold" not in out  # the argmax row again, labelled "threshold 0.3"
    assert out.count("CAM seeds") == 1


def test_a_val_map_without_negatives_is_flagged(tmp_path, capsys):
    out = _summary(tmp_path, capsys, _metrics(background=False, all_positive=True))
    assert ("classifier: val mAP 100.0 (every val image holds every class: this measures "
            "nothing) after 8 epochs") in out
    out = _summary(tmp_path, capsys, _metrics(background=False, all_positive=False))
    assert "classifier: val mAP 98.5 after 8 epochs" in out


def test_the_reports_class_table_names_no_threshold_without_background(tmp_path):
    run = Run(PipelineConfig(), str(tmp_path))
    info = DatasetInfo(("car", "road"), background=False)
    page = render_page(run, info, _metrics(background=False), [])
    assert "CAM seeds (argmax over the classes) vs CRF pseudo masks" in page
    assert "best threshold" not in page
    info = DatasetInfo(("car", "road"), background=True)
    page = render_page(run, info, _metrics(background=True), [])
    assert "CAM seeds (best threshold 0.45) vs CRF pseudo masks" in page


def test_every_run_command_reaches_the_pipeline_with_its_arguments(tmp_path, monkeypatch):
    """`demo`, `run` and `run --until` parse and call the pipeline (a stand-in records
    the call: what is under test is the command line's wiring, which no end-to-end test
    goes through for `demo`; an `--until` meant for `run` once broke `demo`)."""
    import ray_wsss.cli as cli
    import ray_wsss.pipeline as pipeline

    calls = []

    def record(config, force=False, stages=None, run_dir=None, until=None):
        calls.append((config, force, until))
        return Run(config)
    monkeypatch.setattr(pipeline, "run_pipeline", record)
    monkeypatch.setattr(cli, "print_summary", lambda root: None)
    root = str(tmp_path / "r")
    assert cli.main(["demo", "--run-dir", root, "classifier.epochs=1"]) == 0
    assert cli.main(["run", cli.DEMO_CONFIG, "--run-dir", root, "--until", "crf@2",
                     "--force"]) == 0
    (demo, demo_force, demo_until), (run, run_force, run_until) = calls
    assert demo.data.source == "demo" and demo.classifier.epochs == 1 and demo.run_dir == root
    assert (demo_force, demo_until) == (False, None)
    assert (run_force, run_until) == (True, "crf@2")

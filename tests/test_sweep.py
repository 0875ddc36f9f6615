"""A tiny `thresholds` sweep on a local Ray: the best trial is at least the base config's,
the base trial reproduces the pipeline's numbers, and the best config is runnable."""
import json
import os

import pytest
import yaml

from ray_wsss.config import load_config
from ray_wsss.errors import ConfigError
from ray_wsss.run import Run
from ray_wsss.sweep import load_spec, run_sweep

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_shipped_sweeps_are_valid():
    for name in ("thresholds", "regularizers"):
        spec = load_spec(os.path.join(REPO, "tuning", f"{name}.yaml"))
        assert spec.space and spec.metric
    with pytest.raises(ConfigError, match="cannot vary in a refine sweep"):
        load_spec("thresholds", {"space": {"classifier.lr": {"uniform": [0.1, 1]}}})


def test_tiny_thresholds_sweep(copy_run, tiny_run):
    root = copy_run("sweep")
    run = Run(tiny_run.config, root)
    spec = load_spec("thresholds", {
        "num_samples": 4, "search": "optuna", "max_concurrent": 2,
        "space": {"seeds.background_threshold": {"uniform": [0.1, 0.6]},
                  "crf.bilateral_srgb": {"uniform": [5.0, 15.0]},
                  "cams.scales": {"choice": [[1.0], [1.0, 0.5]]}}})
    result = run_sweep(run.config, run, spec)
    trials = [t for t in result["rows"] if t["metric"] is not None]
    assert len(trials) == 4
    base, best = result["base"], result["best"]
    assert base is not None and base["params"]["cams.scales"] == [1.0, 0.5]
    assert best["metric"] >= base["metric"]
    # the base trial recomputes what the crf and evaluate stages measured (its maps come
    # from the per-scale cache rather than the stored float16 CAMs: a few pixels may flip)
    pipeline = tiny_run.read_metrics()["evaluate"]
    assert base["metric"] == pytest.approx(100 * pipeline["crf"]["miou"], abs=0.5)
    assert base["metrics"]["seed_miou"] == pytest.approx(100 * pipeline["seeds"]["miou"],
                                                         abs=0.5)
    best_yaml = os.path.join(root, "sweeps", "thresholds", "best.yaml")
    cfg = load_config(best_yaml)
    assert cfg.seeds.background_threshold == pytest.approx(
        best["params"]["seeds.background_threshold"])
    assert list(cfg.cams.scales) == best["params"]["cams.scales"]
    saved = json.load(open(os.path.join(root, "sweeps", "thresholds", "results.json")))
    assert len(saved["trials"]) == 4 and saved["best"]["metric"] == best["metric"]
    # started again, the sweep restores the finished experiment instead of rerunning it
    again = run_sweep(run.config, run, spec)
    assert again["best"]["metric"] == best["metric"] and len(again["rows"]) == 4
    # the report gains a sweep section
    from ray_wsss.report import sweep_sections
    assert "Sweep thresholds" in sweep_sections(run)

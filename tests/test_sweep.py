"""A tiny `thresholds` sweep on a local Ray: the best trial is at least the base config's,
the base trial reproduces the pipeline's numbers, and the best config is runnable."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ray_wsss.config import load_config
from ray_wsss.errors import ConfigError
from ray_wsss.run import Run
from ray_wsss.sweep import load_spec, run_sweep, sweep_key

from .conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.slow


def test_shipped_sweeps_are_valid():
    from ray_wsss.sweep import check_space

    demo, tiles = (load_config(os.path.join(REPO, "configs", c))
                   for c in ("demo.yaml", "camvid_tiles.yaml"))
    for name in ("thresholds", "regularizers", "iterations", "walk"):
        spec = load_spec(os.path.join(REPO, "tuning", f"{name}.yaml"))
        assert spec.space and spec.metric
        # every point of the space makes a valid config (the bounds of its ranges too)
        assert check_space(spec, demo) >= len(spec.space)
    assert check_space(spec, tiles) >= 1          # (a few seconds for each config)
    with pytest.raises(ConfigError, match="cannot vary in a refine sweep"):
        load_spec("thresholds", {"space": {"classifier.lr": {"uniform": [0.1, 1]}}})
    # a walk sweep varies the walk, not its switch or the actors
    for key in ("random_walk.enabled", "random_walk.num_actors", "random_walk.betax"):
        with pytest.raises(ConfigError, match="cannot vary in a walk sweep"):
            load_spec("walk", {"space": {key: {"choice": [1, 2]}}})
    assert load_spec("walk", {"space": {"random_walk.crf.iterations": {"choice": [0, 1]}}})


def test_a_section_choice_sets_the_keys_it_names_and_every_point_is_checked(tmp_path):
    """A mapping in a choice sets the keys it names in its section (nested ones too) and
    keeps the others; `check_space` makes every combination of the space's values into
    the config a trial runs and rejects an invalid one (a fallback without
    self-training) by name; Tune runs the shipped loop grid once per variant."""
    from ray.tune.search.basic_variant import _count_variants

    from ray_wsss.sweep import apply_point, base_point, check_space, first_points, tune_space

    from .conftest import tiny_config

    config = tiny_config(str(tmp_path), ["loop.warm_start=true", "loop.alpha=[2.0]",
                                         "regularizers.puzzle.alpha_schedule=0.25"])
    out = apply_point(config, {"loop": json.dumps({"feedback": "labels", "fallback": "class"}),
                               "crf.iterations": 4,
                               "regularizers": json.dumps({"puzzle": {"alpha": 4.0}})})
    assert (out.loop.feedback, out.loop.fallback, out.crf.iterations) == ("labels", "class", 4)
    assert out.loop.warm_start is True and out.loop.alpha == (2.0,)   # kept
    assert out.loop.prior == config.loop.prior and out.cams == config.cams
    assert (out.regularizers.puzzle.alpha, out.regularizers.puzzle.alpha_schedule) == (4.0, 0.25)

    shipped = load_spec(os.path.join(REPO, "tuning", "iterations.yaml"))
    variants = shipped.space["loop"]["grid"]
    assert len({json.dumps(v, sort_keys=True) for v in variants}) == 5
    assert check_space(shipped, config) == 5
    # the demo's loop is the first variant: the grid holds the base point, 5 trials
    plain = tiny_config(str(tmp_path))
    points, samples = first_points(shipped, plain)
    assert points == [] and samples == 1
    assert json.loads(base_point(shipped, plain)["loop"]) == variants[0]
    assert _count_variants({"config": tune_space(shipped), "num_samples": samples}, points) == 5
    assert first_points(shipped, config)[0] == []      # warm-started: the second variant
    assert json.loads(base_point(shipped, config)["loop"]) == variants[1]
    # a loop none of them is (warm-started per-class prior): it runs first, then the 5
    other = tiny_config(str(tmp_path), ["loop.prior=per_class", "loop.warm_start=true"])
    points, samples = first_points(shipped, other)
    assert json.loads(points[0]["loop"]) == {"feedback": "prior", "prior": "per_class",
                                             "warm_start": True, "fallback": "none"}
    assert _count_variants({"config": tune_space(shipped), "num_samples": samples}, points) == 6
    # a choice beside the grid is drawn per grid point: the base point runs on its own
    mixed = load_spec("iterations", {"space": {**shipped.space,
                                               "crf.iterations": {"choice": [3, 10]}}})
    points, samples = first_points(mixed, plain)
    assert len(points) == 1 and samples == 2
    # PyYAML reads 1e-5 (no dot) as a string: a sweep file's numbers are numbers
    (tmp_path / "decay.yaml").write_text(
        "trainable: classifier\nmetric: val_map\n"
        "space: {classifier.weight_decay: {loguniform: [1e-5, 1e-3]},"
        " classifier.lr: {choice: [1e-2, 0.1]}}\n")
    spec = load_spec(str(tmp_path / "decay.yaml"))
    assert spec.space["classifier.weight_decay"]["loguniform"] == [1e-5, 1e-3]
    assert spec.space["classifier.lr"]["choice"] == [0.01, 0.1]
    assert tune_space(spec)["classifier.weight_decay"].lower == 1e-5
    # independent keys: the product holds fallback: class with the diagram's feedback
    loose = load_spec("iterations", {"space": {
        "loop.feedback": {"choice": ["prior", "labels"]},
        "loop.fallback": {"choice": ["none", "class"]}}})
    with pytest.raises(ConfigError, match=r'the point \{"loop.feedback": "prior", '
                       r'"loop.fallback": "class"\} makes an invalid config: '
                       r"loop.fallback: class .* set loop.feedback: labels"):
        check_space(loose, config)
    # the bounds of a range are checked, and a choice's values
    for dom in ({"randint": [-1, 5]}, {"grid": [3, -1]}):
        bad = load_spec("thresholds", {"space": {"crf.iterations": dom}})
        with pytest.raises(ConfigError, match=r'\{"crf.iterations": -1\}.*below the minimum 0'):
            check_space(bad, config)
    # past MAX_CHECKED_POINTS combinations each value is checked with the others at
    # their first value (not the config's: self-training here, where a fallback is valid)
    many = load_spec("iterations", {"space": {
        "loop.feedback": {"choice": ["labels"]}, "loop.fallback": {"choice": ["none", "class"]},
        **{f"crf.{k}": {"choice": list(range(1, 10))}
           for k in ("iterations", "gaussian_sxy", "bilateral_sxy")}}})
    assert check_space(many, config) == 1 + 2 + 27
    # Optuna starts from the config's own point, which must be one of the choices
    optuna = load_spec("thresholds", {"search": "optuna",
                                      "space": {"crf.iterations": {"choice": [3, 5]}}})
    with pytest.raises(ConfigError, match=r"crf.iterations 10 is none of the choices"):
        check_space(optuna, plain)


def test_the_sweep_key_follows_what_the_trials_read(tiny_run, tmp_path):
    """The key naming a sweep's Tune experiment and map cache: stable for the same run
    and config (a killed sweep resumes), new when a step the trials read was refitted
    (its run id) or when the config they start from changed; resources do not count,
    nor (for a refine sweep) stages it does not read."""
    import shutil

    from ray_wsss.config import replace

    shutil.copy(tiny_run.manifest_path, tmp_path / "manifest.json")
    config = tiny_run.config

    def key(spec, changes=None):
        cfg = replace(config, **(changes or {}))
        return sweep_key(spec, cfg, Run(cfg, str(tmp_path)))

    refine, pipeline = load_spec("thresholds"), load_spec("thresholds", {
        "trainable": "pipeline", "space": {"segmenter.epochs": {"choice": [1, 2]}}})
    base = key(refine)
    assert base == key(refine) != key(pipeline)
    assert key(refine, {"cams.num_actors": 3, "crf.batch_size": 2}) == base  # resources
    assert key(refine, {"segmenter.epochs": 9}) == base       # not read by the trials
    assert key(pipeline, {"segmenter.epochs": 9}) != key(pipeline)
    for change in ({"cams.method": "gradcampp"}, {"cams.output_stride": 8},
                   {"crf.iterations": 3}, {"seeds.background_threshold": 0.5},
                   {"evaluate.splits": ("train",)}, {"classifier.lr": 0.5}):
        assert key(refine, change) != base, change
    # a refitted classifier has a new run id: the refine sweep starts afresh, the
    # pipeline sweep (which reads only the dataset) does not
    manifest = json.load(open(tmp_path / "manifest.json"))
    before = key(pipeline)
    manifest["stages"]["classifier"]["run_id"] = "refitted"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert key(refine) != base and key(pipeline) == before


def test_tiny_thresholds_sweep(copy_run, tiny_run, monkeypatch):
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
    # started again, the sweep restores the finished experiment instead of rerunning it,
    # and does not check its points again: a validation rule that changed since it
    # started (here: one that refuses every point) does not keep its trials from it
    import ray_wsss.sweep

    def changed_rules(*args):
        raise AssertionError("a resumed sweep's points are checked again")
    monkeypatch.setattr(ray_wsss.sweep, "check_space", changed_rules)
    again = run_sweep(run.config, run, spec)
    assert again["best"]["metric"] == best["metric"] and len(again["rows"]) == 4
    key = sweep_key(spec, run.config, run)
    assert f"thresholds-{key}" in os.listdir(os.path.join(root, "sweeps", "thresholds",
                                                          "tune"))
    assert os.path.isdir(os.path.join(root, "sweeps", "thresholds", f"cam_cache-{key}"))
    # the report gains a sweep section
    from ray_wsss.report import sweep_sections
    assert "Sweep thresholds" in sweep_sections(run)


def test_a_sweep_whose_driver_was_killed_resumes_without_redoing_finished_trials(
        copy_run, tiny_run, tmp_path):
    """`ray-wsss sweep` killed (driver and its local Ray) after two trials; started again
    it restores the experiment: the finished trials are not computed again (even one that
    finished after Tune's last snapshot of the experiment, which Tune restores as
    unfinished: its saved result is reported), the rest run, and the result has every
    trial once."""
    root = copy_run("sweep-kill")
    spec_file = tmp_path / "kill.yaml"
    spec_file.write_text(yaml.safe_dump({
        "trainable": "refine", "metric": "crf_miou", "mode": "max", "num_samples": 6,
        "search": "random", "max_concurrent": 1, "cpus_per_trial": 1,
        "space": {"seeds.background_threshold": {"uniform": [0.1, 0.6]}}}))
    cmd = [sys.executable, "-m", "ray_wsss.cli", "sweep", str(spec_file),
           os.path.join(REPO, "configs", "demo.yaml"), *TINY_OVERRIDES,
           "crf.iterations=2",  # Tune's kill and restore are under test, not the CRF
           "--run-dir", root]
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    # a trial's result is saved when it has been computed, before Tune hears of it
    results = os.path.join(root, "sweeps", "kill", "trials-*", "*.json")

    def finished():
        return set(glob.glob(results))
    deadline = time.time() + 240
    try:
        while len(finished()) < 2:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "two trials did not finish in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {f: os.path.getmtime(f) for f in finished()}
    assert 2 <= len(before) < 6
    assert not os.path.exists(os.path.join(root, "sweeps", "kill", "results.json"))

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    saved = json.load(open(os.path.join(root, "sweeps", "kill", "results.json")))
    trials = [t for t in saved["trials"] if t["metric"] is not None]
    assert len(trials) == 6 and len({t["trial"] for t in trials}) == 6
    assert len(finished()) == 6
    for f, mtime in before.items():  # a finished trial was not computed again
        assert os.path.getmtime(f) == mtime
        trial = os.path.basename(f)[:-len(".json")]
        saved = next(t for t in trials if t["trial"] == trial)
        assert saved["metric"] == json.load(open(f))["metrics"]["crf_miou"]


def test_a_classifier_sweep_fits_one_model_per_trial(copy_run, tiny_run):
    """The `classifier` trainable on a local Ray: each trial is a Ray Train fit whose
    val mAP reaches Tune every epoch (ASHA may stop it); a trial holds no CPU of its
    own (cpus_per_trial 0), so the fit's workers and data tasks get them all."""
    root = copy_run("sweep-classifier")
    run = Run(tiny_run.config, root)
    from ray_wsss.config import replace
    # one epoch at crop 64: what is under test is the trainable, not what it learns
    config = replace(run.config, **{"classifier.epochs": 1, "classifier.crop_size": 64,
                                    "classifier.num_workers": 1})
    spec = load_spec("regularizers", {
        "num_samples": 2, "search": "random", "grace_period": 1, "max_concurrent": 2,
        "space": {"classifier.lr": {"choice": [0.05, 0.001]}}})
    assert spec.cpus_per_trial == 0
    # Ray Train's local mode cannot report to Tune: refused before any trial starts
    local = replace(config, **{"classifier.num_workers": 0})
    with pytest.raises(ConfigError, match="classifier.num_workers is 0"):
        run_sweep(local, Run(local, root), spec)
    result = run_sweep(config, Run(config, root), spec)
    trials = [t for t in result["rows"] if t["metric"] is not None]
    assert len(trials) == 2 and all(0 <= t["metric"] <= 100 for t in trials)
    assert all(t["epochs"] == 1 for t in trials)
    best_yaml = os.path.join(root, "sweeps", "regularizers", "best.yaml")
    assert load_config(best_yaml).classifier.lr == result["best"]["params"]["classifier.lr"]

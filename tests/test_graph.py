"""The stage graph as data: one definition per stage, steps keyed by round, hashes that
older run directories still match, outputs of nested steps published atomically."""
import inspect
import json
import os
import shutil

import pytest

from ray_wsss import graph
from ray_wsss.config import load_config
from ray_wsss.errors import ConfigError, StageError
from ray_wsss.graph import STAGES, Step, steps
from ray_wsss.run import Run, StepContext

from .conftest import REPO

# Stage hashes recorded by the first release (commit e562ac9, before the stage graph,
# the segmentation model and the new config sections): a run directory made then must
# still find its steps up to date.
FIRST_RELEASE_HASHES = {
    "configs/demo.yaml": {"dataset": "ca6c6138fe187303", "classifier": "44b3771852a295f1",
                          "cams": "1606a472e0732655", "crf": "51042d4f086ee977",
                          "evaluate": "6934ac75507ad23e"},
    "configs/camvid.yaml": {"dataset": "f660a2b56d7f740c", "classifier": "4d309d08702b622b",
                            "cams": "5eb6bd69809dabcd", "crf": "fdaafe3dc2f65d6b",
                            "evaluate": "1d43b76ba01eae60"},
}


@pytest.mark.parametrize("name", sorted(FIRST_RELEASE_HASHES))
def test_round_one_hashes_equal_those_of_the_first_release(name, tmp_path):
    overrides = ["data.path=/x"] if "camvid" in name else []
    cfg = load_config(os.path.join(REPO, name), overrides + ["run_dir=/tmp/r"])
    run = Run(cfg)
    assert {s: run.current_hash(s) for s in FIRST_RELEASE_HASHES[name]} == \
        FIRST_RELEASE_HASHES[name]


def test_every_stage_is_one_entry_with_an_explicit_entry_function():
    assert graph.STAGE_NAMES == ("dataset", "prior", "classifier", "cams", "crf", "evaluate",
                                 "c2am", "saliency", "affinity_labels", "affinity",
                                 "random_walk", "pct", "segmenter", "predict", "report")
    for stage in STAGES.values():
        assert list(inspect.signature(stage.entry).parameters)[:2] == ["config", "ctx"]
        names = [u.partition("@") for u in stage.inputs]
        assert all(name in STAGES for name, _, _ in names)
        # inputs of the same round come earlier in the order: acyclic as listed
        assert all(graph.STAGE_NAMES.index(name) < graph.STAGE_NAMES.index(stage.name)
                   for name, _, which in names if which != "prev")
    fields = graph.resource_fields()
    assert "num_workers" in fields["classifier"] and "num_workers" in fields["segmenter"]
    assert "batch_size" in fields["cams"] and "gpus_per_actor" in fields["predict"]


def test_steps_are_keyed_by_round_and_later_rounds_live_under_rounds(tmp_path):
    # the prior exists from round 2 on
    assert [s.key for s in steps(1)] == [n for n in graph.STAGE_NAMES if n != "prior"]
    keys = [s.key for s in steps(3)]
    assert keys[0] == "dataset" and keys[-1] == "report"
    assert "segmenter@3" in keys and "cams@2" in keys and "dataset@2" not in keys
    assert Step.parse("crf@2") == Step("crf", 2) and Step("crf", 2).key == "crf@2"
    run = Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                          [f"run_dir={tmp_path}"]))
    assert run.step_path("cams") == os.path.join(str(tmp_path), "cams")
    assert run.step_path(Step("cams", 2)) == os.path.join(str(tmp_path), "rounds", "2", "cams")
    assert run.step_path(Step("predict", 2)) == os.path.join(str(tmp_path), "rounds", "2",
                                                             "predictions")
    # round t's steps read round t's inputs; the dataset exists once
    assert Step("crf", 2).input("cams") == Step("cams", 2)
    assert Step("classifier", 2).input("dataset") == Step("dataset", 1)
    # round 2's CAMs read round 2's prior: another hash than round 1's; the number of
    # rounds is in no hash
    assert run.current_hash(Step("cams", 2)) != run.current_hash("cams")
    more = Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                           [f"run_dir={tmp_path}", "loop.rounds=5"]))
    assert more.current_hash(Step("cams", 2)) == run.current_hash(Step("cams", 2))


def test_a_stage_reads_only_its_declared_inputs(tmp_path):
    run = Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                          [f"run_dir={tmp_path}"]))
    ctx = StepContext(run, Step("crf", 2))
    assert ctx.input("cams") == os.path.join(str(tmp_path), "rounds", "2", "cams")
    with pytest.raises(StageError, match="does not declare input 'classifier'"):
        ctx.input("classifier")


def test_output_of_a_nested_step_cleans_its_own_leftovers_and_publishes(tmp_path):
    run = Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                          [f"run_dir={tmp_path}"]))
    parent = tmp_path / "rounds" / "2"
    parent.mkdir(parents=True)
    (parent / ".tmp-cams-dead0000").mkdir()   # an interrupted write of cams@2
    (parent / ".tmp-crf-alive000").mkdir()    # another step's: not ours to remove
    with run.output(Step("cams", 2)) as out:
        assert os.path.dirname(out) == str(parent)
        open(os.path.join(out, "part.parquet"), "w").write("x")
        assert not (parent / "cams").exists()  # nothing visible until the block ends
    assert (parent / "cams" / "part.parquet").exists()
    assert sorted(os.listdir(parent)) == [".tmp-crf-alive000", "cams"]
    with pytest.raises(RuntimeError):
        with run.output(Step("cams", 2)) as out:
            open(os.path.join(out, "part.parquet"), "w").write("y")
            raise RuntimeError("stage failed")
    assert open(parent / "cams" / "part.parquet").read() == "x"  # finished work kept
    assert sorted(os.listdir(parent)) == [".tmp-crf-alive000", "cams"]


def test_a_run_directory_from_the_first_release_resumes_at_the_new_steps(copy_run, tiny_run):
    """A tiny run with the manifest entries of the new steps removed, as the first
    release left it: every old step is up to date, the new ones and the report are not;
    changing a segmenter key makes only the segmenter and what follows stale."""
    root = copy_run("old")
    path = os.path.join(root, "manifest.json")
    manifest = json.load(open(path))
    for key in ("segmenter", "predict", "report"):
        del manifest["stages"][key]
    json.dump(manifest, open(path, "w"))
    for folder in ("segmenter", "predictions", "report"):
        shutil.rmtree(os.path.join(root, folder))
    run = Run(tiny_run.config, root)
    assert [s.key for s in steps() if run.is_done(s)] == ["dataset", "classifier", "cams",
                                                          "crf", "evaluate"]
    changed = Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                              _tiny_overrides(root) + ["segmenter.lr=0.02"]), tiny_run.root)
    # (stages switched off for this config, the random-walk ones, have no step to run)
    assert [s.key for s in steps() if STAGES[s.stage].enabled(changed.config)
            and not changed.is_done(s)] == ["segmenter", "predict", "report"]


def _tiny_overrides(root):
    from .conftest import TINY_OVERRIDES
    return TINY_OVERRIDES + [f"run_dir={root}"]


def test_stale_progress_bar_cleanup_survives_a_changed_ray(monkeypatch):
    """The cleanup edits Ray's private bar manager: a Ray whose manager lacks what it
    expects (renamed attributes, another lock type) must not fail a stage."""
    from ray.experimental import tqdm_ray

    from ray_wsss.runtime import close_stale_progress_bars

    class Renamed:
        lock = None          # not a context manager
        groups = {}          # bar_groups renamed

    monkeypatch.setattr(tqdm_ray, "_manager", Renamed(), raising=False)
    close_stale_progress_bars()   # must not raise
    monkeypatch.setattr(tqdm_ray, "_manager", object(), raising=False)
    close_stale_progress_bars()


def _demo_run(tmp_path, *overrides):
    return Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                           [f"run_dir={tmp_path}", *overrides]))


def test_the_random_walk_switch_off_leaves_every_other_step_as_it_was(tmp_path):
    """Off (the default), the random-walk stages are nobody's input: their keys change
    no other step's hash. On, only the report (and the segmenter, when it learns from
    the random-walk masks) reads them."""
    keys = ("dataset", "classifier", "cams", "crf", "evaluate", "segmenter", "predict",
            "report")
    off = _demo_run(tmp_path)
    base = {k: off.current_hash(k) for k in keys}
    tweaked = _demo_run(tmp_path, "random_walk.beta=5", "affinity.epochs=1",
                        "affinity.fg_threshold=0.4")
    assert {k: tweaked.current_hash(k) for k in keys} == base
    assert all(not STAGES[s].enabled(off.config)
               for s in ("affinity_labels", "affinity", "random_walk"))
    on = _demo_run(tmp_path, "random_walk.enabled=true")
    changed = [k for k in keys if on.current_hash(k) != base[k]]
    assert changed == ["report"]
    walk = _demo_run(tmp_path, "random_walk.enabled=true", "segmenter.masks=random_walk")
    assert [k for k in keys if walk.current_hash(k) != base[k]] == ["segmenter", "predict",
                                                                    "report"]
    assert [u.key for u in graph.active_inputs(Step("segmenter"), walk.config)] == [
        "classifier", "cams", "crf", "random_walk"]
    with pytest.raises(ConfigError, match="segmenter.masks: 'random_walk' needs "
                                          "random_walk.enabled: true"):
        _demo_run(tmp_path, "segmenter.masks=random_walk")


def test_affinity_labels_depend_on_their_own_keys_only(tmp_path):
    """The label stage hashes the thresholds and the label CRF; the fit's keys (epochs,
    lr, crop) rerun the fit, not the labels' CRFs."""
    on = ["random_walk.enabled=true"]
    base = _demo_run(tmp_path, *on)
    fit = _demo_run(tmp_path, *on, "affinity.epochs=1", "affinity.lr=0.05")
    label = _demo_run(tmp_path, *on, "affinity.label_crf.gt_prob=0.8")
    resource = _demo_run(tmp_path, *on, "affinity.num_workers=2",
                         "affinity.label_batch_size=3")
    assert fit.current_hash("affinity_labels") == base.current_hash("affinity_labels")
    assert fit.current_hash("affinity") != base.current_hash("affinity")
    assert label.current_hash("affinity_labels") != base.current_hash("affinity_labels")
    assert label.current_hash("affinity") != base.current_hash("affinity")
    assert [resource.current_hash(k) for k in ("affinity_labels", "affinity")] == \
        [base.current_hash(k) for k in ("affinity_labels", "affinity")]


def test_self_training_rounds_refit_the_model_on_the_last_predictions_only(tmp_path):
    """loop.feedback: labels: round 2 makes no classifier, CAMs or CRF masks; its
    segmentation model reads round 1's predictions (CRF-refined) and starts from round
    1's classifier, and its predictions read it."""
    config = load_config(os.path.join(REPO, "configs", "demo.yaml"),
                         [f"run_dir={tmp_path}", "loop.rounds=3", "loop.feedback=labels",
                          "predict.crf=true", "predict.splits=[val,train]"])
    keys = [s.key for s in steps(config.loop)]
    assert [k for k in keys if k.endswith("@2")] == ["segmenter@2", "predict@2"]
    assert [k for k in keys if k.endswith("@3")] == ["segmenter@3", "predict@3"]
    assert Step("segmenter", 3).inputs(config.loop) == [Step("classifier", 1),
                                                        Step("predict", 2)]
    assert Step("predict", 3).input("segmenter", config.loop) == Step("segmenter", 3)
    # the output of the run is the last round's model
    assert graph.last_round("segmenter", config.loop) == 3
    assert graph.last_round("crf", config.loop) == 1


def test_the_fallback_reads_round_one_masks_in_later_rounds_and_leaves_round_one_alone():
    """loop.fallback (self-training): the segmenter of rounds 2.. also reads round 1's
    CRF masks and hashes the fallback; round 1's steps, and the self-training run
    without a fallback, keep their hashes (finished rounds are reused)."""
    base = ["run_dir=/tmp/r", "loop.rounds=3", "loop.feedback=labels", "predict.crf=true",
            "predict.splits=[val,train]"]
    demo = os.path.join(REPO, "configs", "demo.yaml")
    runs = {m: Run(load_config(demo, base + ([f"loop.fallback={m}"] if m else [])))
            for m in (None, "none", "class", "image")}
    plain, cls = runs[None].config, runs["class"].config
    assert Step("segmenter", 2).inputs(cls.loop) == [Step("classifier", 1), Step("predict", 1),
                                                     Step("crf", 1), Step("random_walk", 1)]
    # the random walk is off: not read, not hashed
    assert graph.active_inputs(Step("segmenter", 3), cls) == [
        Step("classifier", 1), Step("predict", 2), Step("crf", 1)]
    assert graph.active_inputs(Step("segmenter", 2), plain) == [Step("classifier", 1),
                                                                Step("predict", 1)]
    assert [s.key for s in steps(cls.loop)] == [s.key for s in steps(plain.loop)]
    round_one = [s.key for s in steps(plain.loop) if s.round == 1 and s.stage != "report"]
    for key in round_one:
        assert len({r.current_hash(key) for r in runs.values()}) == 1, key
    later = ["segmenter@2", "predict@2", "segmenter@3"]
    assert [runs["none"].current_hash(k) for k in later] == \
        [runs[None].current_hash(k) for k in later]
    hashes = [tuple(runs[m].current_hash(k) for k in later) for m in (None, "class", "image")]
    assert len(set(hashes)) == 3 and all(len(set(h)) == 3 for h in hashes)

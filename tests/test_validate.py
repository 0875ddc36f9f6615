"""Config values checked when the config loads: names from the live registries, ranges
from `validate.RULES`, the dotted key in every message."""
import glob
import os
import re

import pytest

from ray_wsss.config import PipelineConfig, load_config
from ray_wsss.errors import ConfigError
from ray_wsss.validate import RULES, UNCHECKED, numeric_keys, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.yaml")


@pytest.mark.parametrize("override, message", [
    # the three of issue 19: caught after a full training, as a missing checkpoint, never
    ("cams.method=gradcam++", "cams.method: 'gradcam++' is not one of cam, gradcam, "),
    ("classifier.epochs=-1", "classifier.epochs: -1 is below the minimum 1"),
    ("seeds.background_threshold=1.5", "seeds.background_threshold: 1.5 is not in [0, 1]"),
])
def test_the_reported_values_are_refused_at_load_with_their_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert str(err.value).startswith(f"{DEMO}: {message}")


@pytest.mark.parametrize("override, key", [
    # epochs, batch sizes, workers
    ("segmenter.epochs=0", "segmenter.epochs: 0 is below the minimum 1"),
    ("classifier.batch_size=0", "classifier.batch_size:"),
    ("cams.batch_size=0", "cams.batch_size:"),
    ("crf.batch_size=0", "crf.batch_size:"),
    ("evaluate.batch_size=0", "evaluate.batch_size:"),
    ("predict.batch_size=-2", "predict.batch_size:"),
    ("classifier.num_workers=-1", "classifier.num_workers:"),
    ("cams.num_actors=0", "cams.num_actors:"),
    ("cams.gpus_per_actor=-1", "cams.gpus_per_actor:"),
    ("cams.output_stride=12", "cams.output_stride: 12 is not one of 4, 8, 16, 32"),
    # learning rates and weights
    ("classifier.lr=0", "classifier.lr: 0.0 must be greater than 0"),
    ("segmenter.lr=-0.01", "segmenter.lr:"),
    ("classifier.weight_decay=-0.1", "classifier.weight_decay:"),
    ("classifier.momentum=1.0", "classifier.momentum: 1.0 is not in [0, 1)"),
    ("regularizers.puzzle.alpha=-1", "regularizers.puzzle.alpha:"),
    ("regularizers.oc_cse.weight=-0.5", "regularizers.oc_cse.weight:"),
    ("cams.lambda_neg=-1", "cams.lambda_neg:"),
    # thresholds in [0, 1]
    ("seeds.background_threshold=-0.1", "seeds.background_threshold:"),
    ("evaluate.thresholds=[0.2,1.2]", "evaluate.thresholds[1]: 1.2 is not in [0, 1]"),
    ("regularizers.pnoc.mask_threshold=2", "regularizers.pnoc.mask_threshold:"),
    ("segmenter.unsure_band=[0.2,1.5]", "segmenter.unsure_band[1]: 1.5 is not in [0, 1]"),
    ("segmenter.unsure_band=[0.6,0.2]", "segmenter.unsure_band: [0.6, 0.2] must be [low, "),
    # crop sizes, scales, TTA
    ("classifier.crop_size=8", "classifier.crop_size: 8 is below the minimum 16"),
    ("segmenter.crop_size=0", "segmenter.crop_size:"),
    ("classifier.scale_range=[1.3,0.7]", "classifier.scale_range: [1.3, 0.7] must be [low"),
    ("classifier.scale_range=[0,1]", "classifier.scale_range[0]: 0.0 must be greater than 0"),
    ("cams.scales=[]", "cams.scales: [] is empty"),
    ("cams.scales=[1.0,-0.5]", "cams.scales[1]: -0.5 must be greater than 0"),
    ("predict.scales=[0]", "predict.scales[0]:"),
    ("explain.scales=[]", "explain.scales: [] is empty"),
    ("evaluate.thresholds=[]", "evaluate.thresholds: [] is empty"),
    ("cams.splits=[]", "cams.splits: [] is empty"),
    # CRF
    ("crf.iterations=-1", "crf.iterations: -1 is below the minimum 0"),
    ("crf.score_temperature=0", "crf.score_temperature:"),
    ("crf.bilateral_srgb=0", "crf.bilateral_srgb:"),
    # names from registries
    ("explain.methods=[cam,gradcam++]", "explain.methods[1]: 'gradcam++' is not one of"),
    ("model.backbone=resnet9", "model.backbone: 'resnet9' is not one of resnet18"),
    ("segmenter.backbone=vgg16", "segmenter.backbone: 'vgg16' is not one of"),
    ("model.output_stride=12", "model.output_stride: 12 is not one of 8, 16, 32"),
    ("segmenter.output_stride=32", "segmenter.output_stride: 32 is not one of 8, 16"),
    # sizes and counts
    ("cams.max_image_side=0", "cams.max_image_side:"),
    ("data.ignore_values=[300]", "data.ignore_values[0]: 300 is not in [0, 255]"),
    ("ray.num_cpus=0", "ray.num_cpus:"),
    ("report.num_images=-1", "report.num_images:"),
])
def test_each_rule_family_names_its_key(override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key)):
        load_config(None, [override])


@pytest.mark.parametrize("override", [
    "classifier.epochs=1", "seeds.background_threshold=0", "seeds.background_threshold=1",
    "crf.iterations=0", "cams.num_actors=null", "cams.max_image_side=null",
    "classifier.max_failures=-1", "segmenter.unsure_band=[0.2,0.6]", "data.ignore_values=[]",
    "cams.gpus_per_actor=0.5", "explain.scales=null",
])
def test_values_at_the_edges_and_unset_optionals_are_accepted(override):
    load_config(None, [override])


def test_method_names_come_from_the_live_registry(monkeypatch):
    from ray_wsss.cams import methods

    monkeypatch.setitem(methods.METHODS, "brand-new-cam", methods.cam)
    assert load_config(None, ["cams.method=brand-new-cam"]).cams.method == "brand-new-cam"
    with pytest.raises(ConfigError, match="brand-new-cam"):  # listed among the choices
        load_config(None, ["cams.method=nope"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
                         + [os.path.join(REPO, "ray_wsss", "configs", "demo.yaml")])
def test_the_shipped_configs_validate(path):
    load_config(path)


def test_the_defaults_validate_and_every_rule_names_a_real_key():
    validate(PipelineConfig())
    config = PipelineConfig()
    for key in RULES:
        node = config
        for part in key.split("."):
            assert hasattr(node, part), f"validate.RULES names {key}, which is no config key"
            node = getattr(node, part)


def test_every_numeric_key_has_a_rule_or_is_unchecked_on_purpose():
    missing = [k for k in numeric_keys() if k not in RULES and k not in UNCHECKED]
    assert not missing, (f"numeric config keys without a range rule: {missing}; add them to "
                         "ray_wsss/validate.py RULES (or UNCHECKED if any value is fine)")


@pytest.mark.parametrize("override, message", [
    ("affinity.fg_threshold=1.2", "affinity.fg_threshold: 1.2 is not in [0, 1]"),
    ("affinity.label_crf.gt_prob=1.0", "affinity.label_crf.gt_prob: 1.0 is not in (0, 1)"),
    ("affinity.radius=1", "affinity.radius: 1 is below the minimum 2"),
    ("affinity.crop_size=8", "affinity.crop_size: 8 is below the minimum 16"),
    ("random_walk.beta=0", "random_walk.beta: 0.0 must be greater than 0"),
    ("random_walk.crf.bilateral_srgb=0", "random_walk.crf.bilateral_srgb: 0.0 must be"),
    ("random_walk.background_threshold=2", "random_walk.background_threshold: 2.0 is not"),
    # keys over sections
    ("segmenter.masks=random_walk", "segmenter.masks: 'random_walk' needs "
                                    "random_walk.enabled: true"),
    ("cams.splits=[val]", "random_walk.enabled: the affinity labels come from the CAMs of "
                          "the train split 'train'"),
])
def test_the_random_walk_keys_are_checked_at_load(override, message):
    extra = ["random_walk.enabled=true"] if override.startswith("cams.") else []
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [*extra, override])
    assert str(err.value).startswith(f"{DEMO}: {message}")


def test_self_training_needs_the_train_split_predicted_at_load():
    """loop.feedback: labels fits round t's model on round t-1's predictions of the
    segmenter's train split: a config that predicts only the val frames (as
    configs/camvid_tiles.yaml does) failed in round 2, after a whole round of work."""
    from ray_wsss.config import replace
    from ray_wsss.sweep import self_training

    loop = ["loop.rounds=2", "loop.feedback=labels", "predict.crf=true"]
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [*loop, "predict.splits=[val]"])
    assert str(err.value) == (
        f"{DEMO}: loop.feedback: labels fits each round's segmentation model on the previous "
        "round's predictions of its train split 'train', which predict.splits ['val'] "
        "leaves out")
    assert load_config(DEMO, [*loop, "predict.splits=[val,train]"]).predict.splits == \
        ("val", "train")
    load_config(DEMO, ["predict.splits=[val]"])                     # one round: no need
    load_config(DEMO, ["loop.rounds=2", "predict.splits=[val]"])    # the prior: no need
    # the iterations sweep and bench_loop make a config fit for self-training
    tiles = load_config(os.path.join(REPO, "configs", "camvid_tiles.yaml"), ["data.path=/x"])
    assert tiles.predict.splits == ("val",) and not tiles.predict.crf
    fixed = self_training(tiles)
    assert fixed.predict.splits == ("val", "train") and fixed.predict.crf
    validate(replace(fixed, **{"loop.rounds": 2, "loop.feedback": "labels"}))
    assert self_training(fixed).predict.splits == ("val", "train")  # idempotent


def test_the_fallback_needs_self_training_from_the_cams_masks_at_load():
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["loop.rounds=2", "loop.fallback=class"])
    assert str(err.value) == (f"{DEMO}: loop.fallback: class puts round 1's masks back into "
                              "the targets of self-training: set loop.feedback: labels")
    with pytest.raises(ConfigError, match="loop.fallback: 'lost' is not one of 'none', 'class', 'image'"):
        load_config(DEMO, ["loop.fallback=lost"])
    labels = ["loop.rounds=2", "loop.feedback=labels", "predict.crf=true",
              "predict.splits=[val,train]"]
    assert load_config(DEMO, [*labels, "loop.fallback=image"]).loop.fallback == "image"

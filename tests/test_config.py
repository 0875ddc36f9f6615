import os

import pytest

from ray_wsss.config import (PipelineConfig, apply_override, load_config, section_hash,
                             to_dict)
from ray_wsss.errors import ConfigError

from .conftest import REPO


def test_demo_config_loads():
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"))
    assert cfg.data.source == "demo" and cfg.cams.scales == (1.0, 0.5, 1.5)
    assert isinstance(cfg.classifier.lr, float) and cfg.classifier.scale_range == (0.7, 1.3)


@pytest.mark.parametrize("name", ["demo.yaml", "camvid.yaml", "camvid_tiles.yaml", "voc.yaml",
                                  "coco.yaml"])
def test_shipped_configs_are_valid(name):
    path = os.path.join(REPO, "configs", name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not shipped")
    load_config(path)


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["classifier.epochs=3", "cams.scales=[1.0, 2]", "cams.flip=false",
                             "model.pretrained=null", "run_dir=/tmp/x"])
    assert cfg.classifier.epochs == 3 and cfg.cams.scales == (1.0, 2.0)
    assert cfg.cams.flip is False and cfg.model.pretrained is None and cfg.run_dir == "/tmp/x"
    # YAML 1.1 (PyYAML) reads an exponent without a dot as a string: numbers all the same
    cfg = load_config(None, ["classifier.weight_decay=1e-4", "classifier.lr=2E+1",
                             "crf.score_temperature=.5e1", "explain.road_percentiles=[1e1]"])
    assert (cfg.classifier.weight_decay, cfg.classifier.lr) == (1e-4, 20.0)
    assert cfg.crf.score_temperature == 5.0 and cfg.explain.road_percentiles == (10.0,)
    with pytest.raises(ConfigError, match=r"classifier\.lr: expected a number, got '1e-4x'"):
        load_config(None, ["classifier.lr=1e-4x"])
    with pytest.raises(ConfigError, match=r"classifier\.epochs: expected an integer, got 100\.0"):
        load_config(None, ["classifier.epochs=1e2"])


@pytest.mark.parametrize("override,match", [
    ("classifier.epoch=3", r"unknown config key classifier\.epoch .*known: .*epochs"),
    ("classifier.epochs=three", r"classifier\.epochs: expected an integer, got 'three'"),
    ("cams.flip=1", r"cams\.flip: expected true or false"),
    ("classifier.optimizer=adam", r"classifier\.optimizer: 'adam' is not one of"),
    ("cams.scales=1.0", r"cams\.scales: expected a list"),
    ("classifier.scale_range=[1, 2, 3]", r"expected 2 values"),
    ("nosuchsection.x=1", r"unknown config key nosuchsection"),
    ("classifier.epochs", r"not of the form key\.sub=value"),
])
def test_bad_keys_and_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("classifier:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key classifier\.epochz"):
        load_config(str(p))
    p.write_text("classifier: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_stage_hash_ignores_resources_but_not_results():
    base = PipelineConfig()
    more_actors = load_config(None, ["cams.num_actors=8", "cams.batch_size=64"])
    other_scales = load_config(None, ["cams.scales=[1.0]"])
    assert section_hash(base, ["cams"]) == section_hash(more_actors, ["cams"])
    assert section_hash(base, ["cams"]) != section_hash(other_scales, ["cams"])
    assert section_hash(base, ["cams"], ["a"]) != section_hash(base, ["cams"], ["b"])


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["data.subsets=[{split: val, images: v, masks: m}]"])
    again = load_config(None, [], base=to_dict(cfg))
    assert again == cfg and again.data.subsets[0].masks == "m"
    d = {}
    apply_override(d, "a.b.c=[1,2]")
    assert d == {"a": {"b": {"c": [1, 2]}}}


def test_config_command_prints_every_key_and_its_output_loads_back(tmp_path, capsys):
    from ray_wsss.cli import main

    assert main(["config", os.path.join(REPO, "configs", "camvid.yaml"),
                 "regularizers.puzzle.alpha=4.0", "cams.mcis_peers=3"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "full.yaml"
    path.write_text(printed)
    cfg = load_config(str(path))
    assert cfg == load_config(os.path.join(REPO, "configs", "camvid.yaml"),
                              ["regularizers.puzzle.alpha=4.0", "cams.mcis_peers=3"])
    assert cfg.regularizers.puzzle.alpha == 4.0 and cfg.model.backbone == "efficientnet-lite0"

    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    # every leaf of the config schema appears, defaults included
    assert set(keys(to_dict(PipelineConfig()))) == set(keys(__import__("yaml").safe_load(printed)))
    # no file: the demo's config; an override alone is not taken for a file name
    assert main(["config", "classifier.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_retraining_the_ordinary_classifier_in_place_makes_the_classifier_stale(tmp_path):
    from ray_wsss.run import Run

    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "model.pt").write_bytes(b"weights one")
    base = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    with_oc = load_config(None, [f"run_dir={tmp_path / 'run'}",
                                 f"regularizers.oc_cse.oc_model={oc}",
                                 "regularizers.oc_cse.weight=1.0"])
    before = Run(with_oc).current_hash("classifier")
    assert before == Run(with_oc).current_hash("classifier")
    (oc / "model.pt").write_bytes(b"weights two")
    after = Run(with_oc).current_hash("classifier")
    assert after != before
    assert Run(with_oc).current_hash("cams") != Run(base).current_hash("cams")
    # the OC's content counts only while OC-CSE is on
    off = load_config(None, [f"regularizers.oc_cse.oc_model={oc}"])
    off_before = Run(off).current_hash("classifier")
    (oc / "model.pt").write_bytes(b"weights three")
    assert Run(off).current_hash("classifier") == off_before
    assert Run(with_oc).current_hash("classifier") not in (before, after)
    assert Run(base).current_hash("classifier") == section_hash(
        base, ["model", "head", "regularizers", "classifier"],
        [Run(base).current_hash("dataset")])

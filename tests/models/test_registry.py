"""The model registry (ray_wsss/models/registry.py): round trips for each kind, old
model.json files, and errors that name the file."""
import json
import os

import pytest
import torch

from ray_wsss.config import ModelConfig
from ray_wsss.errors import ConfigError, DataError
from ray_wsss.models.classifier import (Classifier, build_classifier, load_classifier,
                                        save_classifier)
from ray_wsss.models.deeplab import (DeepLabV3Plus, build_segmenter, load_segmenter,
                                     save_segmenter)
from ray_wsss.models.registry import load_model, save_model

CFG = ModelConfig(backbone="resnet_mini")


def _spec(directory) -> dict:
    with open(os.path.join(directory, "model.json")) as fh:
        return json.load(fh)


def _rewrite_spec(directory, spec: dict) -> None:
    with open(os.path.join(directory, "model.json"), "w") as fh:
        json.dump(spec, fh)


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-default running statistics, so that a round trip that lost them would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def test_classifier_round_trip_through_the_registry(tmp_path):
    model = build_classifier(CFG, 3, kur=True).eval()
    _randomise_bn(model)
    save_classifier(model, CFG, str(tmp_path), ["a", "b", "c"], {"epochs": 4})
    spec = _spec(tmp_path)
    # the keys older readers rely on, plus the kind
    assert spec == {"kind": "classifier", "backbone": "resnet_mini", "output_stride": 16,
                    "num_classes": 3, "classes": ["a", "b", "c"], "in_channels": 3,
                    "kur": True, "mcis": False, "epochs": 4}
    x = torch.rand(2, 3, 48, 56) * 255
    for back in (load_model(str(tmp_path)), load_classifier(str(tmp_path))):
        assert isinstance(back, Classifier) and back.kur
        with torch.no_grad():
            assert torch.equal(model(x), back.eval()(x))


@pytest.mark.parametrize("backbone, phase", [("resnet_mini", 0), ("resnet50", 0),
                                             ("efficientnet-lite0", 1)])
def test_a_classifier_loaded_at_a_finer_stride_is_its_dense_evaluation(tmp_path, backbone,
                                                                        phase):
    """cams.output_stride: the stride-16 weights loaded at stride 8 compute the same
    function on a grid twice as fine. Sampled every second position, the stride-8 map
    is the stride-16 map exactly (phase 0 with ResNet's symmetric padding, 1 with
    EfficientNet's TF "same" padding on even sizes)."""
    cfg = ModelConfig(backbone=backbone, output_stride=16)
    model = build_classifier(cfg, 3, pretrained=False).eval()
    _randomise_bn(model)
    save_classifier(model, cfg, str(tmp_path), ["a", "b", "c"])
    dense = load_classifier(str(tmp_path), output_stride=8).eval()
    assert _spec(tmp_path)["output_stride"] == 16        # the saved model is unchanged
    x = torch.rand(2, 3, 128, 96) * 255
    with torch.no_grad():
        f16, f8 = model.features(x), dense.features(x)
    assert f16.shape[-2:] == (8, 6) and f8.shape[-2:] == (16, 12)
    scale = float(f16.abs().max())   # float sums in another order: 1e-4 of the range
    torch.testing.assert_close(f8[..., phase::2, phase::2], f16, atol=1e-4 * scale, rtol=0)
    # the same head on the denser map: class scores close to the stride-16 ones
    with torch.no_grad():
        assert (torch.sigmoid(dense(x)) - torch.sigmoid(model(x))).abs().max() < 0.2
    assert dense.backbone.output_stride == 8
    assert load_classifier(str(tmp_path)).backbone.output_stride == 16
    if backbone == "efficientnet-lite0":  # its builder dilates the same way
        built = build_classifier(ModelConfig(backbone=backbone, output_stride=8), 3,
                                 pretrained=False).eval()
        built.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(built.features(x), f8)
    with pytest.raises(ConfigError, match="cams.output_stride: 32 is coarser"):
        load_classifier(str(tmp_path), output_stride=32)


def test_segmenter_round_trip_through_the_registry(tmp_path):
    cfg = ModelConfig(backbone="resnet_mini", output_stride=8)
    # narrow head widths (not the paper's 256) must come back from model.json too
    model = build_segmenter(cfg, 4, in_channels=4, aspp_channels=32,
                            decoder_channels=48).eval()
    _randomise_bn(model)
    save_segmenter(model, cfg, str(tmp_path), ["bg", "a", "b", "c"], {"kind": "ignored"})
    assert _spec(tmp_path) == {"kind": "segmenter", "backbone": "resnet_mini",
                               "output_stride": 8, "num_labels": 4,
                               "classes": ["bg", "a", "b", "c"], "in_channels": 4,
                               "aspp_channels": 32, "decoder_channels": 48}
    x = torch.rand(1, 4, 45, 50) * 255
    for back in (load_model(str(tmp_path)), load_segmenter(str(tmp_path))):
        assert isinstance(back, DeepLabV3Plus) and back.output_stride == 8
        with torch.no_grad():
            assert torch.equal(model(x), back.eval()(x))
    # a plain state dict: loadable without running pickled code
    state = torch.load(os.path.join(tmp_path, "model.pt"), weights_only=True)
    assert state["decoder.classifier.weight"].shape == (4, 48, 1, 1)


def test_old_classifier_model_json_without_kind_still_loads(tmp_path):
    model = build_classifier(CFG, 2).eval()
    save_classifier(model, CFG, str(tmp_path), ["a", "b"])
    old = _spec(tmp_path)
    del old["kind"], old["mcis"], old["kur"], old["in_channels"]  # as the first versions wrote
    _rewrite_spec(tmp_path, old)
    back = load_classifier(str(tmp_path)).eval()
    x = torch.rand(1, 3, 40, 40) * 255
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    assert isinstance(load_model(str(tmp_path)), Classifier)


def test_unknown_kind_is_a_config_error_naming_the_kind_and_the_file(tmp_path):
    save_classifier(build_classifier(CFG, 2), CFG, str(tmp_path), ["a", "b"])
    _rewrite_spec(tmp_path, {**_spec(tmp_path), "kind": "transformer"})
    with pytest.raises(ConfigError, match=r"model\.json: unknown model kind 'transformer'") \
            as err:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_loading_the_wrong_kind_is_a_config_error(tmp_path):
    save_segmenter(build_segmenter(CFG, 2), CFG, str(tmp_path), ["bg", "a"])
    with pytest.raises(ConfigError, match="holds a segmenter, expected a classifier"):
        load_classifier(str(tmp_path))


def test_weights_that_do_not_match_model_json_name_model_pt(tmp_path):
    save_classifier(build_classifier(CFG, 2), CFG, str(tmp_path), ["a", "b"])
    _rewrite_spec(tmp_path, {**_spec(tmp_path), "num_classes": 5})
    with pytest.raises(DataError, match=r"model\.pt: weights do not match model\.json"):
        load_classifier(str(tmp_path))


def test_save_model_needs_a_registered_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_model(build_classifier(CFG, 2), str(tmp_path), {"backbone": "resnet_mini"})
    assert not os.path.exists(tmp_path / "model.json")


def test_affinity_net_round_trip_through_the_registry(tmp_path):
    """Kind "affinity": the frozen backbone travels in model.pt, so the loaded network
    gives the same boundary map with nothing else to read."""
    from ray_wsss.models.affinity import AffinityNet, build_affinity_net, save_affinity_net

    model = build_affinity_net(CFG, pretrained=False).eval()
    _randomise_bn(model)
    save_affinity_net(model, CFG, str(tmp_path), {"epochs": 2, "kind": "ignored"})
    assert _spec(tmp_path) == {"kind": "affinity", "backbone": "resnet_mini",
                               "output_stride": 16, "channels": 32, "epochs": 2}
    x = torch.rand(1, 3, 50, 42) * 255
    back = load_model(str(tmp_path), kind="affinity")
    assert isinstance(back, AffinityNet)
    with torch.no_grad():
        assert torch.equal(model(x), back.eval()(x))
    with pytest.raises(ConfigError, match="holds a affinity, expected a classifier"):
        load_model(str(tmp_path), kind="classifier")


def test_load_puts_the_whole_model_on_the_requested_device(tmp_path):
    """map_location alone leaves the freshly built model (and its non-persistent input
    mean/std buffers) on the CPU: a CAM actor on a GPU then failed on its first batch
    (seen on an H200, 2026-11-27). The meta device stands in for CUDA here."""
    save_classifier(build_classifier(CFG, 3), CFG, str(tmp_path / "c"), ["a", "b", "c"])
    save_segmenter(build_segmenter(CFG, 4, aspp_channels=16, decoder_channels=16), CFG,
                   str(tmp_path / "s"), ["bg", "a", "b", "c"])
    for model in (load_classifier(str(tmp_path / "c"), "meta"),
                  load_segmenter(str(tmp_path / "s"), "meta")):
        devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
        assert devices == {"meta"}

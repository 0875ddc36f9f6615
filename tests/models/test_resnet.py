import os

import pytest
import torch

from ray_wsss.config import ModelConfig
from ray_wsss.models.classifier import build_classifier, load_classifier, save_classifier
from ray_wsss.models.resnet import build_resnet, load_torchvision_weights


@pytest.mark.parametrize("name,params,keys", [
    # torchvision's published parameter counts with the 1000-class fc layer
    ("resnet18", 11_689_512, 122), ("resnet50", 25_557_032, 320)])
def test_parameter_names_and_counts_match_torchvision(name, params, keys):
    net = build_resnet(name)
    fc = torch.nn.Linear(net.out_channels, 1000)
    n = sum(p.numel() for p in net.parameters()) + sum(p.numel() for p in fc.parameters())
    assert n == params
    state = net.state_dict()
    assert len(state) + 2 == keys  # + fc.weight, fc.bias
    assert "layer1.0.downsample.0.weight" in state or name == "resnet18"
    assert "layer2.0.downsample.1.running_var" in state and "bn1.num_batches_tracked" in state


@pytest.mark.parametrize("os_, size", [(16, 8), (8, 16), (32, 4)])
def test_output_stride(os_, size):
    net = build_resnet("resnet18", output_stride=os_).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 512, size, size)
    assert [o.shape[-1] for o in net.forward_stages(torch.zeros(1, 3, 128, 128))][:2] == [32, 16]


def test_torchvision_weight_file_loads_and_a_wrong_one_fails(tmp_path):
    src = build_resnet("resnet18", output_stride=32)
    state = dict(src.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = str(tmp_path / "resnet18.pth")
    torch.save(state, path)
    dst = build_resnet("resnet18", output_stride=16)  # dilation changes no parameter
    load_torchvision_weights(dst, path)
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="not a torchvision weight file"):
        load_torchvision_weights(build_resnet("resnet34"), path)


def test_classifier_save_load_round_trip(tmp_path):
    cfg = ModelConfig(backbone="resnet_mini")
    model = build_classifier(cfg, 5).eval()
    save_classifier(model, cfg, str(tmp_path), ["a", "b", "c", "d", "e"])
    back = load_classifier(str(tmp_path)).eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.allclose(model(x), back(x))
    # weights_only loading: the file is a plain state dict
    state = torch.load(os.path.join(tmp_path, "model.pt"), weights_only=True)
    assert "classifier.weight" in state and state["classifier.weight"].shape == (5, 256, 1, 1)

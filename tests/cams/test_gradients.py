"""Input-gradient methods (cams/gradients.py) beyond the per-image reference of
test_methods.py: FullGrad's completeness on a network with BatchNorm, max-pooling and
in-place ReLUs, SmoothGrad's noise handling, and every method through TTA and MapMaker
on the real resnet_mini backbone."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_wsss.cams.gradients import fullgrad_terms
from ray_wsss.cams.methods import METHODS, MethodOptions
from ray_wsss.errors import ConfigError
from ray_wsss.models.classifier import Classifier

from .test_methods import K, batch, close, fullgrad_reference_map, make

NEW = ("hirescam", "xgradcam", "layercam", "layercam-fused", "eigencam", "eigengradcam",
       "ablationcam", "gradient", "smoothgrad", "fullgrad")


class BatchNormBackbone(nn.Module):
    """conv - BN - ReLU - maxpool - conv(bias) - BN - ReLU, in eval mode with random
    statistics: every kind of bias FullGrad collects, and in-place ReLUs after them."""
    out_channels = 6

    def __init__(self, inplace: bool):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=inplace)
        g = torch.Generator().manual_seed(5)
        for bn in (self.bn1, self.bn2):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g))
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(n, generator=g))
            bn.bias.data.copy_(torch.randn(n, generator=g))

    def forward_stages(self, x):
        s1 = F.max_pool2d(self.relu(self.bn1(self.c1(x))), 2)
        return [s1, self.relu(self.bn2(self.c2(s1)))]

    def forward(self, x):
        return self.forward_stages(x)[-1]


def bn_model(inplace=True):
    torch.manual_seed(0)
    m = Classifier(BatchNormBackbone(inplace), K, mean=(120.0, 110.0, 100.0),
                   std=(60.0, 60.0, 60.0))
    if not inplace:
        m.load_state_dict(bn_model(True).state_dict())
    return m.double().eval()


def test_fullgrad_terms_add_up_to_the_score():
    """Completeness: for a piecewise-linear network, sum(ds/dz z) + sum_l sum(ds/dh_l b_l)
    = s_c, with BatchNorm's effective bias."""
    model = bn_model()
    x, _ = batch()
    coeffs = torch.eye(K, dtype=x.dtype)[:, None, :].expand(K, x.shape[0], K)
    sums, logits = fullgrad_terms(
        model, x, coeffs, lambda inp, biases: inp.sum((2, 3, 4)) + sum(
            t.sum((2, 3, 4)) for t in biases), chunk=3)
    close(sums.t(), logits)
    close(logits, model(x))


def test_fullgrad_through_in_place_relus_equals_the_hooked_reference():
    """The reference keeps each layer's output with retain_grad, which an in-place ReLU
    would overwrite, so it runs on the same network built without in-place ReLUs."""
    model, plain = bn_model(inplace=True), bn_model(inplace=False)
    x, classes = batch()
    maps, _ = METHODS["fullgrad"](model, x, classes)
    for b in range(x.shape[0]):
        for u in torch.nonzero(classes[b]).flatten().tolist():
            close(maps[b, u], fullgrad_reference_map(plain, x[b], u))
    close(METHODS["fullgrad"](plain, x, classes)[0], maps)


@pytest.mark.parametrize("name", ["layercam-fused", "gradient", "smoothgrad", "eigengradcam"])
def test_grad_chunk_does_not_change_the_maps(name):
    model = bn_model()
    x, classes = batch()
    one = METHODS[name](model, x, classes, MethodOptions(grad_chunk=1, smoothgrad_samples=2))
    many = METHODS[name](model, x, classes, MethodOptions(grad_chunk=8, smoothgrad_samples=2))
    close(one[0], many[0])


def test_smoothgrad_without_noise_is_the_gradient_and_its_noise_is_per_image():
    model = make()
    x, classes = batch()
    grad, _ = METHODS["gradient"](model, x, classes)
    close(METHODS["smoothgrad"](model, x, classes,
                                MethodOptions(smoothgrad_noise=0.0, smoothgrad_samples=2))[0],
          grad)
    opts = MethodOptions(smoothgrad_samples=3, seed=11)
    together, _ = METHODS["smoothgrad"](model, x, classes, opts)
    for b in range(x.shape[0]):  # an image's maps do not depend on its batch
        close(METHODS["smoothgrad"](model, x[b:b + 1], classes[b:b + 1], opts)[0][0],
              together[b])
    assert not torch.allclose(together, grad)


def test_layercam_fused_needs_backbone_stages():
    class Flat(nn.Module):
        out_channels = 3

        def forward(self, x):
            return F.avg_pool2d(x, 4)

    model = Classifier(Flat(), K, mean=(0, 0, 0), std=(1, 1, 1)).double().eval()
    x, classes = batch()
    with pytest.raises(ConfigError, match="forward_stages"):
        METHODS["layercam-fused"](model, x, classes)


def test_every_new_method_through_tta_and_map_maker_on_resnet_mini(tmp_path):
    """The real backbone (BatchNorm, in-place ReLU, dilation, forward_stages), each
    method through MapMaker's TTA, images of two sizes in one call."""
    from ray_wsss.cams.predict import MapMaker
    from ray_wsss.config import ModelConfig
    from ray_wsss.models.classifier import build_classifier, save_classifier

    cfg = ModelConfig(backbone="resnet_mini", output_stride=16, pretrained=None)
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg, K, pretrained=False), cfg, str(tmp_path),
                    [f"c{i}" for i in range(K)])
    maker = MapMaker(str(tmp_path), scales=(1.0, 0.5), flip=True,
                     options={"smoothgrad_samples": 2, "ablation_batch": 64})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48, 3), np.uint8),
              rng.integers(0, 255, (32, 32, 3), np.uint8),
              rng.integers(0, 255, (40, 48, 3), np.uint8)]
    sets = [np.array([0, 3]), np.array([1]), np.array([], np.int64)]
    for name in NEW:
        maps, probs = maker.maps(METHODS[name], images, sets)
        assert [m.shape for m in maps] == [(2, 40, 48), (1, 32, 32), (0, 40, 48)], name
        assert all(np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 for m in maps[:2]), \
            name
        assert maps[0].max() > 0, name
        assert probs.shape == (3, K)


@pytest.mark.parametrize("name", ["gradient", "fullgrad", "layercam-fused"])
def test_sub_batches_by_class_count_give_each_image_its_own_maps(name):
    """Images wanting 3, 1, 2 and no classes: run as one batch (split by class count)
    and one by one, the same maps and logits."""
    model = bn_model()
    x, classes = batch()
    x = torch.cat([x, x[:1] * 0.5])
    classes = torch.cat([classes, torch.zeros(1, K, dtype=classes.dtype)])
    maps, logits = METHODS[name](model, x, classes)
    for b in range(len(x)):
        one, lg = METHODS[name](model, x[b:b + 1], classes[b:b + 1])
        close(maps[b:b + 1], one)
        close(logits[b:b + 1], lg)
    assert torch.all(maps[3] == 0) and maps[:3].amax() > 0

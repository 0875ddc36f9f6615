"""Dense evaluation of a trained network at a finer output stride.

The "algorithme à trous" (Holschneider et al. 1989), as DeepLab (Chen et al. 2015) turns
an ImageNet classifier into a dense feature extractor: the strided convolution that
would take the features past the target stride runs with stride 1, and every spatial
convolution after it is dilated by the stride removed. The network then computes the
same function on a grid `current / target` times finer: sampled at the coarse grid's
positions, the new map equals the old one, and the positions between are new samples
of the same function, not an interpolation. The weights are untouched (strides and
dilations hold none), so a classifier trained at output stride 16 gives CAMs at stride
8 without retraining: `cams.output_stride`.

This is exact whatever dilations the trained network already had (the package's
BasicBlock ResNets keep the previous dilation in a dilated stage's first block, so
building them at stride 8 is a different function from densifying the stride-16 one).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def densify(model: nn.Module, current: int, target: int, where: str = "output_stride"
            ) -> nn.Module:
    """`model` (trained at output stride `current`), changed in place to compute the
    same function at output stride `target` (<= current); returns it.

    Only the backbone's modules (`model.backbone` where there is one) are visited, in
    registration order, which for the package's backbones is the order of the data
    flow: a head with spatial convolutions after the backbone is left as it is. A
    strided 1x1 convolution (ResNet's shortcut projection, parallel to its block's
    strided 3x3) follows the decision taken for that 3x3."""
    if target > current:
        raise ConfigError(f"{where}: {target} is coarser than the stride the model was "
                          f"trained at ({current}); only finer strides can be evaluated")
    if current % target:
        raise ConfigError(f"{where}: {target} does not divide the model's stride {current}")
    net = getattr(model, "backbone", model)
    stride, factor, last_destrided = 1, 1, False
    for m in net.modules():
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            if s > 1 and stride * s > target:
                raise ConfigError(f"{where}: {target} would remove the stride of a pooling "
                                  "layer, which dilation cannot replace")
            stride *= s
            continue
        if not isinstance(m, nn.Conv2d):
            continue
        k, s = m.kernel_size[0], m.stride[0]
        if k == 1:
            if s > 1 and last_destrided:
                m.stride = (1, 1)
            continue
        if factor > 1:
            old = m.dilation[0]
            symmetric = m.padding == (old * (k - 1) // 2,) * 2
            m.dilation = (old * factor,) * 2
            if symmetric and old * (k - 1) // 2 > 0:
                m.padding = (old * factor * (k - 1) // 2,) * 2
        if s > 1:
            last_destrided = stride * s > target
            if last_destrided:
                m.stride = (1, 1)
                factor *= s
            else:
                stride *= s
    if stride != target or factor != current // target:
        raise ConfigError(f"{where}: could not evaluate the model at stride {target} "
                          f"(strides found: {stride}, removed: {factor})")
    if hasattr(net, "output_stride"):
        net.output_stride = target
    return model

"""ResNet backbones with torchvision-identical parameter names and dilated last stages.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016). The module tree
(`conv1`, `bn1`, `layer1..4`, `downsample.0/1`, ...) matches torchvision's so that a
torchvision ImageNet state dict (`resnet50-0676ba61.pth` and friends) loads with
`load_state_dict(strict=True)` once its `fc.*` entries are dropped. The registry's
torchvision wheel is a CUDA build that does not import with the CPU torch, so the
architecture lives here instead of being imported.

Output stride follows torchvision's `replace_stride_with_dilation`: OS16 turns the stride
of `layer4` into dilation 2 (as IRN and Puzzle-CAM do for CAMs), OS8 also `layer3`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1,
                 first_dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=first_dilation,
                               dilation=first_dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1,
                 first_dilation: int = 1):
        super().__init__()
        del first_dilation  # torchvision applies the running dilation to every 3x3 here
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Feature extractor: `forward(x: (B, 3, H, W)) -> (B, out_channels, H/os, W/os)`.

    `forward_stages` returns every stage (strides 4, 8, 16|8, 16|8), for decoders.
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512), output_stride: int = 16,
                 in_channels: int = 3):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        dilate = {32: (False, False, False), 16: (False, False, True),
                  8: (False, True, True)}[output_stride]
        self.inplanes = widths[0]
        self.dilation = 1
        self.output_stride = output_stride
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, dilate[2])
        self.out_channels = widths[3] * block.expansion
        self.stage_channels = tuple(w * block.expansion for w in widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample,
                        dilation=previous_dilation, first_dilation=previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation,
                         first_dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


_SPECS = {
    # name: (block, layers, widths)
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512)),
    # Small from-scratch backbone so that the demo trains in minutes on a laptop CPU.
    "resnet_mini": (BasicBlock, (1, 1, 1, 1), (32, 64, 128, 256)),
}

RESNET_NAMES = tuple(_SPECS)


def build_resnet(name: str, output_stride: int = 16, in_channels: int = 3) -> ResNet:
    if name not in _SPECS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(_SPECS)}")
    block, layers, widths = _SPECS[name]
    return ResNet(block, layers, widths, output_stride, in_channels)


def load_torchvision_weights(model: ResNet, path: str) -> None:
    """Load a torchvision ImageNet checkpoint (a plain state dict) into `model`.

    The classifier (`fc.*`) is dropped; everything else must match exactly, so a file
    for another depth fails loudly instead of half-loading.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] != model.conv1.weight.shape[1]:
        # Extra input channels (e.g. a mask channel) start from zero so the pretrained
        # RGB response is unchanged at initialisation.
        padded = torch.zeros_like(model.conv1.weight)
        padded[:, : conv1.shape[1]] = conv1
        state["conv1.weight"] = padded
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a torchvision weight file for this ResNet "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")

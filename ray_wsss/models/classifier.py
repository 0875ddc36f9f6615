"""Multi-label classifier for CAMs: backbone at output stride 16, GAP, 1x1 conv head
without bias (Zhou et al. 2016, as IRN and Puzzle-CAM build it).

Images enter as float RGB in 0..255 (B, 3, H, W); each backbone's own normalisation is
part of the model, so no caller has to know it. A model is saved as `model.pt` (a plain
state dict, loadable with `weights_only=True`) beside `model.json` (how to rebuild it),
through `registry.py`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .mcis import CoAttention
from .registry import load_model, save_model
from .resnet import RESNET_NAMES, build_resnet, load_torchvision_weights

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
BACKBONES = RESNET_NAMES + ("efficientnet-lite0",)


def build_backbone(cfg: ModelConfig, in_channels: int = 3, pretrained: bool = True
                   ) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """Backbone and its input normalisation (mean, std on the 0..255 scale)."""
    if cfg.backbone in RESNET_NAMES:
        net = build_resnet(cfg.backbone, cfg.output_stride, in_channels)
        if pretrained and cfg.pretrained:
            if not os.path.isfile(cfg.pretrained):
                raise ConfigError(f"model.pretrained: no weight file at {cfg.pretrained} "
                                  "(download torchvision's ImageNet weights there first)")
            load_torchvision_weights(net, cfg.pretrained)
        return net, IMAGENET_MEAN, IMAGENET_STD
    if cfg.backbone == "efficientnet-lite0":
        from .efficientnet import MEAN, STD, EfficientNetLite
        if cfg.pretrained not in (None, "registry"):
            raise ConfigError("model.pretrained for efficientnet-lite0 must be 'registry' "
                              "(the packaged ImageNet weights) or null")
        net = EfficientNetLite("efficientnet-lite0", cfg.output_stride,
                               pretrained=pretrained and cfg.pretrained == "registry",
                               in_channels=in_channels)
        return net, MEAN, STD
    raise ConfigError(f"model.backbone: unknown {cfg.backbone!r} "
                      f"(choose one of {', '.join(BACKBONES)})")


def kernel_usage(weight: torch.Tensor) -> torch.Tensor:
    """Kernel Usage Regularization (David, Pedrini and Dias 2022): W * softmax over classes
    of (W - max over classes of W). weight (K, C) -> (K, C). Each kernel's weight is
    scaled by how much its class uses it relative to the other classes, so a kernel
    drives few classes."""
    return weight * torch.softmax(weight - weight.amax(dim=0, keepdim=True), dim=0)


class Classifier(nn.Module):
    """`forward(images) -> logits (B, K)`; `features(images) -> (B, C, h, w)`;
    `class_maps(features) -> (B, K, h, w)` (W A, before any ReLU).

    `kur`: the head's weights are reparametrised by `kernel_usage` in training and in
    every use of `head_weight()` (CAMs included)."""

    def __init__(self, backbone: nn.Module, num_classes: int, mean, std, in_channels: int = 3,
                 kur: bool = False, mcis: bool = False):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.kur = kur
        # the MCIS co-attention branch (models/mcis.py), trained with image pairs
        self.co_attention = CoAttention(backbone.out_channels, num_classes) if mcis else None
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        extra = in_channels - len(mean)
        self.register_buffer("mean", torch.tensor(list(mean) + [0.0] * extra).view(1, -1, 1, 1),
                             persistent=False)
        # extra channels (the iterative loop's prior M in [0, 1]) arrive on the images'
        # 0..255 scale: divided back to [0, 1]
        self.register_buffer("std", torch.tensor(list(std) + [255.0] * extra).view(1, -1, 1, 1),
                             persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def head_weight(self) -> torch.Tensor:
        """The classifier weights W (K, C), after KUR when it is on."""
        w = self.classifier.weight.flatten(1)
        return kernel_usage(w) if self.kur else w

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(feats, 1).flatten(1) @ self.head_weight().t()

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kc->bkhw", feats, self.head_weight())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(images))


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The convolution that reads the input images (its in_channels are the image's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError("no convolution in the model")


def zero_extra_inputs(model: nn.Module, rgb: int = 3) -> None:
    """Zero the first layer's weights of the input channels beyond RGB, so that a model
    fed extra channels (the loop's prior) starts out computing what the RGB model does,
    whatever those channels hold."""
    conv = first_conv(getattr(model, "backbone", model))
    with torch.no_grad():
        conv.weight[:, rgb:] = 0


def warm_start(model: nn.Module, previous: nn.Module, rgb: int = 3) -> None:
    """Copy the weights of `previous` (the last round's classifier) into `model`; the
    first layer's RGB weights are copied and its extra input channels left at zero,
    whatever the two models' channel counts."""
    own = model.state_dict()
    conv_key = next(k for k, v in own.items() if v.ndim == 4)  # the first conv's weight
    state = {}
    for k, v in previous.state_dict().items():
        if k not in own:
            continue
        if k == conv_key:
            w = torch.zeros_like(own[k])
            w[:, :rgb] = v[:, :rgb]
            v = w
        if own[k].shape == v.shape:
            state[k] = v
    model.load_state_dict(state, strict=False)


def build_classifier(cfg: ModelConfig, num_classes: int, in_channels: int = 3,
                     pretrained: bool = True, kur: bool = False, mcis: bool = False
                     ) -> Classifier:
    backbone, mean, std = build_backbone(cfg, in_channels, pretrained)
    return Classifier(backbone, num_classes, mean, std, in_channels, kur, mcis)


def save_classifier(model: Classifier, cfg: ModelConfig, directory: str,
                    classes: list[str] | tuple[str, ...], extra: dict | None = None) -> None:
    """Write model.pt + model.json (kind "classifier") into `directory` (a local path or
    a URI); see `registry.save_model`."""
    model = getattr(model, "module", model)
    spec = {"kind": "classifier", "backbone": cfg.backbone,
            "output_stride": cfg.output_stride, "num_classes": model.num_classes,
            "classes": list(classes), "in_channels": int(model.mean.shape[1]),
            "kur": model.kur, "mcis": model.co_attention is not None}
    spec.update(extra or {})
    spec["kind"] = "classifier"  # what load_model dispatches on: extra must not change it
    save_model(model, directory, spec)


def load_classifier(directory: str, map_location: str | torch.device = "cpu",
                    output_stride: int | None = None) -> Classifier:
    """The classifier saved in `directory` (also by versions that wrote no "kind");
    `output_stride`: evaluated densely at this stride (`registry.load_model`)."""
    return load_model(directory, map_location, kind="classifier",
                      output_stride=output_stride)

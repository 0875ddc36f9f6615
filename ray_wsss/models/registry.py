"""Saving and loading every model of the package, dispatched on the `kind` in model.json.

A saved model is a directory (a local path or any URI `storage` understands) with
`model.pt`, a plain state dict loadable with `torch.load(weights_only=True)` (no pickled
code runs on load), and `model.json`, the spec its builder needs to rebuild the module
before the weights go in, plus `"kind"`. model.json is written last, so a directory
with a model.json always has its weights.

Registering a kind is one entry in `BUILDERS` (spec -> untrained module). A model.json
without "kind" was written before the registry existed and is a classifier.
"""
from __future__ import annotations

import io
from typing import Callable

import torch
from torch import nn

from .. import storage
from ..config import ModelConfig
from ..errors import ConfigError, DataError

# model.json files written before kinds existed are all classifiers
DEFAULT_KIND = "classifier"


def _classifier_from_spec(spec: dict) -> nn.Module:
    from .classifier import build_classifier  # here: classifier.py imports this module
    cfg = ModelConfig(backbone=spec["backbone"], output_stride=spec["output_stride"],
                      pretrained=None)
    return build_classifier(cfg, spec["num_classes"], spec.get("in_channels", 3),
                            pretrained=False, kur=spec.get("kur", False),
                            mcis=spec.get("mcis", False))


def _segmenter_from_spec(spec: dict) -> nn.Module:
    from .deeplab import build_segmenter  # here: deeplab.py imports this module
    cfg = ModelConfig(backbone=spec["backbone"], output_stride=spec["output_stride"],
                      pretrained=None)
    return build_segmenter(cfg, spec["num_labels"], spec.get("in_channels", 3),
                           pretrained=False, aspp_channels=spec.get("aspp_channels", 256),
                           decoder_channels=spec.get("decoder_channels", 256))


def _affinity_from_spec(spec: dict) -> nn.Module:
    from .affinity import build_affinity_net  # here: affinity.py imports this module
    cfg = ModelConfig(backbone=spec["backbone"], output_stride=spec["output_stride"],
                      pretrained=None)
    return build_affinity_net(cfg, pretrained=False, channels=spec.get("channels", 32))


def _c2am_from_spec(spec: dict) -> nn.Module:
    from .c2am import build_c2am  # here: c2am.py imports this module
    cfg = ModelConfig(backbone=spec["backbone"], output_stride=spec["output_stride"],
                      pretrained=None)
    return build_c2am(cfg, pretrained=False)


BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "classifier": _classifier_from_spec,
    "segmenter": _segmenter_from_spec,
    "affinity": _affinity_from_spec,
    "c2am": _c2am_from_spec,
}


def save_model(model: nn.Module, directory: str, spec: dict) -> None:
    """Write `model.pt` (the state dict) and `model.json` (`spec`, which must name a
    registered "kind" and hold what that kind's builder reads) into `directory`."""
    kind = spec.get("kind")
    if kind not in BUILDERS:
        raise ValueError(f"save_model: spec['kind'] must be one of {', '.join(BUILDERS)}, "
                         f"got {kind!r}")
    model = getattr(model, "module", model)  # unwrap DDP: its keys carry a "module." prefix
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes_atomic(storage.join(directory, "model.pt"), buf.getvalue())
    storage.write_json_atomic(storage.join(directory, "model.json"), dict(spec))


def read_spec(directory: str) -> dict:
    """model.json of the model in `directory`, with "kind" filled in for old files."""
    spec = storage.read_json(storage.join(directory, "model.json"))
    spec.setdefault("kind", DEFAULT_KIND)
    return spec


def load_model(directory: str, map_location: str | torch.device = "cpu", *,
               kind: str | None = None, output_stride: int | None = None) -> nn.Module:
    """The model saved in `directory` by `save_model`, its weights on `map_location`.

    `kind`: the kind the caller expects; another kind raises ConfigError (naming the
    file) instead of handing, say, a segmenter to code that wants a classifier.
    `output_stride`: evaluate the model densely at this (finer) stride instead of the
    one it was trained at (`dense.densify`): the same weights, the same function on a
    grid twice as fine at 8 for a stride-16 model."""
    json_path = storage.join(directory, "model.json")
    spec = read_spec(directory)
    found = spec["kind"]
    if found not in BUILDERS:
        raise ConfigError(f"{json_path}: unknown model kind {found!r} "
                          f"(known kinds: {', '.join(BUILDERS)})")
    if kind is not None and found != kind:
        raise ConfigError(f"{json_path}: holds a {found}, expected a {kind}")
    model = BUILDERS[found](spec)
    pt_path = storage.join(directory, "model.pt")
    state = torch.load(io.BytesIO(storage.read_bytes(pt_path)), map_location="cpu",
                       weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # strict loading: weights for another architecture must not half-load
        first = str(exc).splitlines()[0]
        raise DataError(f"weights do not match model.json ({first})", path=pt_path) from None
    if output_stride is not None and output_stride != spec["output_stride"]:
        from .dense import densify
        densify(model, spec["output_stride"], output_stride, where="cams.output_stride")
    # load_state_dict copies the weights into the freshly built (CPU) model, whose
    # non-persistent buffers (input mean/std) are not in the file at all: the model
    # itself goes to the device, not just the loaded tensors.
    return model.to(map_location)

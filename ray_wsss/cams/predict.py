"""Class maps of decoded images with a loaded classifier: the common core of the CAM
stage and of `explain` (and of the actors that run them).

Images of one size are batched together; images larger than `max_side` are shrunk for
the network (a 6000x4000 photo at TTA scale 2 would need tens of GB) and their maps are
resized back, so outputs always match the image.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..data.codecs import scaled_size
from ..data.transforms import resize_any
from .methods import Method, MethodOptions


class MapMaker:
    def __init__(self, model_dir: str, scales=(1.0,), flip: bool = False, threads: int = 1,
                 use_gpu: bool = False, options: dict | None = None,
                 max_side: int | None = None, mcis: dict | None = None,
                 allow_cpu_fallback: bool = False, where: str = "cams.gpus_per_actor",
                 output_stride: int | None = None):
        """`output_stride`: the classifier evaluated densely at this stride (None: the
        one it was trained at; `cams.output_stride`). `mcis`: {"bank": {class: [ids]},
        "peers": N, "seed": s} and either "images": {id: encoded bytes} or "dataset":
        the dataset folder to read the bank's images from, turns on MCIS
        co-segmentation (cams/mcis.py) with N peers.
        `use_gpu` without a usable CUDA device is a ConfigError naming `where` (the key
        that asked for GPUs) unless `allow_cpu_fallback` (runtime.torch_device)."""
        import torch

        from ..models.classifier import load_classifier
        from ..runtime import torch_device

        torch.set_num_threads(max(1, threads))
        self.device = torch_device(use_gpu, allow_cpu_fallback, where)
        self.model = load_classifier(model_dir, self.device, output_stride).eval()
        self.scales, self.flip = tuple(scales), flip
        self.options = MethodOptions(**(options or {}))
        self.max_side = max_side
        self.peers = None
        if mcis and mcis.get("peers", 0) > 0:
            from .mcis import PeerBank, read_bank_images
            images = mcis.get("images") or read_bank_images(mcis["dataset"], mcis["bank"])
            self.peers = PeerBank(images, mcis["bank"], max_side)
            self.n_peers, self.peer_seed = mcis["peers"], mcis.get("seed", 0)

    def _method(self, method: Method, ids, idx) -> Method:
        if self.peers is None or ids is None:
            return method
        from .mcis import McisMethod
        return McisMethod(method, self.peers, [str(ids[i]) for i in idx], self.n_peers,
                          self.peer_seed)

    def _groups(self, images: Sequence[np.ndarray]):
        """(indices, batch tensor (n, 3, h, w) float) per network input size."""
        import torch

        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(scaled_size(*img.shape[:2], self.max_side), []).append(i)
        for (h, w), idx in by_size.items():
            arr = np.stack([img if img.shape[:2] == (h, w) else
                            resize_any(img, (w, h), cv2.INTER_AREA)
                            for img in (images[i] for i in idx)])
            x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float()
            yield idx, x

    def probs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Sigmoid outputs (n, K) of the unaugmented images."""
        import torch

        out = np.zeros((len(images), self.model.num_classes), np.float32)
        with torch.no_grad():
            for idx, x in self._groups(images):
                out[idx] = torch.sigmoid(self.model(x)).cpu().numpy()
        return out

    def maps(self, method: Method, images: Sequence[np.ndarray],
             class_sets: Sequence[np.ndarray], ids: Sequence[str] | None = None
             ) -> tuple[list[np.ndarray], np.ndarray]:
        """Maps (|class_sets[i]|, H_i, W_i) in [0, 1] per image, and probabilities (n, K).
        `ids` (the image ids) are needed for MCIS co-segmentation only."""
        from .tta import tta_maps

        maps: list[np.ndarray | None] = [None] * len(images)
        probs = np.zeros((len(images), self.model.num_classes), np.float32)
        for idx, x in self._groups(images):
            group_maps, p = tta_maps(self.model, self._method(method, ids, idx), x,
                                     [class_sets[i] for i in idx], self.scales, self.flip,
                                     self.options)
            for j, i in enumerate(idx):
                h, w = images[i].shape[:2]
                m = group_maps[j]
                if m.shape[1:] != (h, w):
                    m = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR)
                                  for c in m]) if len(m) else np.zeros((0, h, w), np.float32)
                maps[i] = m
                probs[i] = p[j]
        return maps, probs

    def raw_maps(self, method: Method, images: Sequence[np.ndarray],
                 class_sets: Sequence[np.ndarray], ids: Sequence[str] | None = None
                 ) -> list[np.ndarray]:
        """Unnormalised maps per image: (S, 1 + flip, |class_sets[i]|, H_i, W_i) float32,
        per scale and flip, for combining any TTA subset later (`tta.scale_maps`)."""
        from .tta import scale_maps

        out: list[np.ndarray | None] = [None] * len(images)
        for idx, x in self._groups(images):
            raw, _, union = scale_maps(self.model, self._method(method, ids, idx), x,
                                       [class_sets[i] for i in idx], self.scales, self.flip,
                                       self.options)
            raw = raw.cpu().numpy().astype(np.float32)
            pos = {c: j for j, c in enumerate(union)}
            for j, i in enumerate(idx):
                r = raw[:, :, j][:, :, [pos[int(c)] for c in class_sets[i]]]
                h, w = images[i].shape[:2]
                if r.shape[-2:] != (h, w):
                    s, f, n = r.shape[:3]
                    flat = r.reshape(-1, *r.shape[-2:])
                    r = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
                                  for m in flat]).reshape(s, f, n, h, w) if len(flat) else \
                        np.zeros((s, f, n, h, w), np.float32)
                out[i] = r
        return out

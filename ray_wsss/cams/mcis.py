"""MCIS co-segmentation at inference (Sun et al. 2020): for each class c of an image, the
co-attention maps of c with N peer images holding c are averaged with the image's own map.

Peers come from a small bank per class (`cams.mcis_bank` train images, chosen by seed
from the label index). Their features are computed once per actor and kept, so the
cost per image grows with N only through the co-attention product (HW_m x HW_n), not
through another backbone pass per pair. Peers are drawn per (image, class) with
replacement, as the reference does, from a generator seeded by (seed, image id, class):
the same image always gets the same peers, whatever actor or batch it lands in.

Per scale, the combined map of class c is (M_c / max M_c + mean_j C_cj / max C_cj) / 2,
where C_cj = ReLU(co-attention class map of c with peer j); TTA then sums scales as
usual. With N = 0 nothing is wrapped: the method's own maps, unchanged.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .methods import Method, MethodOptions


class FeatureCache:
    """Proxy of the classifier that computes `features(x)` once per input tensor, so the
    explaining method and the co-attention share one backbone pass."""

    def __init__(self, model):
        self._model = model
        self._key: torch.Tensor | None = None
        self._value: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._key:
            with torch.no_grad():
                self._key, self._value = x, self._model.features(x)
        return self._value

    def __call__(self, x):
        return self._model(x)

    def __getattr__(self, name):
        return getattr(self._model, name)


def choose_bank(labels: np.ndarray, ids: Sequence[str], per_class: int, seed: int
                ) -> dict[int, list[str]]:
    """Up to `per_class` image ids per class (0-based) from a label index (N, K)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels) > 0
    bank = {}
    for c in range(labels.shape[1]):
        holders = np.flatnonzero(labels[:, c])
        if len(holders):
            pick = rng.choice(holders, min(per_class, len(holders)), replace=False)
            bank[c] = [str(ids[i]) for i in sorted(pick)]
    return bank


def draw_peers(bank: dict[int, list[str]], image_id: str, cls: int, n: int, seed: int
               ) -> list[str]:
    """n peers holding class `cls` for `image_id` (never the image itself)."""
    pool = [p for p in bank.get(cls, []) if p != image_id]
    if not pool or n <= 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(str(image_id).encode()), cls])
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def read_bank_images(dataset: str, bank: dict[int, list[str]]) -> dict[str, bytes]:
    """The encoded images of the bank's ids, read from the dataset folder (filters pushed
    down to the Parquet files)."""
    from ..data.dataset import read_table

    ids = sorted({i for v in bank.values() for i in v})
    table = read_table(dataset, ["image_id", "image"], ids=ids)
    images = dict(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
    missing = [i for i in ids if i not in images]
    if missing:
        raise ConfigError(f"{dataset}: MCIS peer image(s) {missing[:5]} are not in the "
                          "dataset (was it re-imported after the CAM stage started?)")
    return images


class PeerBank:
    """Peer images by id, with what the co-attention needs of them computed once (at
    scale 1): their features F_n (C, HW_n) and their class projections W_cls F_n (K, HW_n)."""

    def __init__(self, encoded: dict[str, bytes], bank: dict[int, list[str]],
                 max_side: int | None = None):
        from ..data.codecs import decode_image

        self.images = {i: decode_image(b, f"peer image_id {i}", max_side=max_side)
                       for i, b in encoded.items()}
        self.bank = {int(c): list(v) for c, v in bank.items()}
        self._features: dict[str, torch.Tensor] = {}
        self._projected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def features(self, model, image_id: str, device) -> torch.Tensor:
        """(1, C, h_n, w_n)."""
        if image_id not in self._features:
            x = torch.from_numpy(self.images[image_id]).to(device).permute(2, 0, 1)[None]
            with torch.no_grad():
                self._features[image_id] = model.features(x.float())
        return self._features[image_id]

    def projected(self, model, image_id: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_n (C, HW_n), W_cls F_n (K, HW_n)) of the co-attention head."""
        if image_id not in self._projected:
            fn = self.features(model, image_id, device)[0].flatten(1)
            w = model.co_attention.classifier.weight.flatten(1)  # (K, C): 1x1 conv, no bias
            with torch.no_grad():
                self._projected[image_id] = (fn, w @ fn)
        return self._projected[image_id]


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def co_maps(model, feats: torch.Tensor, peers: Sequence[tuple[torch.Tensor, torch.Tensor]]
            ) -> list:
    """The normalised ReLU co-attention class maps (K, h, w) of one image (feats
    (1, C, h, w)) with each peer, from the peers' cached projections, without forming F'_m.

    The co-attended features of m are F'_m = F_n B^T with B = softmax over n's positions
    of P = F_m^T W_P F_n, and the class head is linear without bias, so its maps are
    W_cls F'_m = (W_cls F_n) B^T: per pair one (HW_m x C)(C x HW_n) product for P and a
    (K x HW_n)(HW_n x HW_m) one for the maps, with W_P F_m shared by all peers. Peers of
    one feature size go as one batch. peers: (F_n (C, HW_n), W_cls F_n (K, HW_n)) each."""
    h, w = feats.shape[2:]
    q = model.co_attention.W_P(feats[0].flatten(1).T)          # (HW_m, C) = F_m^T W_P^T
    out: list = [None] * len(peers)
    by_size: dict = {}
    for j, (fn, _) in enumerate(peers):
        by_size.setdefault(fn.shape[1], []).append(j)
    for idx in by_size.values():
        fn = torch.stack([peers[j][0] for j in idx])              # (J, C, HW_n)
        proj = torch.stack([peers[j][1] for j in idx])            # (J, K, HW_n)
        b = torch.softmax(torch.matmul(q, fn), dim=2)             # (J, HW_m, HW_n)
        maps = torch.bmm(proj, b.transpose(1, 2)).view(len(idx), -1, h, w)
        maps = _unit(F.relu(maps))
        for k, j in enumerate(idx):
            out[j] = maps[k]
    return out


class McisMethod:
    """Wraps an explaining method with MCIS co-segmentation for one batch of images."""

    def __init__(self, method: Method, peers: PeerBank, image_ids: Sequence[str], n: int,
                 seed: int):
        self.method, self.peers, self.ids, self.n, self.seed = method, peers, image_ids, n, seed
        self._drawn: dict = {}  # the same peers at every scale and flip of an image

    def _draws(self, image_id: str, classes: list[int]) -> dict[int, list[str]]:
        key = (image_id, tuple(classes))
        if key not in self._drawn:
            self._drawn[key] = {c: draw_peers(self.peers.bank, image_id, c, self.n, self.seed)
                                for c in classes}
        return self._drawn[key]

    def __call__(self, model, images, classes, opts: MethodOptions = MethodOptions()):
        if model.co_attention is None:
            raise ConfigError("MCIS co-segmentation needs a classifier trained with "
                             "regularizers.mcis.enabled")
        cached = FeatureCache(model)
        own, logits = self.method(cached, images, classes, opts)
        feats = cached.features(images)
        b = len(self.ids)
        out = own.clone()
        with torch.no_grad():
            for i in range(images.shape[0]):
                image_id = self.ids[i % b]  # the second half of a flipped batch: same ids
                draws = self._draws(image_id, torch.nonzero(classes[i]).flatten().tolist())
                unique = sorted({p for ids in draws.values() for p in ids})
                if not unique:
                    continue
                maps = dict(zip(unique, co_maps(model, feats[i:i + 1], [
                    self.peers.projected(model, p, images.device) for p in unique])))
                for c, ids in draws.items():
                    if ids:
                        co = torch.stack([maps[p][c] for p in ids]).mean(0)
                        if co.shape != own[i, c].shape:
                            # methods whose maps are at input or stage resolution
                            # (gradients, FullGrad, fused LayerCAM) meet the feature-
                            # resolution co-attention maps at the method's resolution
                            co = _unit(F.interpolate(co[None, None], size=own.shape[-2:],
                                                     mode="bilinear",
                                                     align_corners=False)[0, 0])
                        out[i, c] = (_unit(own[i, c]) + co) / 2
        return out, logits

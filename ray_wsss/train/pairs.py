"""Image pairs for MCIS training (Sun et al. 2020): each image of a step is paired with an
image that shares at least one of its classes.

The pairs are drawn on the training worker, from a pool of the images it has already
been given this epoch: the current batch, the last `size` augmented images, and the last
`per_class` images of every class (so that an image of a rare class finds a peer seen
long before, as a label index would give it). No image is decoded or sent twice and the
pairs change every epoch. The draws depend on (seed, epoch, rank, step) and the images'
labels only: the same stream of batches gives the same pairs. An image with no peer in
the pool (the first of its class this epoch on this worker) is paired with itself (MCIS
also trains on such self-pairs; its co-attention is then plain self-attention).
"""
from __future__ import annotations

import numpy as np


def sample_partners(labels: np.ndarray, pool: np.ndarray, self_index: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """For each image a partner index into `pool` that holds one of its classes.

    labels (B, K) multi-hot of the images, pool (P, K) multi-hot of the candidates, in
    which image i itself sits at `self_index[i]`. Each image draws one of its classes
    uniformly, then a candidate holding it (never itself) uniformly: every class of an
    image gets its turn over the epochs. Where no candidate holds the class, the image
    is its own partner. Returns (B,) indices into `pool`.
    """
    labels, pool = np.asarray(labels) > 0, np.asarray(pool) > 0
    partners = np.asarray(self_index, dtype=np.int64).copy()
    for i in range(len(labels)):
        classes = np.flatnonzero(labels[i])
        if len(classes) == 0:
            continue
        c = rng.choice(classes)
        peers = np.flatnonzero(pool[:, c])
        peers = peers[peers != self_index[i]]
        if len(peers):
            partners[i] = rng.choice(peers)
    return partners


class PairPool:
    """The partner images of a training worker: `draw` pairs a batch with the batch itself,
    the last `size` images before it and the last `per_class` images of each class.
    Images stay as they arrive (uint8, on the training device), so the pool costs at most
    (size + per_class x K) x H x W x 3 bytes."""

    def __init__(self, size: int, seed: int, rank: int = 0, per_class: int = 2):
        self.size, self.seed, self.rank, self.per_class = size, seed, rank, per_class
        self.images = self.labels = None
        self.by_class: dict[int, tuple] = {}
        self.epoch = None

    def draw(self, images, labels, epoch: int, step: int):
        """images (B, H, W, 3) uint8, labels (B, K) float -> the partners' (images, labels),
        same shapes. A new epoch starts from an empty pool (a resumed run draws the same
        pairs as an uninterrupted one)."""
        import torch

        if epoch != self.epoch or (self.images is not None
                                   and self.images.shape[1:] != images.shape[1:]):
            self.images = self.labels = None
            self.by_class = {}
            self.epoch = epoch
        earlier = [] if self.images is None else [(self.images, self.labels)]
        earlier += [self.by_class[c] for c in sorted(self.by_class)]
        pool_x = torch.cat([x for x, _ in earlier] + [images])
        pool_y = torch.cat([y for _, y in earlier] + [labels])
        first = len(pool_x) - len(images)
        rng = np.random.default_rng([self.seed, epoch, self.rank, step])
        idx = sample_partners(labels.cpu().numpy(), pool_y.cpu().numpy(),
                              first + np.arange(len(images)), rng)
        idx = torch.from_numpy(idx).to(pool_x.device)
        if self.images is not None:
            images_kept = torch.cat([self.images, images])
            labels_kept = torch.cat([self.labels, labels])
        else:
            images_kept, labels_kept = images, labels
        keep = len(images_kept) - min(self.size, len(images_kept))
        self.images, self.labels = images_kept[keep:], labels_kept[keep:]
        if self.per_class > 0:
            has = labels > 0
            for c in torch.nonzero(has.any(0)).flatten().tolist():
                rows = torch.nonzero(has[:, c]).flatten()
                x_c, y_c = images[rows], labels[rows]
                if c in self.by_class:
                    x_c = torch.cat([self.by_class[c][0], x_c])
                    y_c = torch.cat([self.by_class[c][1], y_c])
                self.by_class[c] = (x_c[-self.per_class:], y_c[-self.per_class:])
        return pool_x[idx], pool_y[idx]

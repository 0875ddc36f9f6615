"""Image pairs for MCIS training (Sun et al. 2020): each image of a step is paired with an
image that shares at least one of its classes.

The pairs are drawn on the training worker, from a pool of the images it has just been
given (the current batch plus the last `size` augmented images of this epoch), so that
no image is decoded or sent twice and the pairs change every epoch. The draws depend on
(seed, epoch, rank, step) and the images' labels only: the same stream of batches gives
the same pairs. An image with no peer in the pool is paired with itself (MCIS also
trains on such self-pairs; its co-attention is then plain self-attention).
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
    """The partner images of a training worker: `draw` pairs a batch with the batch itself
    and the last `size` images before it. Images stay as they arrive (uint8, on the
    training device), so the pool costs size x H x W x 3 bytes."""

    def __init__(self, size: int, seed: int, rank: int = 0):
        self.size, self.seed, self.rank = size, seed, rank
        self.images = self.labels = None
        self.epoch = None

    def draw(self, images, labels, epoch: int, step: int):
        """images (B, H, W, 3) uint8, labels (B, K) float -> the partners' (images, labels),
        same shapes. A new epoch starts from an empty pool (a resumed run draws the same
        pairs as an uninterrupted one)."""
        import torch

        if epoch != self.epoch:
            self.images = self.labels = None
            self.epoch = epoch
        if self.images is None or self.images.shape[1:] != images.shape[1:]:
            pool_x, pool_y = images, labels
        else:
            pool_x = torch.cat([self.images, images])
            pool_y = torch.cat([self.labels, labels])
        first = len(pool_x) - len(images)
        rng = np.random.default_rng([self.seed, epoch, self.rank, step])
        idx = sample_partners(labels.cpu().numpy(), pool_y.cpu().numpy(),
                              first + np.arange(len(images)), rng)
        idx = torch.from_numpy(idx).to(pool_x.device)
        self.images, self.labels = pool_x[-self.size:], pool_y[-self.size:]
        return pool_x[idx], pool_y[idx]

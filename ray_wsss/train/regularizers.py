"""The classifier's training objective with its regularizers, as one module for DDP.

`TrainingModel.forward` computes every loss of a step, so that every parameter it uses
goes through DistributedDataParallel's forward (DDP synchronises the gradients of what
its own forward used). Formulas in ../shared/METHODS.md; defaults from the papers' code.

- Puzzle-CAM (Jo and Yu 2021): the image cut into 2x2 tiles (row-major), the tiles'
  class maps merged back; BCE on both streams + alpha * mean |M_full - M_merged| over
  the image's classes (raw maps, no ReLU: the reference's default "feature" level).
- OC-CSE (Kweon et al. 2021): one ground-truth class r per image, chosen at random, is
  erased with the model's own map (ReLU, upsampled, divided by its maximum over the
  batch: a soft mask, no threshold); the frozen ordinary classifier sees the erased
  image and is scored against the labels without r; the gradient flows through the
  mask into the model, pushing its map to cover all of r.
- P-NOC (David et al. 2024): after the model's step, the OC takes its own step on a hard
  mask of the detached maps (keep pixels whose per-map normalised CAM <= threshold),
  against all labels, r included: an adversary that finds what the CAM missed. Unlike
  the reference, the OC's gradients from the model's step are not kept.
- MCIS (Sun et al. 2020): pairs (m, n) sharing a class; own BCE on both, co-attention
  BCE against the shared classes, contrastive co-attention BCE against the classes of m
  that n lacks (from `contrast_from_epoch` on, only where that set is non-empty).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RegularizersConfig


def ramp(progress: float, start: float, end: float, fraction: float = 1.0) -> float:
    """Linear from `start` at progress 0 to `end` at progress `fraction`, then `end`."""
    if fraction <= 0:
        return end
    return start + (end - start) * min(progress / fraction, 1.0)


def tile_images(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (4B, C, H/2, W/2): [top-left; top-right; bottom-left; bottom-right]."""
    h, w = images.shape[2] // 2, images.shape[3] // 2
    return torch.cat([images[:, :, :h, :w], images[:, :, :h, w:2 * w],
                      images[:, :, h:2 * h, :w], images[:, :, h:2 * h, w:2 * w]])


def merge_tiles(tiles: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of `tile_images` on maps: (4B, K, h, w) -> (B, K, 2h, 2w)."""
    tl, tr, bl, br = torch.split(tiles, batch)
    return torch.cat([torch.cat([tl, tr], dim=3), torch.cat([bl, br], dim=3)], dim=2)


def _gap(maps: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(maps, 1).flatten(1)


def choose_classes(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ground-truth class per image, uniformly at random: (B,) class indices."""
    weights = labels.float() + 1e-12 * (labels.sum(1, keepdim=True) == 0)
    return torch.multinomial(weights.cpu(), 1, generator=generator).flatten().to(labels.device)


def erase(images: torch.Tensor, maps: torch.Tensor, chosen: torch.Tensor,
          mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OC-CSE's soft erasing: mask = ReLU(upsampled M_r) / max over the batch; erased pixels
    become the input mean ("nothing"). Returns (erased images, mask (B, 1, H, W))."""
    m = maps[torch.arange(len(chosen)), chosen][:, None]
    m = F.relu(F.interpolate(m, size=images.shape[2:], mode="bilinear", align_corners=False))
    mask = m / (m.max() + 1e-5)
    return mean + (images - mean) * (1 - mask), mask


def hard_mask(images: torch.Tensor, maps: torch.Tensor, chosen: torch.Tensor,
              mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """P-NOC's OC input: keep pixels where the per-map normalised CAM of r <= threshold."""
    m = maps[torch.arange(len(chosen)), chosen][:, None]
    m = F.relu(F.interpolate(m, size=images.shape[2:], mode="bilinear", align_corners=False))
    m = m / (m.amax(dim=(2, 3), keepdim=True) + 1e-5)
    return mean + (images - mean) * (m <= threshold).float()


class TrainingModel(nn.Module):
    """Wraps the classifier; `forward` returns (loss, parts) of one training step."""

    def __init__(self, classifier: nn.Module, cfg: RegularizersConfig):
        super().__init__()
        self.classifier = classifier
        self.cfg = cfg

    def forward(self, images: torch.Tensor, labels: torch.Tensor, progress: float = 0.0,
                epoch: int = 1, partner: torch.Tensor | None = None,
                partner_labels: torch.Tensor | None = None, oc: nn.Module | None = None,
                generator: torch.Generator | None = None):
        model, cfg = self.classifier, self.cfg
        feats = model.features(images)
        logits = model.logits_from_features(feats)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        parts = {"cls": loss.detach()}
        maps = None
        if cfg.puzzle.alpha > 0 or cfg.oc_cse.weight > 0:
            maps = model.class_maps(feats)
        if cfg.puzzle.alpha > 0:
            b = images.shape[0]
            merged = merge_tiles(model.class_maps(model.features(tile_images(images))), b)
            puzzle_cls = F.binary_cross_entropy_with_logits(_gap(merged), labels)
            recon = ((maps - merged).abs() * labels[:, :, None, None]).mean()
            alpha = ramp(progress, 0.0, cfg.puzzle.alpha, cfg.puzzle.alpha_schedule)
            loss = loss + puzzle_cls + alpha * recon
            parts.update(puzzle_cls=puzzle_cls.detach(), puzzle_recon=recon.detach())
        if cfg.oc_cse.weight > 0 and oc is not None:
            chosen = choose_classes(labels, generator)
            erased, _ = erase(images, maps, chosen, model.mean)
            remaining = labels.clone()
            remaining[torch.arange(len(chosen)), chosen] = 0
            oc_loss = F.binary_cross_entropy_with_logits(frozen_call(oc, erased), remaining)
            weight = ramp(progress, cfg.oc_cse.weight_init, cfg.oc_cse.weight)
            loss = loss + weight * oc_loss
            parts.update(oc=oc_loss.detach(), chosen=chosen, maps=maps.detach())
        if cfg.mcis.enabled and partner is not None:
            loss = loss + self._mcis(feats, partner, labels, partner_labels, epoch, parts)
        return loss, parts

    def _mcis(self, fm, partner, ym, yn, epoch, parts) -> torch.Tensor:
        model, cfg = self.classifier, self.cfg.mcis
        co = model.co_attention
        fn = model.features(partner)
        own_n = F.binary_cross_entropy_with_logits(model.logits_from_features(fn), yn)
        am, an = co(fm, fn)
        common = ym * yn
        co_loss = (F.binary_cross_entropy_with_logits(co.logits(am), common)
                   + F.binary_cross_entropy_with_logits(co.logits(an), common)) / 2
        total = own_n + cfg.co_weight * co_loss
        parts.update(mcis_own_partner=own_n.detach(), mcis_co=co_loss.detach())
        if epoch >= cfg.contrast_from_epoch:
            terms = []
            for own, att, y in ((fm, am, ym - common), (fn, an, yn - common)):
                rows = y.sum(1) > 0
                if rows.any():
                    lg = co.logits(co.complement(own[rows], att[rows]))
                    terms.append(F.binary_cross_entropy_with_logits(lg, y[rows]))
            if terms:
                contrast = torch.stack(terms).mean()
                total = total + cfg.contrast_weight * contrast
                parts["mcis_contrast"] = contrast.detach()
        return total


def frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with its parameters treated as constants: the gradient reaches x (the
    erasing mask, hence the model) but never the module's own weights."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = dict(module.named_buffers())
    return torch.func.functional_call(module, (params, buffers), (x,))


def pnoc_oc_loss(oc: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                 chosen: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """The adversarial OC's loss: find every class, r included, in what the CAM left."""
    x = hard_mask(images, maps, chosen, mean, threshold)
    return F.binary_cross_entropy_with_logits(oc(x), labels)

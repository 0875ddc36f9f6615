"""Stage `saliency`: the C²AM saliency of every image (Ray Data actors), scored against
ground-truth foreground.

C²AM-H (Xie et al. CVPR 2022; David et al. 2024, P-NOC). Each actor loads the fitted C²AM
(stage `c2am`) once. Per image: the map A = σ(logits) of the image (averaged with its
mirror's logits when `saliency.flip`), upsampled (bilinear) to the image; the saliency
mask argmax([saliency.threshold, A]) (CCAM: 0.2), cleaned by a dense CRF from labels
(`saliency.crf`, IRN's label CRF). Images larger than `max_image_side` are shrunk for the
network and the CRF; both outputs are resized back.

Output rows (saliency/*.parquet): image_id, split, saliency (8-bit grayscale PNG of A at
the image's size: what `affinity.labels_from: saliency` thresholds), saliency_mask
(palette PNG, 1 salient / 0 not), mask (the ground truth as foreground 1 / background 0
/ 255 ignore, where there is one: the scoring needs no join). The scores on every split
with ground truth go to metrics.json under the step's key: the 2-label confusion metrics
of the mask, with foreground precision / recall and `fg_share_in_background` (the share
of ground-truth foreground among the pixels the mask calls background).
"""
from __future__ import annotations

import cv2
import numpy as np

from ..actors import ActorResources, map_with_model
from ..config import CrfConfig, SaliencyConfig
from ..data.codecs import decode_image, decode_mask, encode_mask, scaled_size
from ..data.dataset import dataset_counts, open_dataset, split_rows
from ..errors import DataError
from ..runtime import write_parquet
from .crf import crf_from_labels

LABELS = ("background", "foreground")


def saliency_crf_config(cfg: SaliencyConfig) -> CrfConfig:
    k = cfg.crf
    return CrfConfig(iterations=k.iterations, gaussian_sxy=k.gaussian_sxy,
                     gaussian_compat=k.gaussian_compat, bilateral_sxy=k.bilateral_sxy,
                     bilateral_srgb=k.bilateral_srgb, bilateral_compat=k.bilateral_compat)


def saliency_mask(image: np.ndarray, activation: np.ndarray, cfg: SaliencyConfig
                  ) -> np.ndarray:
    """image (H, W, 3) uint8, A (H, W) in [0, 1] -> (H, W) uint8 1 salient / 0: the
    argmax over [threshold, A] (a tie is background), refined by the label CRF."""
    labels = (activation > cfg.threshold).astype(np.int64)
    if cfg.crf.iterations <= 0:
        return labels.astype(np.uint8)
    return crf_from_labels(image, labels, 2, saliency_crf_config(cfg),
                           cfg.crf.gt_prob).astype(np.uint8)


def foreground_truth(mask: np.ndarray) -> np.ndarray:
    """Class mask (0 background, classes, 255) -> 0 background / 1 object / 255."""
    out = (mask > 0).astype(np.uint8)
    out[mask == 255] = 255
    return out


def encode_gray(values: np.ndarray) -> bytes:
    """(H, W) in [0, 1] -> 8-bit grayscale PNG."""
    ok, buf = cv2.imencode(".png", np.round(np.clip(values, 0, 1) * 255).astype(np.uint8))
    if not ok:
        raise ValueError(f"OpenCV could not encode a {values.shape} map")
    return buf.tobytes()


def decode_saliency(data: bytes | None, where: str) -> np.ndarray:
    """The `saliency` column -> (H, W) float32 in [0, 1]."""
    return decode_mask(data, where).astype(np.float32) / 255


class SaliencyPredictor:
    """Ray Data callable class: dataset rows -> saliency maps and masks."""

    def __init__(self, model_dir: str, cfg: SaliencyConfig, threads: int = 1,
                 use_gpu: bool = False, allow_cpu_fallback: bool = False):
        import torch

        from ..models.registry import load_model
        from ..runtime import torch_device

        torch.set_num_threads(max(1, threads))
        self.device = torch_device(use_gpu, allow_cpu_fallback, "saliency.gpus_per_actor")
        self.model = load_model(model_dir, self.device, kind="c2am").eval()
        self.cfg = cfg

    def activation(self, image: np.ndarray) -> np.ndarray:
        """image (H, W, 3) uint8 -> A (H, W) float32 in [0, 1]."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)
        x = x[None].float()
        with torch.no_grad():
            logits = self.model.logits(x)
            if self.cfg.flip:
                logits = (logits + self.model.logits(x.flip(-1)).flip(-1)) / 2
            a = F.interpolate(torch.sigmoid(logits), size=image.shape[:2], mode="bilinear",
                              align_corners=False)
        return a[0, 0].cpu().numpy()

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image (H, W, 3) uint8 -> (A (H, W) float32, mask (H, W) uint8 0/1)."""
        h, w = image.shape[:2]
        nh, nw = scaled_size(h, w, self.cfg.max_image_side)
        small = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh),
                                                            interpolation=cv2.INTER_AREA)
        a = self.activation(small)
        mask = saliency_mask(small, a, self.cfg)
        if (nh, nw) != (h, w):
            a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        return a, mask

    def __call__(self, batch: dict) -> dict:
        maps, masks, truths = [], [], []
        for image_id, data, gt in zip(batch["image_id"], batch["image"], batch["mask"]):
            where = f"image_id {image_id}"
            image = decode_image(data, where)
            a, mask = self.predict(image)
            maps.append(encode_gray(a))
            masks.append(encode_mask(mask))
            if gt is None:
                truths.append(None)
                continue
            truth = decode_mask(gt, f"mask of {where}")
            if truth.shape != image.shape[:2]:
                raise DataError(f"mask is {truth.shape[1]}x{truth.shape[0]}, the image "
                                f"{image.shape[1]}x{image.shape[0]}", row=str(image_id))
            truths.append(encode_mask(foreground_truth(truth)))
        column = np.empty(len(truths), dtype=object)
        column[:] = truths
        return {"image_id": batch["image_id"], "split": batch["split"],
                "saliency": np.array(maps, dtype=object),
                "saliency_mask": np.array(masks, dtype=object), "mask": column}


def saliency_dataset(config, dataset_path: str, model_dir: str):
    """The (lazy) Ray Dataset of saliency rows for `saliency.splits`."""
    from ..runtime import gpus_usable

    cfg = config.saliency
    use_gpu = gpus_usable(cfg.gpus_per_actor > 0, config.ray.allow_cpu_fallback,
                          "saliency.gpus_per_actor", probe_gpus=cfg.gpus_per_actor)
    ds = open_dataset(dataset_path, ["image_id", "split", "image", "mask"], list(cfg.splits),
                      rows_per_block=cfg.batch_size)
    res = ActorResources.of(cfg, "saliency")
    if cfg.gpus_per_actor > 0 and not use_gpu:  # the CPU fallback: no GPU to ask Ray for
        res = ActorResources(cfg.num_actors or 1, cfg.cpus_per_actor, 0.0, "saliency")
    return map_with_model(
        ds, SaliencyPredictor,
        {"model_dir": model_dir, "cfg": cfg, "threads": cfg.torch_threads or cfg.cpus_per_actor,
         "use_gpu": use_gpu, "allow_cpu_fallback": config.ray.allow_cpu_fallback},
        res, cfg.batch_size, rows=split_rows(dataset_path, cfg.splits))


def score(folder: str, batch_size: int = 16) -> dict:
    """Per split with ground truth: {"saliency_mask": 2-label metrics, "fg_precision",
    "fg_recall", "fg_iou", "fg_share_in_background", "images"}."""
    from ..evaluate import ConfusionMatrix, _masks_batch, _sums

    out = {}
    for split in sorted(dataset_counts(folder)):
        ds = open_dataset(folder, ["image_id", "mask", "saliency_mask"], [split],
                          require=("mask",), rows_per_block=batch_size)
        totals = _sums(ds.map_batches(_masks_batch, batch_size=batch_size,
                                      batch_format="numpy",
                                      fn_kwargs={"columns": ["saliency_mask"], "n_labels": 2}),
                       ["saliency_mask"])
        if not totals:
            continue
        conf = ConfusionMatrix(2, totals["saliency_mask"])
        m = conf.metrics(LABELS)
        mat = conf.mat.astype(np.float64)
        called_bg = mat[:, 0].sum()
        fg = m["per_class"]["foreground"]
        out[split] = {"saliency_mask": m, "fg_precision": fg["precision"],
                      "fg_recall": fg["recall"], "fg_iou": fg["iou"],
                      "fg_share_in_background": (float(mat[1, 0] / called_bg)
                                                 if called_bg else None),
                      "images": int(mat.sum() > 0) and _images(folder, split)}
    return out


def _images(folder: str, split: str) -> int:
    from ..data.dataset import read_table

    index = read_table(folder, ["image_id", "mask"], [split])
    return int(sum(index.column("mask").is_valid().to_pylist()))


def run(config, ctx) -> dict:
    with ctx.output() as out:
        write_parquet(saliency_dataset(config, ctx.dataset_path, ctx.input("c2am")), out,
                      config.ray)
    scored = score(ctx.path, config.evaluate.batch_size)
    ctx.write_metrics({"splits": list(scored), "scores": scored})
    return {f"{split}_fg_iou": round(100 * (s["fg_iou"] or 0.0), 2)
            for split, s in scored.items()}

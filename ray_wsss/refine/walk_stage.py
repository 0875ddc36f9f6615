"""Stage `random_walk`: IRN's random-walk pseudo masks, on Ray Data actors (GPUs when
`random_walk.gpus_per_actor` > 0), scored against ground truth.

Ahn, Cho and Kwak (CVPR 2019), `make_sem_seg_labels`; the walk itself is the sparse one
of `refine/random_walk.py` (never an N x N matrix: memory linear in the pixels, any image
size). Each actor loads the fitted boundary network (stage `affinity`) once, and each
holds an index of the CAM folder, whose `cam` column it reads by image_id for its batch
(the images stream from the dataset). Per image:

1. boundary map B at stride 4: sigmoid of the mean of the network's logits on the image
   and on its mirror image (flipped back), as IRN (`random_walk.flip`);
2. affinities on the pairs within `random_walk.radius` (1 - path max of B);
3. the CAMs of the image's classes, area-averaged to the stride-4 grid (and, with
   `walked_background`, AffinityNet's background map (1 - max CAM) ** background_power
   in front), walked `steps` steps with A ** `beta`, starting from M ⊙ (1 - B);
4. mask (`refine.random_walk.walk_to_mask`): the walked maps upsampled x4, divided by
   their global max, background where no class beats `background_threshold` (IRN);
   with `random_walk.crf.iterations` > 0, as Puzzle-CAM's `make_pseudo_labels`: the
   label map is the argmax of a dense CRF whose unary is -log of those same scores
   [background_threshold plane, walked maps / max] (kernels of `random_walk.crf`).

Images larger than `max_image_side` are shrunk for the network and the walk; the mask
is resized back (nearest). Output rows (random_walk/*.parquet): image_id, split, mask
(the ground truth, small, kept so the scoring needs no join), rw_mask (PNG, the image's
size), boundary (8-bit grayscale PNG of B at stride 4, for the report). The scores on
every split that has ground truth go to metrics.json under the step's key.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ..actors import ActorResources, map_with_model
from ..config import CrfConfig, RandomWalkConfig
from ..data.codecs import decode_array, decode_image, encode_mask, scaled_size
from ..data.dataset import (dataset_counts, label_matrix, open_dataset, split_rows,
                            vector_to_labels)
from ..runtime import write_parquet

STRIDE = 4  # the boundary map's


def walk_crf_config(cfg: RandomWalkConfig) -> CrfConfig:
    k = cfg.crf
    return CrfConfig(iterations=k.iterations, gaussian_sxy=k.gaussian_sxy,
                     gaussian_compat=k.gaussian_compat, bilateral_sxy=k.bilateral_sxy,
                     bilateral_srgb=k.bilateral_srgb, bilateral_compat=k.bilateral_compat)


def walked_scores(walked, classes: Sequence[int], cfg: RandomWalkConfig, background: bool,
                  size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The scores whose argmax is `walk_to_mask`'s label map, for the CRF:
    ((L, H, W) float32, keys (L,) uint8). walked: (n, h, w) at stride 4."""
    import torch
    import torch.nn.functional as F

    classes = np.asarray(classes, np.int64)
    up = F.interpolate(torch.as_tensor(walked).float()[None], scale_factor=STRIDE,
                       mode="bilinear", align_corners=False)[0, :, :size[0], :size[1]]
    up = (up / up.max().clamp(min=1e-12)).cpu().numpy()
    if not background:
        return up, classes.astype(np.uint8)
    keys = np.concatenate([[0], classes]).astype(np.uint8)
    if cfg.walked_background:
        return up, keys
    plane = np.full((1,) + up.shape[1:], cfg.background_threshold, np.float32)
    return np.concatenate([plane, up]), keys


class RandomWalker:
    """Ray Data callable class: dataset rows -> random-walk masks and boundary maps."""

    def __init__(self, model_dir: str, cams_dir: str, cfg: RandomWalkConfig,
                 background: bool = True, threads: int = 1, use_gpu: bool = False,
                 allow_cpu_fallback: bool = False):
        import torch

        from ..data.join import ColumnLookup
        from ..models.registry import load_model
        from ..runtime import torch_device
        from .affinity import pair_offsets

        torch.set_num_threads(max(1, threads))
        self.device = torch_device(use_gpu, allow_cpu_fallback, "random_walk.gpus_per_actor")
        self.model = load_model(model_dir, self.device, kind="affinity").eval()
        # the CAMs are looked up here, by id: no second actor pool to share the CPUs with
        self.cams = ColumnLookup(cams_dir, ["cam"])
        self.cfg, self.background = cfg, background
        self.offsets = pair_offsets(cfg.radius)

    def boundary(self, images):
        """images (H, W, 3) uint8, or a list of them of one size -> B (ceil(H/4),
        ceil(W/4)) float32 tensor in [0, 1] (B, h, w for a list: one forward pass)."""
        import torch

        one = isinstance(images, np.ndarray)
        x = torch.from_numpy(np.stack([images] if one else images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        with torch.no_grad():
            logits = self.model.boundary_logits(x)
            if self.cfg.flip:
                logits = (logits + self.model.boundary_logits(x.flip(-1)).flip(-1)) / 2
        b = torch.sigmoid(logits)[:, 0]
        return b[0] if one else b

    def walk(self, image: np.ndarray, cams: np.ndarray, classes: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
        """image (H, W, 3) uint8, cams (n, H, W) of `classes` -> (mask (H, W) uint8,
        boundary (h, w) uint8 0..255 at stride 4 of the network's input)."""
        return self.walk_many([image], [cams], [classes])[0]

    def walk_many(self, images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                  classes: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`walk` for several images: those of one network input size share one boundary
        forward pass and one batched walk (`random_walk` on (B, n, h, w))."""
        import torch
        import torch.nn.functional as F

        from ..models.affinity import path_max_affinity
        from .random_walk import random_walk

        cfg = self.cfg
        small = []
        for image in images:
            h, w = image.shape[:2]
            nh, nw = scaled_size(h, w, cfg.max_image_side)
            small.append(image if (nh, nw) == (h, w) else cv2.resize(
                image, (nw, nh), interpolation=cv2.INTER_AREA))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(small):
            by_size.setdefault(im.shape[:2], []).append(i)
        out: list = [None] * len(images)
        for idx in by_size.values():
            b = self.boundary([small[i] for i in idx])
            maps = []
            for j, i in enumerate(idx):
                m = F.interpolate(torch.as_tensor(cams[i], dtype=torch.float32)[None].to(
                    self.device), size=tuple(b.shape[1:]), mode="area")[0]
                if cfg.walked_background and self.background:
                    bg = (1 - m.max(0).values).clamp(min=0) ** cfg.background_power \
                        if len(m) else torch.ones_like(b[j])
                    m = torch.cat([bg[None], m])
                maps.append(m)
            width = max(len(m) for m in maps)
            walked = None
            if width:
                stack = b.new_zeros(len(idx), width, *b.shape[1:])
                for j, m in enumerate(maps):
                    stack[j, :len(m)] = m
                affinity = path_max_affinity(b[:, None], self.offsets)
                walked = random_walk(stack, affinity, self.offsets, cfg.beta, cfg.steps,
                                     boundary=b)
            for j, i in enumerate(idx):
                boundary_png = np.round(b[j].cpu().numpy() * 255).astype(np.uint8)
                out[i] = (self._mask(images[i], small[i], walked[j, :len(maps[j])]
                                     if walked is not None else None,
                                     np.asarray(classes[i], np.int64)), boundary_png)
        return out

    def _mask(self, image: np.ndarray, small: np.ndarray, walked, classes: np.ndarray
              ) -> np.ndarray:
        """The label map (H, W) uint8 of one image from its walked maps."""
        from ..refine.crf import dense_crf
        from .random_walk import walk_to_mask

        cfg = self.cfg
        h, w = image.shape[:2]
        nh, nw = small.shape[:2]
        if len(classes) == 0:   # nothing to walk: all background
            return np.zeros((h, w), np.uint8)
        if cfg.crf.iterations > 0:
            scores, keys = walked_scores(walked, classes, cfg, self.background, (nh, nw))
            mask = keys[dense_crf(small, scores, walk_crf_config(cfg)).argmax(0)]
        else:
            mask = walk_to_mask(walked, classes, cfg.background_threshold,
                                cfg.walked_background and self.background, self.background,
                                size=(nh, nw), stride=STRIDE)
        if (nh, nw) != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        return mask.astype(np.uint8)

    def __call__(self, batch: dict) -> dict:
        found = self.cams.lookup(batch["image_id"])["cam"]
        images, cams, classes = [], [], []
        for image_id, data, cam, vec in zip(batch["image_id"], batch["image"], found,
                                            label_matrix(batch["label_vector"])):
            where = f"image_id {image_id}"
            images.append(decode_image(data, where))
            cams.append(decode_array(cam, f"cam of {where}").astype(np.float32))
            classes.append(vector_to_labels(vec))
        masks, boundaries = [], []
        for mask, boundary in self.walk_many(images, cams, classes):
            masks.append(encode_mask(mask))
            ok, buf = cv2.imencode(".png", boundary)
            boundaries.append(buf.tobytes())
        return {"image_id": batch["image_id"], "split": batch["split"], "mask": batch["mask"],
                "rw_mask": np.array(masks, dtype=object),
                "boundary": np.array(boundaries, dtype=object)}


def walk_dataset(config, dataset_path: str, model_dir: str, cams_dir: str, background: bool):
    """The (lazy) Ray Dataset of random-walk rows for the CAMs' splits."""
    from ..runtime import gpus_usable

    cfg = config.random_walk
    use_gpu = gpus_usable(cfg.gpus_per_actor > 0, config.ray.allow_cpu_fallback,
                          "random_walk.gpus_per_actor", probe_gpus=cfg.gpus_per_actor)
    ds = open_dataset(dataset_path, ["image_id", "split", "image", "mask", "label_vector"],
                      list(config.cams.splits), rows_per_block=cfg.batch_size)
    res = ActorResources.of(cfg, "random_walk")
    if cfg.gpus_per_actor > 0 and not use_gpu:  # the CPU fallback: no GPU to ask Ray for
        res = ActorResources(cfg.num_actors or 1, cfg.cpus_per_actor, 0.0, "random_walk")
    return map_with_model(
        ds, RandomWalker,
        {"model_dir": model_dir, "cams_dir": cams_dir, "cfg": cfg, "background": background,
         "threads": cfg.torch_threads or cfg.cpus_per_actor, "use_gpu": use_gpu,
         "allow_cpu_fallback": config.ray.allow_cpu_fallback},
        res, cfg.batch_size, rows=split_rows(dataset_path, config.cams.splits))


def score(info, folder: str, batch_size: int = 16) -> dict:
    """Confusion-matrix metrics of the stored random-walk masks, per split that has
    ground truth: {split: {"rw_mask": metrics, "images": n}}."""
    from ..evaluate import ConfusionMatrix, _masks_batch, _sums

    n = info.num_classes + 1
    exclude = () if info.background else (0,)
    out = {}
    for split in sorted(dataset_counts(folder)):
        ds = open_dataset(folder, ["image_id", "mask", "rw_mask"], [split], require=("mask",),
                          rows_per_block=batch_size)
        totals = _sums(ds.map_batches(_masks_batch, batch_size=batch_size,
                                      batch_format="numpy",
                                      fn_kwargs={"columns": ["rw_mask"], "n_labels": n}),
                       ["rw_mask"])
        if not totals:
            continue
        conf = ConfusionMatrix(n, totals["rw_mask"])
        out[split] = {"rw_mask": conf.metrics(info.label_names, exclude),
                      "images": _images(folder, split)}
    return out


def _images(folder: str, split: str) -> int:
    from ..data.dataset import read_table

    index = read_table(folder, ["image_id", "mask"], [split])
    return int(sum(index.column("mask").is_valid().to_pylist()))


def run(config, ctx) -> dict:
    info = ctx.dataset_info()
    with ctx.output() as out:
        write_parquet(walk_dataset(config, ctx.dataset_path, ctx.input("affinity"),
                                   ctx.input("cams"), info.background), out, config.ray)
    scored = score(info, ctx.path, config.evaluate.batch_size)
    ctx.write_metrics({"splits": list(scored), "scores": scored})
    return {f"{split}_miou": round(100 * m["rw_mask"]["miou"], 2)
            for split, m in scored.items()}

"""Segmentation model fit: images/s through Ray Train against a plain PyTorch loop.

    python bench/bench_segmenter.py [--images 320] [--epochs 3] [--workers 1]

Both fit the demo's DeepLabV3+ (resnet_mini, ASPP/decoder width of configs/demo.yaml)
on the same demo images with their true masks as the pseudo masks, batch 16, crop 128,
`--threads` torch threads per worker:

- **Ray Train**: the segmenter stage's own trainer (`train/segmenter.make_trainer`): Ray
  Data joins, decodes and augments the images on CPU tasks and streams them to the
  workers, a checkpoint every epoch. The rate is taken from the epochs after the first
  (which includes start-up), from the fit's own per-epoch seconds.
- **plain loop**: a single process training on batches decoded and augmented *before*
  the clock starts (the same transform, kept in memory): what the model costs alone,
  the limit no data pipeline can beat.

On a GPU node pass `--gpu` (segmenter.use_gpu; both sides move to CUDA).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import DEMO_YAML, start_ray

ap = argparse.ArgumentParser()
ap.add_argument("--images", type=int, default=320)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--workers", type=int, default=1)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--gpu", action="store_true")


def pseudo_masks_from_truth(dataset: str, out: str) -> None:
    """A `crf`-like folder whose pseudo masks are the dataset's true masks."""
    from ray_wsss.data.dataset import parquet_files

    table = pq.read_table(parquet_files(dataset), columns=["image_id", "split", "mask"])
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table({"image_id": table.column("image_id"),
                             "split": table.column("split"),
                             "pseudo_mask": table.column("mask")}),
                   os.path.join(out, "part-0.parquet"), row_group_size=64)


def ray_train_rate(config, dataset: str, masks: str, root: str) -> tuple[float, float]:
    from ray_wsss.train.fit import run_fit
    from ray_wsss.train.segmenter import make_trainer

    trainer = make_trainer(config, dataset, masks, None, None, "bench",
                           os.path.join(root, "ray_train"))
    t0 = time.perf_counter()
    state = run_fit(trainer, "segmenter")
    wall = time.perf_counter() - t0
    later = state["history"][1:] or state["history"]
    images = sum(h["steps"] for h in later) * config.segmenter.batch_size
    return images / sum(h["epoch_seconds"] for h in later), wall


def plain_rate(config, dataset: str, epochs: int, gpu: bool) -> float:
    import torch

    from ray_wsss.data.dataset import parquet_files
    from ray_wsss.data.transforms import SegTrainTransform
    from ray_wsss.models.deeplab import build_segmenter
    from ray_wsss.train.fit import lr_at, make_optimizer, set_lr
    from ray_wsss.train.segmenter import segmentation_loss, segmenter_model_config

    cfg = config.segmenter
    table = pq.read_table(parquet_files(dataset)).to_pylist()
    rows = [r for r in table if r["split"] == "train"]
    bs = cfg.batch_size
    transform = SegTrainTransform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter)
    batches = []
    for e in range(epochs):
        for i in range(0, len(rows) - bs + 1, bs):
            chunk = rows[i:i + bs]
            b = transform({"image_id": np.array([r["image_id"] for r in chunk], object),
                           "image": np.array([r["image"] for r in chunk], object),
                           "pseudo_mask": np.array([r["mask"] for r in chunk], object),
                           "label_vector": np.array([r["label_vector"] for r in chunk])})
            batches.append((torch.from_numpy(b["image"]), torch.from_numpy(b["mask"])))
    device = torch.device("cuda" if gpu else "cpu")
    torch.set_num_threads(cfg.torch_threads or 1)
    model = build_segmenter(segmenter_model_config(config), 7, pretrained=False,
                            aspp_channels=cfg.aspp_channels,
                            decoder_channels=cfg.decoder_channels).to(device)
    opt = make_optimizer([{"params": list(model.backbone_parameters()), "lr_scale": 1.0},
                          {"params": list(model.head_parameters()), "lr_scale": 10.0}], cfg)
    per_epoch = len(batches) // epochs
    times = []
    for e in range(epochs):
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(batches[e * per_epoch:(e + 1) * per_epoch]):
            set_lr(opt, lr_at(e * per_epoch + step, len(batches), cfg.lr, 0))
            loss = segmentation_loss(model(x.to(device).permute(0, 3, 1, 2).float()),
                                     y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    later = times[1:] or times
    return per_epoch * bs * len(later) / sum(later)


def main():
    args = ap.parse_args()
    from ray_wsss.config import load_config
    from ray_wsss.data import demo

    root = tempfile.mkdtemp(prefix="wsss-bench-seg-")
    dataset = os.path.join(root, "dataset")
    demo.ensure(dataset, num_train=args.images, num_val=0, image_size=160)
    masks = os.path.join(root, "truth")
    pseudo_masks_from_truth(dataset, masks)
    config = load_config(DEMO_YAML, [
        f"run_dir={root}", "ray.progress_bars=false", f"segmenter.epochs={args.epochs}",
        "segmenter.init=scratch", "segmenter.val_split=null",
        f"segmenter.num_workers={args.workers}", f"segmenter.torch_threads={args.threads}",
        f"segmenter.use_gpu={'true' if args.gpu else 'false'}"])
    start_ray()
    rate, wall = ray_train_rate(config, dataset, masks, root)
    limit = plain_rate(config, dataset, args.epochs, args.gpu)
    print(f"segmentation fit, {args.images} demo images, crop {config.segmenter.crop_size}, "
          f"batch {config.segmenter.batch_size}, {args.threads} torch threads, "
          f"{args.workers} Ray Train worker(s){', GPU' if args.gpu else ''}")
    print(f"{'':28s}{'img/s':>8s}")
    print(f"{'plain loop (the limit)':28s}{limit:8.1f}")
    print(f"{'Ray Train (stage)':28s}{rate:8.1f}   {rate / limit:.2f} of the limit; "
          f"{wall:.0f} s wall for {args.epochs} epochs, start-up included")


if __name__ == "__main__":
    main()

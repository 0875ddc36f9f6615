"""Explaining methods: images/s at batch 1 and 32, with and without TTA, and the speed-up
over the naive per-image, per-class loop that the correctness tests use as reference.

For the gradient methods the naive loop is a hand-written Grad-CAM (one forward with
autograd and one backward through the whole model per image and class, as with
pytorch-grad-cam's hooks); the last column is the speed-up over a cheaper naive loop
that, like the batched code, differentiates the head alone (methods on the last stage's
features only). The naive loops of the other methods: FullGrad with hooks on every
biased layer, fused LayerCAM with retained stage gradients, the input gradient and
SmoothGrad's noisy copies one backward per image and class (and copy), Ablation-CAM one
channel per forward of the head, Eigen-CAM one eigendecomposition per image.

    python bench/bench_methods.py [--images 64] [--model-dir RUN/classifier] [--threads 2]
        [--methods cam,gradcam,...] [--tta-images 16] [--clock wall|cpu]

Costly methods (Score-CAM, SmoothGrad) run on fewer images (`SLOW`), and Score-CAM
without TTA; `--tta-images` caps the images of every TTA row (4 scales + flip is 8
passes per image).

The demo architecture (resnet_mini, 160x160 images, 6 classes); images carry their
demo labels (1 to 3 classes each), so every method explains the same classes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from common import scratch_run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.cams.test_methods import reference  # noqa: E402  the naive loop of the tests

from ray_wsss.cams.methods import METHODS, MethodOptions  # noqa: E402
from ray_wsss.cams.tta import tta_maps  # noqa: E402
from ray_wsss.data.codecs import decode_image  # noqa: E402
from ray_wsss.data.dataset import parquet_files, vector_to_labels  # noqa: E402
from ray_wsss.models.classifier import load_classifier  # noqa: E402

TTA = {"no TTA": ((1.0,), False), "TTA 4 scales + flip": ((1.0, 0.5, 1.5, 2.0), True)}
# the methods whose naive loop differentiates the whole model while the batched code
# differentiates the head alone
HEAD_GRADIENT = ("gradcam", "gradcampp", "minmax-gradcam", "hirescam", "xgradcam",
                 "layercam", "eigengradcam")
# costly methods: (images timed, images in the naive loop)
SLOW = {"scorecam": (8, 4), "smoothgrad": (8, 4)}


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def rate(fn, n: int, repeats: int = 2) -> float:
    """Images/s of `fn` (which processes n images), after one warm-up call (allocations,
    oneDNN primitives for new shapes); the best of `repeats` timed calls. With
    --clock cpu, images per CPU-second of this process (all its threads): a measure
    that other jobs on a shared machine disturb far less than wall time."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return n / max(best, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--model-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tta-images", type=int, default=16)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    run, model_dir = scratch_run(args.images, model_dir=args.model_dir)
    model = load_classifier(model_dir).eval()
    table = pq.read_table(parquet_files(run.dataset_path))
    x = torch.from_numpy(np.stack([decode_image(b) for b in table.column("image").to_pylist()]))
    x = x.permute(0, 3, 1, 2).float()
    sets = [vector_to_labels(v) - 1 for v in table.column("label_vector").to_pylist()]
    classes = torch.zeros(len(sets), model.num_classes)
    for i, s in enumerate(sets):
        classes[i, s] = 1
    n = len(sets)
    opts = MethodOptions(scorecam_batch=64)
    print(f"{n} images 160x160, {sum(map(len, sets))} (image, class) pairs, resnet_mini, "
          f"{args.threads} threads, {args.clock} clock")
    print(f"{'method':16s}{'TTA':>22s}{'b=1 img/s':>11s}{'b=32 img/s':>12s}"
          f"{'naive img/s':>13s}{'x naive (b=32)':>16s}{'x head-only naive':>19s}")
    for name in args.methods.split(","):
        fn = METHODS[name]
        slow = SLOW.get(name)
        naive_n = min(n, slow[1] if slow else 16)
        naive = rate(lambda: reference(name, model, x[:naive_n], classes[:naive_n], opts),
                     naive_n)
        head_only = rate(lambda: reference(name, model, x[:naive_n], classes[:naive_n], opts,
                                           head_only=True), naive_n) \
            if name in HEAD_GRADIENT else None
        for tta, (scales, flip) in TTA.items():
            if name == "scorecam" and tta != "no TTA":
                continue  # hundreds of forward passes per image and scale
            def batched(bs, count):
                for i in range(0, count, bs):
                    j = min(i + bs, count)
                    tta_maps(model, fn, x[i:j], sets[i:j], scales, flip, opts)
            m = min(n, slow[0]) if slow else n
            if tta != "no TTA":
                m = min(m, args.tta_images)
            r1 = rate(lambda: batched(1, m), m)
            r32 = rate(lambda: batched(32, m), m)
            ratio = f"{r32 / naive:16.1f}" if tta == "no TTA" else f"{'':16s}"
            if tta == "no TTA" and head_only:
                ratio += f"{r32 / head_only:19.1f}"
            print(f"{name:16s}{tta:>22s}{r1:11.1f}{r32:12.1f}{naive:13.1f}{ratio}", flush=True)

if __name__ == "__main__":
    main()

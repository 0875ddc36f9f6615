"""What a classifier step and a CAM forward cost at each output stride.

    python bench/bench_backbone.py [--backbone efficientnet-lite0] [--strides 16,8]
                                   [--crop 112] [--batch 32] [--cam-size 120x160]
                                   [--cam-batch 16] [--threads 2] [--repeats 3]
                                   [--device cpu|cuda]

For each output stride: the training step (forward + backward of the classifier at
`--crop`, batch `--batch`) and the CAM forward (`--cam-batch` images of `--cam-size` at
TTA scale 1.0, no gradient, as `cams.output_stride` evaluates a classifier), the median of `--repeats` timed runs after one warm-up, the final map
size, and the share of the step spent in the convolutions' backward (torch profiler).
Output stride 8 quadruples the positions of the last, widest stages; on a CPU the
depthwise convolutions' backward (EfficientNet) is the dearest part of a step, and
dilating them costs more again. Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def backward_share(model, x) -> float:
    """The share of one training step's CPU time in aten::convolution_backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).mean().backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key == "aten::convolution_backward")
    return conv / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--strides", default="16,8")
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cam-size", default="120x160", help="HxW of a CAM input")
    ap.add_argument("--cam-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from ray_wsss.config import ModelConfig
    from ray_wsss.models.classifier import build_classifier

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    h, w = (int(v) for v in args.cam_size.split("x"))
    print(f"{args.backbone}, {args.device} ({args.threads} threads), step: batch "
          f"{args.batch} at {args.crop}x{args.crop}; CAM: {args.cam_batch} images of {h}x{w}, "
          f"median of {args.repeats}", flush=True)
    print(f"{'stride':>6} {'step s':>8} {'img/s':>7} {'conv bwd':>9} {'CAM ms':>7} "
          f"{'map':>7}", flush=True)
    base = base_cam = None
    for stride in (int(s) for s in args.strides.split(",")):
        cfg = ModelConfig(backbone=args.backbone, output_stride=stride, pretrained=None)
        model = build_classifier(cfg, 11, pretrained=False).to(device)
        x = torch.randn(args.batch, 3, args.crop, args.crop, device=device) * 50 + 120
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(x).mean().backward()

        t_step = timed(step, args.repeats, sync)
        share = backward_share(model, x) if device.type == "cpu" else float("nan")
        model.eval()
        img = torch.randn(args.cam_batch, 3, h, w, device=device) * 50 + 120
        with torch.no_grad():
            t_cam = timed(lambda: model.features(img), args.repeats, sync)
            fmap = model.features(img).shape[-2:]
        base, base_cam = base or t_step, base_cam or t_cam
        print(f"{stride:>6} {t_step:>8.2f} {args.batch / t_step:>7.1f} {share:>8.0%} "
              f"{1000 * t_cam:>7.1f} {fmap[1]:>3}x{fmap[0]:<3} (step x{t_step / base:.1f}, "
              f"CAM x{t_cam / base_cam:.1f})",
              flush=True)


if __name__ == "__main__":
    main()

"""Peak memory of the CAM + CRF stages at N and 4N images (streaming: it must stay flat).

    python bench/bench_memory.py [--images 200] [--factors 1,4] [--method cam]

`--factors 1,10 --method gradcam` is the long-stream check of the explaining methods:
ten times the images through the same stages, the peak must not grow.

Each size runs in a fresh process with its own local Ray (2 CPUs); the figure is the
peak PSS summed over that process and all of Ray's processes under it, sampled every
0.2 s, so shared object-store pages are counted once.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import PeakMemory, scratch_run, start_ray, write_cams


def child(n: int, method: str, detail: bool = False, overrides=(),
          object_store_mb: int | None = None) -> None:
    from ray_wsss.refine import stage as crf
    from ray_wsss.run import StepContext

    run, model_dir = scratch_run(n, overrides=[f"cams.method={method}", *overrides])
    start_ray(2, object_store_mb)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        with run.output("cams") as out:
            write_cams(run, model_dir, out)
        crf.run(run.config, StepContext(run, "crf"))
        dt = time.perf_counter() - t0
    print(f"{n:8d}{mem.peak / 2**20:14.0f}{dt:10.1f}", flush=True)
    if detail:
        for name, count, size in mem.peak_detail[:8]:
            print(f"{'':8s}{size / 2**20:14.0f}  {name} x{count}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--factors", default="1,4", help="image counts as multiples of --images")
    ap.add_argument("--method", default="cam", help="cams.method of the CAM stage")
    ap.add_argument("--detail", action="store_true",
                    help="also print the processes that make up each peak")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. ray.output_file_mb=0 (repeatable)")
    ap.add_argument("--object-store-mb", type=int,
                    help="object store size (default Ray's: 30%% of the RAM); Ray Data "
                         "buffers blocks ahead of a slow stage up to a share of it")
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.method, args.detail, args.set, args.object_store_mb)
        return
    print(f"CAM ({args.method}) + CRF stages, demo images 160x160, TTA 3 scales + flip, "
          "local Ray 2 CPUs")
    print(f"{'images':>8s}{'peak MiB':>14s}{'seconds':>10s}")
    for f in args.factors.split(","):
        n = int(float(f) * args.images)
        subprocess.run([sys.executable, __file__, "--child", str(n), "--method", args.method,
                        *(["--detail"] if args.detail else []),
                        *(f"--set={o}" for o in args.set),
                        *([f"--object-store-mb={args.object_store_mb}"]
                          if args.object_store_mb else [])], check=True)


if __name__ == "__main__":
    main()

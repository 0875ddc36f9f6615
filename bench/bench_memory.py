"""Peak memory of the CAM + CRF stages at N and 4N images (streaming: it must stay flat).

    python bench/bench_memory.py [--images 200]

Each size runs in a fresh process with its own local Ray (2 CPUs); the figure is the
peak PSS summed over that process and all of Ray's processes under it, sampled every
0.2 s, so shared object-store pages are counted once.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import PeakMemory, scratch_run


def child(n: int) -> None:
    import ray

    from ray_wsss.cams import stage as cams
    from ray_wsss.refine import stage as crf

    run, model_dir = scratch_run(n)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        with run.output("cams") as out:
            cams.cam_dataset(run.config, run, model_dir).write_parquet(out)
        crf.run(run.config, run)
        dt = time.perf_counter() - t0
    print(f"{n:8d}{mem.peak / 2**20:14.0f}{dt:10.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    print("CAM + CRF stages, demo images 160x160, TTA 3 scales + flip, local Ray 2 CPUs")
    print(f"{'images':>8s}{'peak MiB':>14s}{'seconds':>10s}")
    for n in (args.images, 4 * args.images):
        subprocess.run([sys.executable, __file__, "--child", str(n)], check=True)


if __name__ == "__main__":
    main()

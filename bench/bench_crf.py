"""CRF stage throughput with 1 and 2 CPUs.

    python bench/bench_crf.py [--images 320]

Each setting starts its own local Ray with that many CPUs and runs the `crf` stage
(read CAMs, seeds + dense CRF, write) over the same stored CAMs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import scratch_run, start_ray, write_cams


def child(root: str, cpus: int, images: int) -> None:
    from ray_wsss.config import load_config
    from ray_wsss.refine import stage
    from ray_wsss.run import Run, StepContext

    start_ray(cpus)
    run = Run(load_config(f"{root}/config.yaml"), root)
    t0 = time.perf_counter()
    stage.run(run.config, StepContext(run, "crf"))
    dt = time.perf_counter() - t0
    print(f"{cpus:5d}{images / dt:12.1f}{dt:10.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.images)
        return
    import ray
    import yaml

    from ray_wsss.config import to_dict

    run, model_dir = scratch_run(args.images)
    start_ray(2)
    with run.output("cams") as out:
        write_cams(run, model_dir, out)
    ray.shutdown()
    with open(f"{run.root}/config.yaml", "w") as fh:
        yaml.safe_dump(to_dict(run.config), fh)
    print(f"CRF stage, {args.images} images of 160x160, {run.config.crf.iterations} "
          "mean-field iterations")
    print(f"{'CPUs':>5s}{'img/s':>12s}{'seconds':>10s}")
    for cpus in (1, 2):
        subprocess.run([sys.executable, __file__, "--images", str(args.images),
                        "--child", run.root, str(cpus)], check=True)


if __name__ == "__main__":
    main()

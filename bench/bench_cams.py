"""CAM stage throughput: images/s for batch sizes and with / without TTA.

    python bench/bench_cams.py [--images 320] [--model-dir RUN/classifier]

Two figures per setting: the Ray Data stage end to end (read, actors, write: what a
user waits for, start-up included) and the steady-state rate of one actor's
`CamPredictor` on the same batches (the compute alone).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.parquet as pq
import ray

from common import scratch_run, start_ray, with_config, write_cams

from ray_wsss.cams.stage import CamPredictor
from ray_wsss.data.dataset import parquet_files

SETTINGS = {"no TTA": ((1.0,), False), "TTA 4 scales + flip": ((1.0, 0.5, 1.5, 2.0), True)}


def actor_rate(model_dir, rows, batch_size, scales, flip, threads) -> float:
    pred = CamPredictor(model_dir, "cam", scales, flip, threads=threads)
    pred({k: v[:batch_size] for k, v in rows.items()})  # warm-up
    t0, n = time.perf_counter(), 0
    for i in range(0, len(rows["image_id"]), batch_size):
        n += len(pred({k: v[i:i + batch_size] for k, v in rows.items()})["cam"])
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--model-dir")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    run, model_dir = scratch_run(args.images, model_dir=args.model_dir)
    table = pq.read_table(parquet_files(run.dataset_path))
    rows = {c: np.array(table.column(c).to_pylist(), dtype=object)
            for c in ("image_id", "split", "image", "mask")}
    rows["label_vector"] = np.array(table.column("label_vector").to_pylist(), np.uint8)
    start_ray()
    print(f"CAM stage, {args.images} images of 160x160, resnet_mini, "
          f"{int(ray.cluster_resources()['CPU'])} CPUs, torch threads {args.threads}")
    print(f"{'setting':22s}{'batch':>6s}{'stage img/s':>13s}{'actor img/s':>13s}")
    for name, (scales, flip) in SETTINGS.items():
        for bs in (1, 32):
            r = with_config(run, **{"cams.scales": scales, "cams.flip": flip,
                                    "cams.batch_size": bs, "cams.torch_threads": args.threads})
            t0 = time.perf_counter()
            out = f"{run.root}/bench-cams-{bs}-{flip}"
            write_cams(r, model_dir, out)
            stage = args.images / (time.perf_counter() - t0)
            actor = actor_rate(model_dir, rows, bs, scales, flip, args.threads)
            print(f"{name:22s}{bs:6d}{stage:13.1f}{actor:13.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Sparse random walk (refine/random_walk.py) against IRN's dense formulation.

    python bench/bench_random_walk.py [--device cpu|cuda] [--max-dense-gib 2] [--threads 1]

For photos of 128x128, 250x188 and 500x375 (affinities at stride 4: 32x32, 63x47 and
125x94 pixels), radius 5 (34 offsets), beta 10, 256 steps and 20 class maps: the time
and peak memory of `random_walk` (256 sparse steps v <- vT) and of `dense_random_walk`
(the N x N transition matrix squared 8 times, as IRN does), and the largest absolute
difference between their outputs. The dense walk runs only where its estimated peak
(two N x N matrices) fits in --max-dense-gib.

Each measurement runs in a fresh process, so one run's freed memory cannot hide the
next one's. Peak memory is the growth over the walk itself (inputs already built): on
CPU the peak resident set size (VmHWM after resetting it through /proc/self/clear_refs,
minus VmRSS before; glibc's mmap threshold is pinned so big buffers are returned to the
OS), on CUDA torch.cuda.max_memory_allocated minus the memory allocated before. Times
are wall clock (CUDA synchronised): the best of --repeats runs for the sparse walk, one
run for the dense one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = ((128, 128), (250, 188), (500, 375))
STRIDE = 4


def inputs(h: int, w: int, classes: int, radius: int, device: str, dtype):
    """Affinities of a plausible boundary map (Voronoi cells with strong borders) and
    smooth random class maps, at stride 4."""
    import torch
    import torch.nn.functional as F

    from ray_wsss.models.affinity import path_max_affinity
    from ray_wsss.refine.affinity import pair_offsets

    g = torch.Generator().manual_seed(0)
    seeds = torch.rand(24, 2, generator=g) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    edge = torch.zeros(h, w, dtype=torch.bool)
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    boundary = torch.where(edge, 0.9, 0.02) + 0.05 * torch.rand(h, w, generator=g)
    offsets = pair_offsets(radius)
    affinity = path_max_affinity(boundary.clamp(0, 1)[None, None], offsets)[0]
    coarse = torch.rand(1, classes, max(1, h // 8), max(1, w // 8), generator=g)
    maps = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (maps.to(device, dtype), affinity.to(device, dtype), offsets)


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args) -> None:
    """One measurement; prints a JSON line and saves the walked maps for comparison."""
    import numpy as np
    import torch

    from ray_wsss.refine.random_walk import dense_random_walk, random_walk

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    h, w = args.child_size
    maps, affinity, offsets = inputs(h, w, args.classes, args.radius, args.device, dtype)
    walk = random_walk if args.child_method == "sparse" else dense_random_walk
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda or args.child_method == "sparse":
        walk(maps, affinity, offsets, args.beta, 2)  # warm-up: kernels, allocator
    sync()
    repeats = args.repeats if args.child_method == "sparse" else 1
    best, peak, out = float("inf"), 0, None
    for _ in range(repeats):
        out = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = _status("VmRSS")
        t0 = time.perf_counter()
        out = walk(maps, affinity, offsets, args.beta, args.steps)
        sync()
        best = min(best, time.perf_counter() - t0)
        after = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
        peak = max(peak, after - before)
    np.save(args.child_out, out.cpu().numpy())
    print(json.dumps({"seconds": best, "peak_bytes": peak}), flush=True)


def measure(args, size, method: str, out_path: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--device", args.device, "--classes", str(args.classes),
           "--radius", str(args.radius), "--beta", str(args.beta), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--dtype", args.dtype, "--threads", str(args.threads),
           "--child-size", str(size[0]), str(size[1]), "--child-method", method,
           "--child-out", out_path]
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--radius", type=int, default=5)
    ap.add_argument("--beta", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both walks (1: steadier on a shared machine)")
    ap.add_argument("--max-dense-gib", type=float, default=2.0,
                    help="run the dense walk only where two N x N matrices fit in this")
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES),
                    help="photo sizes WxH, comma-separated")
    ap.add_argument("--child-size", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-method", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_method:
        child(args)
        return
    import numpy as np

    itemsize = 4 if args.dtype == "float32" else 8
    print(f"random walk: radius {args.radius}, beta {args.beta:g}, {args.steps} steps, "
          f"{args.classes} classes, {args.dtype}, device {args.device}, {args.threads} CPU "
          f"thread(s); peak memory = "
          f"{'CUDA max allocated' if args.device.startswith('cuda') else 'RSS'} growth")
    head = (f"{'photo':>9s}{'pixels':>12s}{'N':>7s}{'sparse s':>10s}{'sparse MiB':>12s}"
            f"{'dense s':>10s}{'dense MiB':>11s}{'speed-up':>10s}{'mem ratio':>11s}"
            f"{'max |diff|':>12s}")
    print(head, flush=True)
    tmp = tempfile.mkdtemp(prefix="bench-rw-")
    for spec in args.sizes.split(","):
        width, height = (int(v) for v in spec.split("x"))
        h, w = -(-height // STRIDE), -(-width // STRIDE)
        n = h * w
        sparse = measure(args, (h, w), "sparse", f"{tmp}/sparse.npy")
        row = (f"{spec:>9s}{f'{w}x{h}':>12s}{n:7d}{sparse['seconds']:10.3f}"
               f"{sparse['peak_bytes'] / 2**20:12.1f}")
        if 2 * n * n * itemsize <= args.max_dense_gib * 2**30:
            dense = measure(args, (h, w), "dense", f"{tmp}/dense.npy")
            diff = np.abs(np.load(f"{tmp}/sparse.npy") - np.load(f"{tmp}/dense.npy")).max()
            row += (f"{dense['seconds']:10.2f}{dense['peak_bytes'] / 2**20:11.1f}"
                    f"{dense['seconds'] / sparse['seconds']:9.0f}x"
                    f"{dense['peak_bytes'] / max(sparse['peak_bytes'], 1):10.0f}x{diff:12.2e}")
        else:
            row += f"{'(over --max-dense-gib)':>54s}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""Affinity labels and random-walk masks with and without C²AM-H saliency hints.

    python bench/bench_c2am_hints.py [--root DIR] [--from-run RUN] [key.sub=value ...]

Runs the demo config (plus the overrides) twice through the random-walk stages:
`affinity.labels_from: cams` (IRN's two CAM thresholds) and `saliency` (C²AM-H). The
second run directory starts as a copy of the first, so the dataset, classifier and CAMs
are computed once (their hashes do not depend on `labels_from`). `--from-run` copies an
existing run whose classifier and CAMs are done instead of fitting them. Prints, on the
train split: the affinity labels' precision and recall against ground truth, for
foreground (a pixel labelled with a class: is it that class; a ground-truth object
pixel: is it labelled with its class) and background, and the share of unsure pixels;
then the random-walk masks' mIoU on every split with ground truth, and the saliency
mask's foreground precision / recall / IoU.

Smoke check with tiny settings, e.g.
    python bench/bench_c2am_hints.py --from-run runs/demo data.demo.num_train=... \\
        affinity.epochs=1 c2am.epochs=1 random_walk.steps=16
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ray_wsss.config import load_config  # noqa: E402
from ray_wsss.data.codecs import decode_mask  # noqa: E402
from ray_wsss.data.dataset import read_table  # noqa: E402
from ray_wsss.pipeline import run_pipeline  # noqa: E402
from ray_wsss.run import Run  # noqa: E402

DEMO_YAML = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml")
WALK = ["dataset", "classifier", "cams", "c2am", "saliency", "affinity_labels", "affinity",
        "random_walk"]


def label_scores(run: Run) -> dict:
    """Precision / recall of the affinity labels of the train split against its masks."""
    split = run.config.classifier.train_split
    labels = read_table(run.path("affinity_labels"), ["image_id", "affinity_label"])
    truth = {r["image_id"]: r["mask"] for r in read_table(
        run.dataset_path, ["image_id", "mask"], [split]).to_pylist() if r["mask"]}
    c = dict.fromkeys(("fg_right", "fg_called", "fg_true", "fg_found", "bg_right",
                       "bg_called", "bg_true", "bg_found", "unsure", "pixels"), 0)
    for image_id, data in zip(labels.column("image_id").to_pylist(),
                              labels.column("affinity_label").to_pylist()):
        if image_id not in truth:
            continue
        lab, gt = decode_mask(data), decode_mask(truth[image_id])
        valid = gt != 255
        lab, gt = lab[valid], gt[valid]
        fg_called, fg_true = (lab > 0) & (lab != 255), gt > 0
        c["fg_right"] += int((fg_called & (lab == gt)).sum())
        c["fg_called"] += int(fg_called.sum())
        c["fg_true"] += int(fg_true.sum())
        c["fg_found"] += int((fg_true & (lab == gt)).sum())
        c["bg_right"] += int(((lab == 0) & (gt == 0)).sum())
        c["bg_called"] += int((lab == 0).sum())
        c["bg_true"] += int((gt == 0).sum())
        c["bg_found"] += int(((gt == 0) & (lab == 0)).sum())
        c["unsure"] += int((lab == 255).sum())
        c["pixels"] += int(lab.size)

    def ratio(a: str, b: str) -> float:
        return 100 * c[a] / c[b] if c[b] else float("nan")
    return {"fg precision": ratio("fg_right", "fg_called"),
            "fg recall": ratio("fg_found", "fg_true"),
            "bg precision": ratio("bg_right", "bg_called"),
            "bg recall": ratio("bg_found", "bg_true"),
            "unsure %": ratio("unsure", "pixels")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="folder for the two run directories (default: a temp)")
    ap.add_argument("--from-run", help="a run whose dataset, classifier and CAMs to reuse")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="wsss-c2am-bench-")
    base = ["random_walk.enabled=true", "ray.progress_bars=false", *args.overrides]
    rows = {}
    previous = args.from_run
    for name in ("cams", "saliency"):
        run_dir = os.path.join(root, name)
        if previous and not os.path.exists(run_dir):
            shutil.copytree(previous, run_dir, ignore=shutil.ignore_patterns("run.lock"))
        cfg = load_config(DEMO_YAML, [f"run_dir={run_dir}", f"affinity.labels_from={name}",
                                      *base])
        run = run_pipeline(cfg, stages=WALK)
        metrics = run.read_metrics()
        walk = metrics.get("random_walk", {}).get("scores", {})
        rows[name] = {**label_scores(run),
                      **{f"walk mIoU {s}": 100 * v["rw_mask"]["miou"] for s, v in walk.items()}}
        for s, v in metrics.get("saliency", {}).get("scores", {}).items():
            rows[name].update({f"saliency {k} {s}": 100 * (v[k] or np.nan)
                               for k in ("fg_precision", "fg_recall", "fg_iou")})
        previous = run_dir
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"{'affinity.labels_from':28s}" + "".join(f"{n:>10s}" for n in rows))
    for k in keys:
        print(f"{k:28s}" + "".join(f"{r.get(k, float('nan')):10.1f}" for r in rows.values()))
    print(f"run directories: {root}")


if __name__ == "__main__":
    main()

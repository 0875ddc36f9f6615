"""The iterative loop measured: per round, seed / CRF / segmentation-model val mIoU and
wall time, for the three variants of `loop` (the diagram's summed prior, the per-class
prior, and self-training on the model's CRF-refined predictions).

    python bench/bench_loop.py [--root runs/loop] [--rounds 3] [--variants sum,...]
                               [--config configs/demo.yaml] [key.sub=value ...]

Each variant is `ray-wsss run CONFIG --run-dir ROOT/VARIANT loop.rounds=T ...` in a child
process. Round 1 does not read any `loop` key, so the variants after the first start as a
copy of the first variant's round-1 steps (same hashes: the pipeline skips them) and only
rounds 2..T are computed for them (`--from-run RUN` seeds the first variant from a
finished run of the same config too). A variant's finished rounds are not redone when the
script is started again. Wall time per round is the sum of its steps' `seconds` in the
run's manifest (round 1: every stage of the plain pipeline, dataset build included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

VARIANTS = {
    "sum": ("M = sum_i alpha_i c_i P(c_i), 1 channel", ["loop.prior=sum"]),
    "per_class": ("c_i P(c_i) per class, K channels", ["loop.prior=per_class"]),
    "labels": ("self-training (CRF-refined predictions)",
               ["loop.feedback=labels", "predict.crf=true"]),
    "labels_class": ("self-training, round 1's masks of the tags the model lost",
                     ["loop.feedback=labels", "predict.crf=true", "loop.fallback=class"]),
}


def variant_overrides(name: str, config_path: str, overrides: list[str]) -> list[str]:
    """The variant's keys; self-training also needs the segmenter's train split among
    predict.splits (configs/camvid_tiles.yaml predicts the val frames only)."""
    extra = list(VARIANTS[name][1])
    if name.startswith("labels"):
        from ray_wsss.config import load_config
        from ray_wsss.sweep import self_training

        splits = self_training(load_config(config_path, overrides)).predict.splits
        extra.append(f"predict.splits=[{','.join(splits)}]")
    return extra


def round_of(key: str) -> int:
    return int(key.split("@")[1]) if "@" in key else 1


def seed_round_one(src: str, dst: str, config_path: str, overrides: list[str]) -> int:
    """Copy into the new run directory `dst` the steps of `src` that the variant computes
    identically (round 1: it reads no `loop` key); returns how many."""
    from ray_wsss.config import load_config
    from ray_wsss.sweep import seed_steps

    config = load_config(config_path, [*overrides, f"run_dir={dst}"])
    return seed_steps(src, dst, config, rounds=1)


def table(root: str, rounds: int) -> list[dict]:
    from ray_wsss.sweep import round_metrics

    manifest = json.load(open(os.path.join(root, "manifest.json")))["stages"]
    metrics = json.load(open(os.path.join(root, "metrics.json")))
    rows = []
    for t in range(1, rounds + 1):
        row = round_metrics(metrics, t)
        row["seconds"] = sum(v.get("seconds") or 0 for k, v in manifest.items()
                             if round_of(k) == t and k != "report")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(ROOT, "runs", "loop"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    ap.add_argument("--from-run", help="a finished run of the same config whose round-1 "
                    "steps the first variant starts from (e.g. runs/demo)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = args.variants.split(",")
    first = args.from_run
    for name in names:
        extra = variant_overrides(name, args.config, args.overrides)
        root = os.path.join(args.root, name)
        if first is not None:
            copied = seed_round_one(first, root, args.config,
                                    [f"loop.rounds={args.rounds}", *extra, *args.overrides])
            print(f"variant {name}: {copied} round-1 steps copied from {first}", flush=True)
        cmd = [sys.executable, "-m", "ray_wsss.cli", "run", args.config, "--run-dir", root,
               f"loop.rounds={args.rounds}", *extra, *args.overrides]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode:
            print(f"variant {name} failed (exit {proc.returncode})", flush=True)
            continue
        if first is None or first == args.from_run:
            first = root
    print(f"\n| variant | round | seed mIoU | CRF mIoU | model mIoU | wall s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        root = os.path.join(args.root, name)
        if not os.path.exists(os.path.join(root, "metrics.json")):
            continue
        for row in table(root, args.rounds):
            print(f"| {VARIANTS[name][0]} | {row['round']} | {row['seed_miou']:.1f} | "
                  f"{row['crf_miou']:.1f} | {row['model_miou']:.1f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()

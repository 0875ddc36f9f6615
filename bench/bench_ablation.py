"""The regularizer ablation on the demo data: one full pipeline run per row, same config
and budget for every row, and a table of seed mIoU (best threshold), CRF pseudo-mask mIoU
(at the config's background threshold and at each row's best one), val mAP and wall time.

    python bench/bench_ablation.py [--root runs/ablation] [--rows plain,puzzle,...]
                                   [--config configs/demo.yaml] [key.sub=value ...]

Each row is `ray-wsss run CONFIG --run-dir ROOT/ROW ...` in a child process, so a row
that fails does not take the others with it, and a row's finished stages are not redone
when the script is started again (the pipeline skips up-to-date stages). OC-CSE and P-NOC use the
plain row's classifier as their ordinary classifier; the co-segmentation row reuses the
MCIS row's classifier (only the CAM stage onwards reruns, with `cams.mcis_peers`).
Times come from each stage's `seconds` in the run's manifest: "training" is the
classifier stage, "all stages" is every stage of the row, its dataset build included.
Extra `key=value` arguments apply to every row (e.g. `classifier.epochs=4`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))

ROWS = {
    "plain": ("plain", []),
    "puzzle": ("+ Puzzle-CAM (alpha 4)", ["regularizers.puzzle.alpha=4.0"]),
    "oc-cse": ("+ OC-CSE (OC = plain)", ["regularizers.oc_cse.weight=1.0", "OC"]),
    "p-noc": ("+ P-NOC (Puzzle + adversarial OC)",
              ["regularizers.puzzle.alpha=4.0", "regularizers.oc_cse.weight=1.0", "OC",
               "regularizers.pnoc.enabled=true"]),
    "mcis": ("+ MCIS, training", ["regularizers.mcis.enabled=true"]),
    "mcis-coseg": ("+ MCIS, training + co-segmentation (N = 3)",
                   ["regularizers.mcis.enabled=true", "cams.mcis_peers=3"]),
    "kur": ("KUR head", ["head.kur=true"]),
}
RUN_DIR = {"mcis-coseg": "mcis"}  # rows that continue another row's run directory


def run_row(config: str, run_dir: str, overrides: list[str], log) -> dict:
    cmd = [sys.executable, "-m", "ray_wsss.cli", "run", config, "--run-dir", run_dir,
           "ray.progress_bars=false", *overrides]
    print("  $", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); "
                           f"see {log.name}")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    return {"metrics": metrics, "stages": stages}


def summary(result: dict) -> dict:
    ev = result["metrics"]["evaluate"]
    return {"seed": 100 * ev["cams"]["best"]["miou"], "threshold": ev["cams"]["best_threshold"],
            "crf": 100 * ev["crf"]["miou"],
            "val_map": result["metrics"]["classifier"]["val_map"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.join(ROOT, "runs", "ablation"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    ap.add_argument("--no-best-crf", action="store_true",
                    help="skip the CRF rerun at each row's best seed threshold")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if any("OC" in ROWS[r][1] for r in rows) and "plain" not in rows:
        rows.insert(0, "plain")  # the ordinary classifier of OC-CSE / P-NOC
    os.makedirs(args.root, exist_ok=True)
    log_path = os.path.join(args.root, "ablation.log")
    oc_model = os.path.abspath(os.path.join(args.root, "plain", "classifier"))
    table = []
    with open(log_path, "a") as log:
        for row in rows:
            name, extra = ROWS[row]
            run_dir = os.path.abspath(os.path.join(args.root, RUN_DIR.get(row, row)))
            overrides = [f"regularizers.oc_cse.oc_model={oc_model}" if o == "OC" else o
                         for o in extra] + list(args.overrides)
            print(f"[{row}] {name}", flush=True)
            try:
                result = run_row(args.config, run_dir, overrides, log)
            except (RuntimeError, OSError, KeyError) as err:
                print(f"  failed: {err}", flush=True)
                continue
            s = summary(result)
            stages = result["stages"]
            train_s = stages["classifier"]["seconds"]
            if row in RUN_DIR:  # the classifier and dataset were made by the other row
                total = train_s + stages["dataset"]["seconds"] + sum(
                    stages[k]["seconds"] for k in ("cams", "crf", "evaluate", "report"))
            else:
                total = sum(st["seconds"] for st in stages.values())
            s.update(name=name, train_s=train_s, total_s=total, crf_best=None)
            if not args.no_best_crf:
                try:
                    at_best = run_row(
                        args.config, run_dir,
                        overrides + [f"seeds.background_threshold={s['threshold']}"], log)
                    s["crf_best"] = summary(at_best)["crf"]
                except (RuntimeError, OSError, KeyError) as err:
                    print(f"  CRF at the best threshold failed: {err}", flush=True)
            table.append(s)
            print(f"  seed {s['seed']:.1f} (thr {s['threshold']:.2f}), CRF {s['crf']:.1f}, "
                  f"val mAP {s['val_map']:.1f}, training {train_s:.0f} s, all {total:.0f} s",
                  flush=True)

    print(f"\nablation on {args.config} {' '.join(args.overrides)} (mIoU %; log: {log_path})")
    print("| classifier | seed mIoU (best thr.) | CRF mIoU @config thr. | CRF @ best thr. "
          "| val mAP | training s | all stages s |")
    print("|---|---|---|---|---|---|---|")
    for s in table:
        best = "—" if s["crf_best"] is None else f"{s['crf_best']:.1f}"
        print(f"| {s['name']} | {s['seed']:.1f} ({s['threshold']:.2f}) | {s['crf']:.1f} | "
              f"{best} | {s['val_map']:.1f} | {s['train_s']:.0f} | {s['total_s']:.0f} |")


if __name__ == "__main__":
    main()

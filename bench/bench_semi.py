"""Semi-weak mode: val mIoU against the number of pixel-labelled images.

    python bench/bench_semi.py [--config configs/demo.yaml] [--labelled 0,5,10,25,50]
        [--modes labelled,weak,cce,pct] [--root DIR] [--smoke] [--no-ceiling]
        [key.sub=value ...]

On the demo by default; `--config configs/camvid_tiles.yaml` gives the CamVid rows (N
pixel-labelled train tiles; `--root` on a copy of a finished run reuses its steps).

One run directory holds the weak pipeline's steps (dataset, classifier, CAMs, CRF masks),
computed once; every row then fits the segmentation model (and, for `pct`, the hybrid
and pseudo nets first) and scores its predictions on the val split (full images, the
`predict` step). Rows, for N pixel-labelled train images (`semi.labelled_count: N`,
`semi.seed` fixed, so every row uses the same N images):

- **labelled only**: the segmentation model fitted on the N images' ground truth alone
  (repeated to the size of the train split, so it takes as many steps as the others);
- **weak**: `segmenter.mode: weak`, the CRF pseudo masks (ground truth for the N);
- **cce**: `segmenter.mode: cce`, the same targets with class-aware cross entropy;
- **pct**: `segmenter.mode: pct`, progressive cross training, then the model fitted on
  the hybrid net's masks;
- **fully supervised**: every train image's ground truth (the ceiling; one number).

Wall time per cell: the steps that row computed (pct + segmenter + predict). Prints a
table; `--smoke` shrinks everything to check that the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import DEMO_YAML, start_ray

ap = argparse.ArgumentParser()
ap.add_argument("--config", default=DEMO_YAML, help="pipeline config (default: the demo)")
ap.add_argument("--labelled", default="0,5,10,25,50")
ap.add_argument("--modes", default="labelled,weak,cce,pct")
ap.add_argument("--root", default=None, help="run directory (default: a new temp dir)")
ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the script")
ap.add_argument("--no-ceiling", action="store_true",
                help="leave out the fully supervised row (when adding cells to a table)")
ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides")

SMOKE = ["data.demo.num_train=48", "data.demo.num_val=16", "data.demo.image_size=80",
         "classifier.epochs=1", "classifier.batch_size=8", "classifier.crop_size=64",
         "cams.scales=[1.0]", "cams.flip=false", "segmenter.epochs=1",
         "segmenter.batch_size=8", "segmenter.crop_size=64", "segmenter.aspp_channels=16",
         "segmenter.decoder_channels=16", "pct.epochs=1", "pct.batch_size=8",
         "pct.crop_size=64", "pct.num_actors=1", "predict.splits=[val]",
         "predict.flip=false", "crf.iterations=2"]


def val_miou(run) -> float:
    return 100 * run.read_metrics()["predict"]["scores"]["val"]["prediction"]["miou"]


def run_row(config_path: str, base: list[str], extra: list[str]) -> tuple[float, float]:
    """Run the pipeline with `extra` (finished steps are reused); (val mIoU, seconds)."""
    from ray_wsss.config import load_config
    from ray_wsss.pipeline import run_pipeline

    config = load_config(config_path, base + extra)
    t0 = time.perf_counter()
    run = run_pipeline(config, stages=["dataset", "classifier", "cams", "crf", "pct",
                                       "segmenter", "predict"])
    return val_miou(run), time.perf_counter() - t0


def subset_dataset(dataset: str, ids: list[str], size: int, out: str) -> None:
    """A dataset whose train split is the rows of `ids` repeated to `size` rows (ids made
    unique), plus every other split's rows as they are."""
    from ray_wsss.data.dataset import CLASSES_FILE, parquet_files

    table = pq.read_table(parquet_files(dataset))
    train = table.filter(pc.is_in(table["image_id"], value_set=pa.array(ids)))
    parts = []
    for k in range(-(-size // len(ids))):
        where = train.schema.get_field_index("image_id")
        copy = train.set_column(where, train.schema.field(where),  # same (non-null) field
                                pc.binary_join_element_wise(train["image_id"],
                                                            pa.scalar(f"#{k}"), ""))
        parts.append(copy)
    rest = table.filter(pc.invert(pc.equal(table["split"], "train")))
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.concat_tables(parts + [rest]), os.path.join(out, "part-0.parquet"),
                   row_group_size=64)
    with open(os.path.join(dataset, CLASSES_FILE)) as fh:
        meta = json.load(fh)
    with open(os.path.join(out, CLASSES_FILE), "w") as fh:
        json.dump(meta, fh)


def labelled_only(config_path: str, base: list[str], n: int, root: str) -> tuple[float, float]:
    """The segmentation model on the N images' ground truth alone, scored on val."""
    from ray_wsss.config import load_config
    from ray_wsss.data.dataset import dataset_counts, read_info
    from ray_wsss.data.labelled import labelled_ids
    from ray_wsss.models.deeplab import build_segmenter, save_segmenter
    from ray_wsss.predict import prediction_dataset, score
    from ray_wsss.run import Run
    from ray_wsss.runtime import write_parquet
    from ray_wsss.train.fit import run_fit
    from ray_wsss.train.segmenter import init_source, make_trainer, segmenter_model_config

    config = load_config(config_path, base + [f"semi.labelled_count={n}"])
    run = Run(config)
    ids = labelled_ids(config, run.dataset_path)
    where = tempfile.mkdtemp(prefix=f"labelled-{n}-", dir=root)
    subset = os.path.join(where, "dataset")
    subset_dataset(run.dataset_path, ids, dataset_counts(run.dataset_path)["train"], subset)
    truth = os.path.join(where, "truth")
    os.makedirs(truth)
    t = pq.read_table(os.path.join(subset, "part-0.parquet"),
                      columns=["image_id", "split", "mask"])
    pq.write_table(pa.table({"image_id": t["image_id"], "split": t["split"],
                             "pseudo_mask": t["mask"]}), os.path.join(truth, "part-0.parquet"))
    t0 = time.perf_counter()
    classifier = run.path("classifier") if init_source(config) == "classifier" else None
    state = run_fit(make_trainer(config, subset, truth, None, classifier, "labelled-only",
                                 os.path.join(where, "ray_train")), "segmenter")
    info = read_info(subset)
    model = build_segmenter(segmenter_model_config(config), info.num_classes + 1,
                            pretrained=False, aspp_channels=config.segmenter.aspp_channels,
                            decoder_channels=config.segmenter.decoder_channels)
    model.load_state_dict(state["model"])
    model_dir = os.path.join(where, "model")
    save_segmenter(model, segmenter_model_config(config), model_dir, info.classes)
    predictions = os.path.join(where, "predictions")
    write_parquet(prediction_dataset(config, subset, model_dir, ["val"]), predictions,
                  config.ray)
    scored = score(config, info, predictions, ["val"])
    return 100 * scored["val"]["prediction"]["miou"], time.perf_counter() - t0


def main() -> None:
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="wsss-bench-semi-")
    base = [f"run_dir={os.path.join(root, 'run')}", "ray.progress_bars=false",
            *(SMOKE if args.smoke else []), *args.overrides]
    counts = [int(v) for v in args.labelled.split(",")]
    modes = args.modes.split(",")
    start_ray()
    from ray_wsss.config import load_config
    from ray_wsss.data.dataset import dataset_counts
    from ray_wsss.pipeline import run_pipeline

    config_path = args.config
    table: dict[str, dict[int, tuple[float, float] | None]] = {m: {} for m in modes}
    # the weak pipeline's steps (dataset, classifier, CAMs, CRF masks) once, before any row
    config = load_config(config_path, base)
    run = run_pipeline(config, stages=["dataset", "classifier", "cams", "crf"])
    num_train = dataset_counts(run.dataset_path)[config.segmenter.train_split]
    for n in counts:
        semi = [f"semi.labelled_count={n}"]
        for mode in modes:
            if n == 0 and mode in ("labelled", "pct"):
                table[mode][n] = None          # nothing to learn from / no strong half
            elif mode == "labelled":
                table[mode][n] = labelled_only(config_path, base, n, root)
            else:
                table[mode][n] = run_row(config_path, base, semi + [f"segmenter.mode={mode}"])
            print(f"[bench_semi] {mode} N={n}: {table[mode][n]}", flush=True)
    full = None if args.no_ceiling else run_row(
        config_path, base, [f"semi.labelled_count={num_train}", "segmenter.mode=weak"])
    print(f"\nval mIoU (%) / wall s, {os.path.basename(config_path)} ({num_train} train "
          f"images){', smoke settings' if args.smoke else ''}")
    print(f"{'pixel-labelled images':24s}" + "".join(f"{n:>16d}" for n in counts))
    names = {"labelled": "labelled only", "weak": "weak", "cce": "cce", "pct": "pct"}
    for mode in modes:
        cells = ["—" if table[mode][n] is None else
                 f"{table[mode][n][0]:.1f} / {table[mode][n][1]:.0f}s" for n in counts]
        print(f"{names[mode]:24s}" + "".join(f"{c:>16s}" for c in cells))
    if full is not None:
        print(f"{'fully supervised':24s}{full[0]:>15.1f} / {full[1]:.0f}s (all {num_train})")


if __name__ == "__main__":
    sys.exit(main())

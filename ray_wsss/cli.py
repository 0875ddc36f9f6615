"""`ray-wsss`: the command line.

    ray-wsss demo [--run-dir DIR] [key.sub=value ...]
    ray-wsss run CONFIG.yaml [--run-dir DIR] [--force] [key.sub=value ...]
    ray-wsss stage NAME CONFIG.yaml [--run-dir DIR] [--force] [key.sub=value ...]
    ray-wsss explain CONFIG.yaml [--methods cam,gradcam,...] [key.sub=value ...]
    ray-wsss sweep NAME CONFIG.yaml [--samples N] [--force] [key.sub=value ...]
    ray-wsss import voc PATH --out DIR
    ray-wsss import folder PATH [--labels CSV] [--masks DIR] --classes NAMES --out DIR
    ray-wsss import coco INSTANCES.json --images DIR --out DIR
    ray-wsss export RUN_DIR --what pseudo-masks|seeds|predictions|boxes|model --out DIR
    ray-wsss unlock RUN_DIR
    ray-wsss metrics RUN_DIR
    ray-wsss config [CONFIG.yaml] [key.sub=value ...]   (every key, defaults included)

Errors of the project's own types print as one line naming the file, row or key.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import storage
from .errors import WsssError


def _config(args) -> "PipelineConfig":  # noqa: F821
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(getattr(args, "config", None), overrides)


DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")


def cmd_demo(args) -> int:
    from .pipeline import run_pipeline

    args.config = DEMO_CONFIG
    run = run_pipeline(_config(args), force=args.force)
    print_summary(run.root)
    return 0


def cmd_config(args) -> int:
    """Print the resolved config: every key of every section, defaults included."""
    import yaml

    from .config import to_dict

    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None
    args.config = args.config or DEMO_CONFIG
    print(yaml.safe_dump(to_dict(_config(args)), sort_keys=False, width=90), end="")
    return 0


def cmd_run(args) -> int:
    from .pipeline import run_pipeline

    run = run_pipeline(_config(args), force=args.force, until=args.until)
    print_summary(run.root)
    return 0


def cmd_stage(args) -> int:
    from .pipeline import run_stage
    from .run import Run

    config = _config(args)
    run = Run(config)
    storage.makedirs(run.root)
    run_stage(args.name, config, run, force=args.force, round=args.round)
    return 0


def cmd_export(args) -> int:
    from .export import export

    result = export(args.run_dir, args.what, args.out,
                    splits=args.splits.split(",") if args.splits else None,
                    round=args.round, overwrite=args.overwrite, stitch=args.stitch)
    print(f"exported {result['files']} file(s) ({args.what}, step {result['step']}) "
          f"into {result['path']}")
    return 0


def cmd_unlock(args) -> int:
    from .lock import break_lock, describe

    holder = break_lock(storage.resolve(args.run_dir))
    print("no lock held" if holder is None else f"lock broken (it was held by "
          f"{describe(holder)})")
    return 0


def cmd_explain(args) -> int:
    from .cams.explain import format_table, run_explain
    from .pipeline import run_stage
    from .run import Run
    from .runtime import close_stale_progress_bars, init_ray

    from .pipeline import run_lock

    config = _config(args)
    run = Run(config)
    init_ray(config.ray)
    methods = args.methods.split(",") if args.methods else list(config.explain.methods)
    from .graph import Step
    rounds = [t for t in range(1, config.loop.rounds + 1) if run.is_done(Step("classifier", t))]
    step = Step("classifier", args.round or (rounds[-1] if rounds else 1))
    with run_lock(run):  # explain writes into the run directory: one writer at a time
        result = run_explain(config, run, [m.strip() for m in methods if m.strip()],
                             classifier=step.key)
    close_stale_progress_bars()
    print(f"\nExplaining methods ({step.key}) on {result['images']} images "
          f"(XAI metrics in %, over detected classes; seed mIoU at the best threshold):")
    print(format_table(result["rows"]))
    print(f"table: {run.path('explain', 'comparison.csv')}")
    if run.is_done("evaluate"):
        run_stage("report", config, run, force=True)
        print(f"report: {run.path('report', 'index.html')}")
    else:
        print("the report gains an explain section once the pipeline has run (ray-wsss run)")
    return 0


def cmd_sweep(args) -> int:
    from .pipeline import run_stage
    from .run import Run
    from .runtime import close_stale_progress_bars, init_ray
    from .sweep import load_spec, run_sweep

    config = _config(args)
    spec = load_spec(args.name, {"num_samples": args.samples} if args.samples else None)
    from .pipeline import run_lock

    run = Run(config)
    init_ray(config.ray)
    with run_lock(run):  # a sweep writes into the run directory: one writer at a time
        result = run_sweep(config, run, spec, force=args.force)
    close_stale_progress_bars()
    good = sorted((r for r in result["rows"] if r["metric"] is not None),
                  key=lambda r: -r["metric"] if spec.mode == "max" else r["metric"])
    print(f"\nSweep {spec.name}: {len(result['rows'])} trials, {spec.metric} ({spec.mode})")
    base = result["base"]
    for i, r in enumerate(good[:5]):
        tag = "  (the base config)" if base and r["trial"] == base["trial"] else ""
        params = ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 4)}"
                           for k, v in r["params"].items())
        print(f"{i + 1:3d}. {r['metric']:8.3f}  {params}{tag}")
    if base and base.get("metric") is not None:
        print(f"base config: {base['metric']:.3f}")
    print(f"best config: {result['best_yaml']}")
    if run.is_done("evaluate"):
        run_stage("report", config, run, force=True)
        print(f"report: {run.path('report', 'index.html')}")
    return 0


def cmd_metrics(args) -> int:
    print_summary(storage.resolve(args.run_dir))
    return 0


def _walk_on(root: str) -> bool:
    """Whether the run's config has the random-walk stages on (a run switched off after
    an earlier run with them keeps their old scores in metrics.json)."""
    path = storage.join(root, "manifest.json")
    if not storage.exists(path):
        return True
    return bool(storage.read_json(path).get("config", {}).get("random_walk", {})
                .get("enabled", False))


def _mode(root: str) -> str:
    """The run's segmenter.mode (semi-weak mode), as its manifest records the config."""
    path = storage.join(root, "manifest.json")
    if not storage.exists(path):
        return "weak"
    return storage.read_json(path).get("config", {}).get("segmenter", {}).get("mode", "weak")


def print_summary(root: str) -> None:
    """The table of the evaluate stage and the report's path."""
    path = storage.join(root, "metrics.json")
    if not storage.exists(path):
        print(f"no metrics yet in {root}")
        return
    metrics = storage.read_json(path)

    def last(stage: str) -> tuple[str, dict | None]:
        """The last round's entry of `stage` (the run's output, with the loop)."""
        keys = [k for k in metrics if k.partition("@")[0] == stage]
        key = max(keys, key=lambda k: int(k.partition("@")[2] or 1), default=stage)
        return key, metrics.get(key)

    ev_key, ev = last("evaluate")
    if ev:
        cams = ev["cams"]
        t = cams["best_threshold"]
        configured = ev["seeds"].get("background_threshold")
        if t is None:  # no background class: seeds are the argmax, no threshold applies
            rows = [("CAM seeds (argmax)", cams["best"])]
        elif t == configured:
            rows = [(f"CAM seeds (threshold {t}, the best)", cams["best"])]
        else:
            rows = [(f"CAM seeds (best threshold {t})", cams["best"]),
                    (f"CAM seeds (threshold {configured})", ev["seeds"])]
        rows.append(("CRF pseudo masks", ev["crf"]))
        walked = metrics.get("random_walk", {}).get("scores", {}) if _walk_on(root) else {}
        rows += [("random-walk masks", walked[split]["rw_mask"]) for split in ev["splits"]
                 if split in walked]
        hybrid = (last("pct")[1] or {}).get("masks") if _mode(root) == "pct" else None
        if hybrid:  # scored on the train images with a mask that were not pixel-labelled
            rows.append((f"hybrid-net masks (train, {hybrid['images']} img)", hybrid))
        model = (last("predict")[1] or {}).get("scores", {})
        for split in ev["splits"]:
            if split in model:
                rows.append(("segmentation model", model[split]["prediction"]))
                if "prediction_crf" in model[split]:
                    rows.append(("segmentation model + CRF", model[split]["prediction_crf"]))
        print()
        where = f" (round {ev_key.partition('@')[2]})" if "@" in ev_key else ""
        print(f"Evaluation on split(s) {', '.join(ev['splits'])}{where}: {ev['images']} "
              "images with ground truth")
        print(f"{'':36s}{'mIoU':>8s}{'pixel acc':>11s}{'mean F1':>9s}")
        for name, m in rows:
            print(f"{name:36s}{100 * m['miou']:8.1f}{100 * m['pixel_accuracy']:11.1f}"
                  f"{100 * m['mean_f1']:9.1f}")
    from .report import round_curves

    curves = round_curves(metrics)
    if len(curves["round"]) > 1:
        print(f"\nmIoU per round of the loop:  {'round':>5s}{'seeds':>8s}{'CRF':>8s}"
              f"{'model':>8s}")
        for i, t in enumerate(curves["round"]):
            cells = "".join(f"{'-' if v[i] is None else f'{v[i]:.1f}':>8s}" for v in (
                curves["CAM seeds"], curves["CRF pseudo masks"], curves["segmentation model"]))
            print(f"{'':29s}{t:5d}{cells}")
    cls = last("classifier")[1]
    if cls and cls.get("val_map") is not None:
        # with no negative example in val, any scores give the top mAP
        note = (" (every val image holds every class: this measures nothing)"
                if cls.get("val_all_positive") else "")
        print(f"classifier: val mAP {cls['val_map']:.1f}{note} after {cls.get('epoch')} "
              "epochs")
    report = storage.join(root, "report", "index.html")
    if storage.exists(report):
        print(f"report: {report}")


def _subset(spec: str) -> tuple[str, str, str | None]:
    split, _, paths = spec.partition("=")
    images, _, masks = paths.partition(":")
    if not split or not images:
        raise argparse.ArgumentTypeError(f"--subset {spec!r}: expected SPLIT=IMAGES[:MASKS]")
    return split, images, masks or None


def _pair(flag: str, names: str):
    """argparse type of `--tiles 3x3` / `--tile-size 240x320`: two positive integers."""
    def parse(spec: str) -> tuple[int, int]:
        a, sep, b = spec.lower().partition("x")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit() \
                or min(int(a), int(b)) < 1:
            raise argparse.ArgumentTypeError(f"{flag} {spec!r}: expected {names}, e.g. 3x3")
        return int(a), int(b)
    return parse


def cmd_import(args) -> int:
    from .data import importers

    tile_splits = [s.strip() for s in (args.tile_splits or "").split(",") if s.strip()]
    opts = importers.ImportOptions(mask_offset=getattr(args, "mask_offset", 0),
                                   ignore_values=tuple(getattr(args, "ignore_value", None) or ()),
                                   max_image_side=args.max_image_side, skip_bad=args.skip_bad,
                                   overwrite=args.overwrite, tiles=args.tiles,
                                   tile_size=args.tile_size,
                                   tile_min_fraction=args.tile_min_fraction,
                                   tile_tags=args.tile_tags,
                                   tile_splits=tuple(tile_splits) or None,
                                   apply_exif=args.apply_exif,
                                   max_megapixels=args.max_megapixels,
                                   train_split=args.train_split)
    if args.format == "voc":
        result = importers.import_voc(args.path, args.out, opts,
                                      splits=args.splits.split(",") if args.splits else None)
    elif args.format == "folder":
        root = args.path
        if args.subset:
            subsets = [(s, os.path.join(root, i), os.path.join(root, m) if m else None)
                       for s, i, m in args.subset]
        else:
            subsets = [(args.split, root, args.masks)]
        result = importers.import_folder(subsets, args.out, labels_csv=args.labels,
                                         classes=args.classes, background=not args.no_background,
                                         opts=opts)
    else:
        result = importers.import_coco([(args.split, args.path, args.images)], args.out, opts)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
    print(f"imported {counts} {'rows' if opts.tiled else 'images'} into {result.path}")
    if opts.tiled:
        print(f"tiles: {result.tiles} written, {len(result.skipped_tiles)} skipped (no class "
              f"on at least {opts.tile_min_fraction:g} of their labelled pixels)"
              if opts.tile_tags is None else
              f"tiles: {result.tiles} written, {len(result.skipped_tiles)} skipped (empty "
              "labels in the tile tags CSV)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad input(s):")
        for s in result.skipped:
            print(f"  {s['file']}: {s['reason']}")
    for split, st in result.label_stats.items():
        print(f"rows holding each class, {split} ({st['rows']} rows):")
        shares = [f"{name} {100 * share:.0f}%" for name, share in st["share"].items()]
        for i in range(0, len(shares), 6):
            print("  " + ", ".join(shares[i:i + 6]))
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-wsss",
                                description="Weakly supervised semantic segmentation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_args(q, with_config: bool = True):
        if with_config:
            q.add_argument("config", help="YAML config file")
        q.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="config overrides, e.g. classifier.epochs=3")
        q.add_argument("--run-dir", help="run directory (local path or URI)")
        q.add_argument("--force", action="store_true", help="rerun stages that are up to date")

    q = sub.add_parser("demo", help="run the whole pipeline on the bundled demo data")
    run_args(q, with_config=False)
    q.set_defaults(fn=cmd_demo)
    q = sub.add_parser("run", help="run the pipeline (finished stages are skipped)")
    run_args(q)
    q.add_argument("--until", metavar="STEP",
                   help="stop after this step: a stage (round 1's, e.g. crf for the pseudo "
                        "masks only) or STAGE@T for round T's")
    q.set_defaults(fn=cmd_run)
    from .graph import STAGE_NAMES
    from .pipeline import describe_stages

    q = sub.add_parser("stage", help="run one stage", epilog="stages:\n" + describe_stages(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("name", choices=STAGE_NAMES, metavar="NAME",
                   help=", ".join(STAGE_NAMES))
    run_args(q)
    q.add_argument("--round", type=int, default=1, help="the round of the step (default 1)")
    q.set_defaults(fn=cmd_stage)
    q = sub.add_parser("export", help="write a run's masks as PNG files, or its model")
    q.add_argument("run_dir", help="a finished run directory")
    q.add_argument("--what", required=True,
                   choices=("pseudo-masks", "seeds", "random-walk-masks", "predictions",
                            "predictions-crf", "boxes", "model"),
                   help="pseudo-masks (CRF), seeds, random-walk-masks, predictions of the "
                        "segmentation model (-crf: after its CRF), boxes from the CAMs "
                        "(boxes.json), or the segmentation model's weights")
    q.add_argument("--out", required=True, help="folder to write (created)")
    q.add_argument("--splits", help="comma-separated splits (default: every split)")
    q.add_argument("--round", type=int, default=None, help="round (default: the last)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    q.add_argument("--stitch", action="store_true",
                   help="tiled datasets: one PNG per frame, its tiles put back together")
    q.set_defaults(fn=cmd_export)
    q = sub.add_parser("unlock", help="break the lock of a run directory whose run died")
    q.add_argument("run_dir")
    q.set_defaults(fn=cmd_unlock)
    q = sub.add_parser("explain", help="compare explaining methods: XAI metrics, seed mIoU")
    run_args(q)
    q.add_argument("--methods", help="comma-separated, e.g. cam,gradcam,minmax "
                                     "(default: explain.methods)")
    q.add_argument("--round", type=int, default=None,
                   help="the round whose classifier is explained (default: the last "
                        "finished one)")
    q.set_defaults(fn=cmd_explain)
    q = sub.add_parser("sweep", help="a Ray Tune sweep from tuning/NAME.yaml")
    q.add_argument("name", help="thresholds, regularizers, ... or a sweep YAML file")
    run_args(q)
    q.add_argument("--samples", type=int, help="number of trials (overrides the sweep file)")
    q.set_defaults(fn=cmd_sweep)
    q = sub.add_parser("config", help="print a config with every key (defaults included)")
    q.add_argument("config", nargs="?", help="YAML config file (default: the demo's)")
    q.add_argument("overrides", nargs="*", metavar="key.sub=value")
    q.set_defaults(fn=cmd_config)
    q = sub.add_parser("metrics", help="print a run's evaluation table")
    q.add_argument("run_dir")
    q.set_defaults(fn=cmd_metrics)

    imp = sub.add_parser("import", help="turn a folder of images into a dataset")
    isub = imp.add_subparsers(dest="format", required=True)

    def import_args(q):
        q.add_argument("--out", required=True, help="dataset folder to create")
        q.add_argument("--skip-bad", action="store_true",
                       help="skip bad images and report them instead of stopping")
        q.add_argument("--max-image-side", type=int, help="shrink larger images to this")
        q.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        q.add_argument("--tiles", type=_pair("--tiles", "ROWSxCOLS"), metavar="RxC",
                       help="cut every image into a grid of tiles, one row each (e.g. 3x3)")
        q.add_argument("--tile-size", type=_pair("--tile-size", "HEIGHTxWIDTH"), metavar="HxW",
                       help="cut into the fewest tiles of at most HxW pixels, split evenly")
        q.add_argument("--tile-min-fraction", type=float, default=0.01,
                       help="a tile is tagged with the classes on at least this share of "
                            "its labelled pixels (default 0.01)")
        q.add_argument("--tile-tags", metavar="CSV",
                       help="tile tags written by you instead of from the masks (the labels "
                            "CSV format; image column: tile ids IMAGE@r<i>c<j>)")
        q.add_argument("--tile-splits", metavar="SPLITS",
                       help="comma-separated splits to tile (default: every split)")
        q.add_argument("--apply-exif", action="store_true",
                       help="rotate images by their EXIF orientation tag (masks drawn on the "
                            "displayed picture); default: stored pixels, as VOC and COCO")
        q.add_argument("--max-megapixels", type=float, default=200.0,
                       help="refuse images whose header claims more (decompression bombs; "
                            "default 200)")
        q.add_argument("--train-split", default="train",
                       help="split whose label statistics warn about crowded classes")
        q.set_defaults(fn=cmd_import)

    q = isub.add_parser("voc", help="VOC layout: JPEGImages, SegmentationClass, ImageSets")
    q.add_argument("path")
    q.add_argument("--splits", help="comma-separated ImageSets/Segmentation lists to import")
    import_args(q)
    q = isub.add_parser("folder", help="a folder of images + labels CSV and/or masks")
    q.add_argument("path", help="image folder (or the root of the --subset folders)")
    q.add_argument("--labels", help="CSV with columns image, labels[, split]")
    q.add_argument("--masks", help="folder of label PNGs named like the images")
    q.add_argument("--split", default="train", help="split of the images (default train)")
    q.add_argument("--subset", action="append", type=_subset, metavar="SPLIT=IMAGES[:MASKS]",
                   help="import several sub-folders of PATH as splits (repeatable)")
    q.add_argument("--classes", help="class names, comma-separated, or a file, one per line")
    q.add_argument("--mask-offset", type=int, default=0,
                   help="add to mask values (1 when masks number classes from 0)")
    q.add_argument("--ignore-value", type=int, action="append",
                   help="mask value meaning 'not labelled' (repeatable)")
    q.add_argument("--no-background", action="store_true",
                   help="every pixel belongs to a class (no background class)")
    import_args(q)
    q = isub.add_parser("coco", help="COCO instances JSON")
    q.add_argument("path", help="instances_*.json")
    q.add_argument("--images", required=True, help="folder of the images")
    q.add_argument("--split", default="train")
    import_args(q)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key.sub=value` overrides may come before or after the options
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except WsssError as exc:
        print(f"ray-wsss: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ray-wsss: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def job_main(stage: str | None, argv: list[str] | None = None, command: str | None = None
             ) -> int:
    """Entry point of the scripts in jobs/: `--config FILE --run-dir DIR [--force]
    [key.sub=value ...]`, i.e. `ray-wsss run` (stage None), `ray-wsss stage NAME`, or
    another command (`sweep NAME`, `explain`) given as `command`."""
    p = argparse.ArgumentParser(description=f"ray-wsss {command or stage or 'pipeline'} "
                                "as a Ray job")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--run-dir", help="run directory: local path or URI (s3://, gs://)")
    p.add_argument("--force", action="store_true")
    args, overrides = p.parse_known_args(argv)
    if command is not None:
        cmd = command.split()
    else:
        cmd = ["run"] if stage is None else ["stage", stage]
    cmd += [args.config, *overrides]
    if args.run_dir:
        cmd += ["--run-dir", args.run_dir]
    if args.force:
        cmd.append("--force")
    return main(cmd)


if __name__ == "__main__":
    sys.exit(main())

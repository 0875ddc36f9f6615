"""Ray Tune sweeps over any config keys: `ray-wsss sweep NAME CONFIG.yaml`.

A sweep is a YAML file (tuning/NAME.yaml): which trainable runs a trial, the metric, the
search algorithm and a search space of dotted config keys:

```
trainable: refine            # refine | classifier | pipeline
metric: crf_miou
mode: max
num_samples: 24
search: optuna               # optuna | hyperopt | random
scheduler: null              # asha: early stopping on the metric reported each epoch
space:
  seeds.background_threshold: {uniform: [0.05, 0.6]}
  crf.iterations: {randint: [3, 12]}
  cams.scales: {choice: [[1.0], [1.0, 0.5, 1.5]]}
```

Keys that only make sense together are one `choice` of mappings for their section: each
mapping sets the keys it names, the others keep the config's values (tuning/iterations.yaml
picks the loop's variants so). Before a trial runs, every combination of the discrete
choices and range bounds is checked as `ray-wsss run` would check it, so a point that
makes an invalid config stops the sweep at once, named.

Trainables:
- `refine`: seeds + dense CRF + evaluation on stored maps of the images with ground
  truth (keys of `seeds`, `crf`, and the TTA `cams.scales` / `cams.flip`). Cheap: the
  maps are computed once per sweep for every scale and flip (`cam_cache-KEY/`), and a
  trial only combines the ones it needs.
- `classifier`: one Ray Train fit per trial (keys of `model`, `head`, `regularizers`,
  `classifier`), reporting val mAP every epoch, so ASHA can stop the poor ones early.
- `walk`: the random walk on the fitted affinity network (keys of `random_walk`: beta,
  steps, radius, the background rule and threshold, the walk's CRF), walked again in the
  trial on the images with ground truth and scored (`rw_miou`): no refit.
- `pipeline`: the whole pipeline in a trial's own run directory on the base run's
  dataset (any key): the general case, and the costliest.

The first trial is the base config itself, so the sweep's best is never worse than it.
Trials report to Tune and as Ray metrics (`ray_wsss_trial_metric`, charted in the
dashboard where Prometheus/Grafana are set up). Results land in <run>/sweeps/NAME/:
results.json / .csv, best.yaml (a config `ray-wsss run` accepts) and Tune's own files; a
sweep whose driver died resumes with `Tuner.restore` when started again. The Tune
experiment and the map cache are named by `sweep_key`: the sweep file, the config the
trials start from and the run ids of the steps they read, so a sweep started again after
a classifier refit or a config change runs afresh instead of restoring stale results.
"""
from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from . import storage
from .config import PipelineConfig, from_dict, read_yaml, set_key, to_dict
from .errors import ConfigError, StageError
from .run import Run
from .runtime import write_parquet

def _sections(stage: str) -> tuple[str, ...]:
    from .graph import STAGES
    return tuple(f"{s}." for s in STAGES[stage].sections)


# trainable: (the stage that must be finished first, the config keys a trial may vary),
# both from the stage graph: `refine` redoes the crf stage on cached maps (and may change
# the TTA the maps combine), `classifier` the classifier fit, `pipeline` everything.
TRAINABLES = {
    "refine": ("classifier", _sections("crf") + ("cams.scales", "cams.flip")),
    "classifier": ("dataset", _sections("classifier")),
    "pipeline": ("dataset", ("",)),
    # the random walk on the fitted boundary network: every key but the switch and the
    # actors' resources (a trial walks in its own process)
    "walk": ("affinity", tuple(f"random_walk.{k}" for k in (
        "radius", "beta", "steps", "background_threshold", "walked_background",
        "background_power", "flip", "crf", "max_image_side"))),
    # the iterative loop, one round per training iteration: any key, `loop.*` above all
    "iterations": ("dataset", ("",)),
}
TRAINABLE_SECTIONS = {k: v[1] for k, v in TRAINABLES.items()}
# trainable: (the steps whose outputs its trials read, the step whose hash covers the
# config a trial applies its point to; None: the whole config, as a trial runs the
# pipeline or fits from the dataset with any key)
TRAINABLE_READS = {
    "refine": (("classifier",), "evaluate"),
    "classifier": (("dataset",), "classifier"),
    "pipeline": (("dataset",), None),
    "walk": (("cams", "affinity"), "random_walk"),
    "iterations": (("dataset",), None),
}
# sections no trial result depends on (where runs go, Ray's settings, other commands)
_UNSWEPT = ("ray", "explain", "report")
SWEEP_DIRS = ("tuning",)


def allowed_key(key: str, allowed: tuple[str, ...]) -> bool:
    """A dotted key may vary when it is one of `allowed` or inside one ("crf." is a
    section, "cams.flip" a key, "" anything)."""
    return any(a == "" or key == a.rstrip(".") or key.startswith(a.rstrip(".") + ".")
               for a in allowed)


@dataclass
class SweepSpec:
    name: str
    trainable: str
    metric: str
    space: dict[str, dict]
    mode: str = "max"
    num_samples: int = 16
    search: str = "optuna"
    scheduler: str | None = None
    grace_period: int = 1
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    max_rounds: int = 3          # iterations: rounds run (and reported) per trial
    description: str = ""
    extra: dict = field(default_factory=dict)

    def digest(self) -> str:
        blob = json.dumps({"trainable": self.trainable, "metric": self.metric,
                           "space": self.space, "search": self.search}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def find_spec(name: str) -> str:
    """A sweep file: NAME as a path, else tuning/NAME.yaml in the working directory or
    beside the package (a source checkout, or a `ray job submit --working-dir`)."""
    if os.path.isfile(name):
        return name
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), os.path.dirname(here)):
        for d in SWEEP_DIRS:
            path = os.path.join(base, d, f"{name}.yaml")
            if os.path.isfile(path):
                return path
    raise ConfigError(f"no sweep {name!r}: expected a YAML file or tuning/{name}.yaml")


def load_spec(name: str, overrides: dict | None = None) -> SweepSpec:
    path = find_spec(name)
    with open(path, encoding="utf-8") as fh:
        data = read_yaml(fh) or {}
    data.update(overrides or {})
    known = set(SweepSpec.__dataclass_fields__) - {"name", "extra"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(known))})")
    for key in ("trainable", "metric", "space"):
        if key not in data:
            raise ConfigError(f"{path}: a sweep needs {key!r}")
    spec = SweepSpec(name=os.path.splitext(os.path.basename(path))[0], **data)
    if spec.trainable not in TRAINABLE_SECTIONS:
        raise ConfigError(f"{path}: trainable must be one of {', '.join(TRAINABLE_SECTIONS)}")
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode must be max or min")
    if spec.cpus_per_trial < 0:
        raise ConfigError(f"{path}: cpus_per_trial must be >= 0")
    for key, dom in spec.space.items():
        if not allowed_key(key, TRAINABLE_SECTIONS[spec.trainable]):
            raise ConfigError(f"{path}: key {key} cannot vary in a {spec.trainable} sweep "
                              f"(allowed: {', '.join(TRAINABLE_SECTIONS[spec.trainable])})")
        if not isinstance(dom, dict) or len(dom) != 1:
            raise ConfigError(f"{path}: space.{key} must be one of "
                              "{uniform|loguniform|randint|choice|grid: [...]}")
    return spec


# ---------------------------------------------------------------- search space

def _encode(v: Any) -> Any:
    """Tune / Optuna categories must be plain values: lists travel as JSON strings."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def _decode(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        return json.loads(v)
    return v


def tune_space(spec: SweepSpec) -> dict:
    from ray import tune

    out = {}
    for key, dom in spec.space.items():
        (kind, args), = dom.items()
        if kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "quniform":
            out[key] = tune.quniform(*args)
        elif kind == "randint":  # inclusive bounds in the YAML
            out[key] = tune.randint(args[0], args[1] + 1)
        elif kind == "choice":
            out[key] = tune.choice([_encode(a) for a in args])
        elif kind == "grid":
            out[key] = tune.grid_search([_encode(a) for a in args])
        else:
            raise ConfigError(f"sweep space.{key}: unknown domain {kind!r}")
    return out


def base_point(spec: SweepSpec, config: PipelineConfig) -> dict:
    """The current config's values of the swept keys (the first trial). A `choice` or
    `grid` key takes the first of its values that leaves the config as it is, when one
    does (a section's mapping that names the config's own values is that mapping, so the
    base trial is one of the choices, as Optuna and HyperOpt require); a section swept by
    mappings none of which matches takes the config's values of the keys they name."""
    flat = to_dict(config)
    point = {}
    for key, dom in spec.space.items():
        (kind, args), = dom.items()
        node = flat
        for part in key.split("."):
            node = node[part]
        if kind in ("choice", "grid"):
            same = [a for a in args if apply_point(config, {key: _encode(a)}) == config]
            if same:
                node = same[0]
            elif isinstance(node, dict):
                node = _pick(node, [a for a in args if isinstance(a, dict)])
        point[key] = _encode(node)
    return point


def _pick(values: dict, mappings: list[dict]) -> dict:
    """`values` cut to the (nested) keys that any of `mappings` names."""
    out = {}
    for k in values:
        named = [m[k] for m in mappings if k in m]
        if named:
            sub = [m for m in named if isinstance(m, dict)]
            out[k] = _pick(values[k], sub) if sub and isinstance(values[k], dict) else values[k]
    return out


def _flatten(key: str, value: Any) -> list[tuple[str, Any]]:
    """A section's mapping as dotted keys, nested sections included."""
    if not isinstance(value, dict):
        return [(key, value)]
    return [pair for sub, v in value.items() for pair in _flatten(f"{key}.{sub}", v)]


def first_points(spec: SweepSpec, config: PipelineConfig) -> tuple[list[dict], int]:
    """Tune's `points_to_evaluate` and `num_samples`: the base config's point first. Tune
    spends one sample on each such point, and with a `grid` in the space a sample is the
    whole grid: so the base point is left out when the grid holds it (every key's base
    value is one of its values) and otherwise runs beside `num_samples` grids."""
    base = base_point(spec, config)
    if not any(kind == "grid" for dom in spec.space.values() for kind in dom):
        return [base], spec.num_samples
    # Tune enumerates grid keys and draws the others for each grid point: only a grid
    # (or a one-value choice) holds the base value for sure
    held = all((kind == "grid" or (kind == "choice" and len(args) == 1))
               and _decode(base[key]) in args
               for key, dom in spec.space.items() for kind, args in dom.items())
    return ([], spec.num_samples) if held else ([base], spec.num_samples + 1)


def apply_point(config: PipelineConfig, point: dict, **extra: Any) -> PipelineConfig:
    """`config` with the point's values. A mapping value is a section's variant: it sets
    the keys it names in that section, nested sections included (no config field holds
    a mapping), and leaves the others as they are."""
    data = copy.deepcopy(to_dict(config))
    for key, value in {**point, **extra}.items():
        for dotted, v in _flatten(key, _decode(value)):
            set_key(data, dotted, v)   # (not YAML text: YAML 1.1 reads 1e-05 as a string)
    return from_dict(PipelineConfig, data)


#: more combinations of discrete choices than this are checked one key at a time
MAX_CHECKED_POINTS = 512


def check_space(spec: SweepSpec, config: PipelineConfig) -> int:
    """Every combination of the space's values (each `choice` and `grid` value, both
    bounds of a range) made into the config a trial would run, and checked as a config
    at load is: an invalid point raises ConfigError naming it, before Tune starts. Past
    MAX_CHECKED_POINTS combinations each value is checked with the other keys at their
    first value. Returns the number of points checked."""
    from .validate import validate

    values = {key: (list(args) if kind in ("choice", "grid") else list(args[:2]))
              for key, dom in spec.space.items() for kind, args in dom.items()}
    if math.prod(len(v) for v in values.values()) <= MAX_CHECKED_POINTS:
        points = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    else:
        first = {key: v[0] for key, v in values.items()}
        points = [{**first, key: v} for key, vs in values.items() for v in vs]
    for point in points:
        try:
            trial = apply_point(config, {k: _encode(v) for k, v in point.items()})
            if spec.trainable == "iterations":
                trial = loop_trial_config(trial, spec.max_rounds)
            validate(trial)
        except ConfigError as exc:
            raise ConfigError(
                f"sweep {spec.name}: the point {json.dumps(point)} makes an invalid config: "
                f"{exc} (keys that only go together: one choice of mappings for their "
                f"section, e.g. `loop: {{choice: [{{feedback: labels, fallback: class}}, "
                f"...]}}`)") from None
    if spec.search in ("optuna", "hyperopt"):
        base = base_point(spec, config)
        for key, dom in spec.space.items():
            for kind, args in dom.items():
                if kind in ("choice", "grid") and _decode(base[key]) not in args:
                    raise ConfigError(
                        f"sweep {spec.name}: search: {spec.search} starts from the config's "
                        f"own point, and its {key} {base[key]} is none of the choices of "
                        f"space.{key}: add it, or use search: random")
    return len(points)


def _searcher(spec: SweepSpec, points: list[dict]):
    if spec.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search: optuna needs `pip install optuna` (a dependency of ray-wsss)") from None
        return OptunaSearch(metric=spec.metric, mode=spec.mode, points_to_evaluate=points)
    if spec.search == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
        except ImportError:
            raise ConfigError("search: hyperopt needs `pip install hyperopt`") from None
        return HyperOptSearch(metric=spec.metric, mode=spec.mode, points_to_evaluate=points)
    if spec.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(points_to_evaluate=points)
    raise ConfigError(f"search must be optuna, hyperopt or random, not {spec.search!r}")


# ---------------------------------------------------------------- trainables

def _report_metrics(sweep: str, metrics: dict) -> None:
    """Every numeric result as a Ray metric too (Prometheus / the dashboard's Metrics)."""
    from ray import tune
    from ray.util.metrics import Gauge

    trial = tune.get_context().get_trial_id() or "?"
    gauge = Gauge("ray_wsss_trial_metric", description="ray-wsss sweep trial results",
                  tag_keys=("sweep", "trial", "metric"))
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
            gauge.set(float(v), tags={"sweep": sweep, "trial": trial, "metric": k})


def _finished_once(compute):
    """A one-result trial whose result outlives the driver: Tune snapshots its experiment
    state every 10 s or more, so a trial that finished just before the driver was killed
    is restored as unfinished and started again; its result, saved here (per trial id and
    point, in the sweep's own key) when it was computed, is reported again instead of
    being recomputed."""
    @functools.wraps(compute)
    def trial(point: dict, ctx: dict) -> None:
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        path = storage.join(ctx["sweep_dir"], f"trials-{ctx['key']}", f"{trial_id}.json")
        here = json.loads(json.dumps(point, default=str))
        saved = storage.read_json(path) if storage.exists(path) else None
        if saved is not None and saved.get("point") == here:
            metrics = saved["metrics"]
        else:
            metrics = compute(point, ctx)
            storage.write_json_atomic(path, {"point": here, "metrics": metrics})
        _report_metrics(ctx["sweep"], metrics)
        tune.report(metrics)
    return trial


@_finished_once
def refine_trial(point: dict, ctx: dict) -> dict:
    """Seeds + CRF + metrics for one point, on the sweep's cached per-scale maps."""
    from .data.codecs import decode_array, decode_image, decode_mask
    from .data.dataset import read_table, vector_to_labels
    from .evaluate import ConfusionMatrix
    from .refine.crf import crf_mask
    from .refine.seeds import seed_mask
    from .cams.tta import normalise

    config = apply_point(ctx["config"], point)
    scales, flip = list(config.cams.scales), config.cams.flip
    cached = ctx["scales"]
    if not set(scales) <= set(cached) or (flip and not ctx["flip"]):
        raise StageError(f"the map cache holds scales {cached}, flip {ctx['flip']}; "
                         f"the trial wants {scales}, flip {flip}")
    pick = [cached.index(s) for s in scales]
    n = ctx["n_labels"]
    seeds, crfs = ConfusionMatrix(n), ConfusionMatrix(n)
    table = read_table(ctx["cache"], ["image_id", "image", "mask", "label_vector", "raw"])
    for row in table.to_pylist():
        raw = decode_array(row["raw"]).astype(np.float32)[pick]
        maps = normalise((raw if flip else raw[:, :1]).sum(axis=(0, 1)))
        classes = vector_to_labels(row["label_vector"])
        gt = decode_mask(row["mask"])
        s = config.seeds
        seeds.update(gt, seed_mask(maps, classes, s.background_threshold, s.background_power,
                                   ctx["background"]))
        crfs.update(gt, crf_mask(decode_image(row["image"]), maps, classes, config.crf,
                                 s.background_threshold, s.background_power,
                                 ctx["background"]))
    exclude = () if ctx["background"] else (0,)
    metrics = {"seed_miou": 100 * seeds.metrics(exclude=exclude)["miou"],
               "crf_miou": 100 * crfs.metrics(exclude=exclude)["miou"],
               "images": table.num_rows}
    return metrics


def classifier_trial(point: dict, ctx: dict) -> None:
    """One Ray Train fit; val mAP flows to Tune each epoch (ASHA may stop it)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train.classifier import make_trainer

    config = apply_point(ctx["config"], point)
    run = Run(config, ctx["run_root"])
    trial = tune.get_context().get_trial_id()
    trainer = make_trainer(config, run.dataset_path, name=f"trial-{trial}",
                           storage_path=storage.join(ctx["sweep_dir"], "fits"),
                           callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.metrics:
        _report_metrics(ctx["sweep"], result.metrics)


def pipeline_trial(point: dict, ctx: dict) -> None:
    """The whole pipeline in the trial's own run directory, on the base run's dataset."""
    from ray import tune

    from .pipeline import run_pipeline

    trial = tune.get_context().get_trial_id()
    root = storage.join(ctx["sweep_dir"], "runs", trial)
    config = apply_point(ctx["config"], point, **{
        "data.source": "parquet", "data.path": ctx["dataset"], "run_dir": root,
        "report.num_images": 0})
    run = run_pipeline(config, run_dir=root)
    ev = run.read_metrics().get("evaluate", {})
    metrics = {"seed_miou": 100 * ev.get("cams", {}).get("best", {}).get("miou", np.nan),
               "crf_miou": 100 * ev.get("crf", {}).get("miou", np.nan),
               "val_map": run.read_metrics().get("classifier", {}).get("val_map", np.nan)}
    _report_metrics(ctx["sweep"], metrics)
    tune.report(metrics)


def round_metrics(metrics: dict, t: int) -> dict:
    """Round t's scores from metrics.json: seed / CRF mIoU of its evaluate step (or the
    last round that has one: self-training reuses round 1's pseudo masks), the
    segmentation model's val mIoU."""
    suffix = "" if t == 1 else f"@{t}"
    ev = metrics.get(f"evaluate{suffix}") or {}
    model = (metrics.get(f"predict{suffix}") or {}).get("scores", {})
    split = next(iter(model), None)
    return {"round": t,
            "seed_miou": 100 * ev.get("cams", {}).get("best", {}).get("miou", np.nan),
            "crf_miou": 100 * ev.get("crf", {}).get("miou", np.nan),
            "model_miou": 100 * model[split]["prediction"]["miou"] if split else np.nan}


def seed_steps(base_root: str, root: str, config: PipelineConfig, rounds: int) -> int:
    """Copy into a new trial's run directory the base run's steps (rounds 1..`rounds`)
    that the trial would compute identically (same hash, same inputs: round 1 for a
    sweep over loop keys, which round 1 does not read; every round for the base point),
    so no trial redoes them. Returns the number of steps copied."""
    import shutil

    from .config import replace
    from .graph import STAGES, active_inputs, steps

    if storage.is_uri(root) or storage.exists(storage.join(root, "manifest.json")):
        return 0
    config = replace(config, **{"loop.rounds": rounds})
    base = Run(config, base_root)
    trial = Run(config, root)
    done = []
    for s in steps(config.loop):  # in order: a step is kept only with all its inputs
        if s.stage != "report" and STAGES[s.stage].enabled(config) and base.is_done(s) \
                and all(u.key in {d.key for d in done} for u in active_inputs(s, config)):
            done.append(s)
    if not done:
        return 0
    manifest = base.manifest()
    keep = {s.key for s in done}
    for s in done:
        src = base.step_path(s)
        if storage.exists(src) and s.stage != "evaluate" and src != trial.step_path(s):
            shutil.copytree(src, trial.step_path(s), dirs_exist_ok=True)
    storage.write_json_atomic(trial.manifest_path, {
        **manifest, "stages": {k: v for k, v in manifest["stages"].items() if k in keep}})
    metrics = {k: v for k, v in base.read_metrics().items() if k in keep}
    storage.write_json_atomic(trial.path("metrics.json"), metrics)
    return len(done)


def self_training(config):
    """`config` made fit for `loop.feedback: labels`: each round's segmentation model
    learns the previous round's CRF-refined predictions of its train split, so the
    predictions are CRF-refined and made for that split too."""
    from .config import replace

    splits = list(config.predict.splits)
    if config.segmenter.train_split not in splits:
        splits.append(config.segmenter.train_split)
    return replace(config, **{"predict.crf": True, "predict.splits": tuple(splits)})


def loop_trial_config(config: PipelineConfig, rounds: int) -> PipelineConfig:
    """The config an iterations trial runs for `rounds` rounds (self-training made fit)."""
    from .config import replace

    if config.loop.feedback == "labels":  # self-training learns from CRF-refined predictions
        config = self_training(config)
    return replace(config, **{"loop.rounds": rounds})


def iterations_trial(point: dict, ctx: dict) -> None:
    """The iterative loop in the trial's own run directory, one round at a time, each
    round a Tune report (training iteration = round): ASHA may stop a poor trial after
    any round, and a trial never recomputes a round it made (raising loop.rounds reuses
    the earlier rounds' steps). Steps of the base run that the trial would compute
    identically (round 1, when only loop keys vary) are copied, not recomputed."""
    from ray import tune

    from .config import replace
    from .pipeline import run_pipeline

    trial = tune.get_context().get_trial_id()
    root = storage.join(ctx["sweep_dir"], "runs", trial)
    config = loop_trial_config(apply_point(
        ctx["config"], point, **{"run_dir": root, "report.num_images": 0}), ctx["max_rounds"])
    seed_steps(ctx["run_root"], root, config, ctx["max_rounds"])
    best = (np.nan, 0)
    for t in range(1, ctx["max_rounds"] + 1):
        run = run_pipeline(replace(config, **{"loop.rounds": t}), run_dir=root)
        metrics = round_metrics(run.read_metrics(), t)
        if not best[0] >= metrics["model_miou"]:  # (nan compares false)
            best = (metrics["model_miou"], t)
        # the best T so far: the trial's last result says which round to stop at
        metrics.update(best_model_miou=best[0], best_round=best[1])
        _report_metrics(ctx["sweep"], metrics)
        tune.report(metrics)


@_finished_once
def walk_trial(point: dict, ctx: dict) -> dict:
    """The random walk of one point on the images with ground truth (evaluate.splits),
    with the run's fitted boundary network and stored CAMs, scored like the stage."""
    from .data.codecs import decode_mask
    from .data.dataset import open_dataset
    from .evaluate import ConfusionMatrix
    from .refine.walk_stage import RandomWalker

    config = apply_point(ctx["config"], point)
    walker = RandomWalker(ctx["affinity"], ctx["cams"], config.random_walk, ctx["background"],
                          threads=max(1, int(ctx["threads"])))
    conf = ConfusionMatrix(ctx["n_labels"])
    ds = open_dataset(ctx["dataset"], ["image_id", "split", "image", "mask", "label_vector"],
                      list(config.evaluate.splits), require=("mask",))
    images = 0
    for batch in ds.iter_batches(batch_size=config.random_walk.batch_size,
                                 batch_format="numpy"):
        out = walker(batch)   # the stage's own per-batch code: the same rows it writes
        for truth, walked in zip(out["mask"], out["rw_mask"]):
            conf.update(decode_mask(truth), decode_mask(walked))
            images += 1
    exclude = () if ctx["background"] else (0,)
    return {"rw_miou": 100 * conf.metrics(exclude=exclude)["miou"], "images": images}


TRIALS = {"refine": refine_trial, "walk": walk_trial, "classifier": classifier_trial,
          "pipeline": pipeline_trial, "iterations": iterations_trial}


# ---------------------------------------------------------------- the map cache

class _RawMaps:
    """Ray Data callable class: images with ground truth -> per-scale, per-flip maps."""

    def __init__(self, model_dir, method, scales, flip, threads, options, max_side,
                 output_stride=None):
        from .cams.methods import get_method
        from .cams.predict import MapMaker

        self.maker = MapMaker(model_dir, scales, flip, threads, False, options, max_side,
                              output_stride=output_stride)
        self.method = get_method(method)

    def __call__(self, batch: dict) -> dict:
        from .data.codecs import decode_image, encode_array
        from .data.dataset import label_matrix, vector_to_labels

        images = [decode_image(d, f"image_id {i}") for d, i in zip(batch["image"],
                                                                     batch["image_id"])]
        vectors = label_matrix(batch["label_vector"])
        raw = self.maker.raw_maps(self.method, images, [vector_to_labels(v) - 1
                                                         for v in vectors])
        return {"image_id": batch["image_id"], "image": batch["image"], "mask": batch["mask"],
                "label_vector": vectors,
                "raw": np.array([encode_array(r, np.float32) for r in raw], dtype=object)}


def _cache_scales(spec: SweepSpec, config: PipelineConfig) -> tuple[list[float], bool]:
    scales, flip = set(config.cams.scales), config.cams.flip
    dom = spec.space.get("cams.scales")
    if dom:
        for choice in next(iter(dom.values())):
            scales |= set(_decode(choice) if isinstance(choice, str) else choice)
    if "cams.flip" in spec.space:
        flip = True
    return sorted(scales, key=lambda s: (s != 1.0, s)), flip


def build_cache(config: PipelineConfig, run: Run, path: str, scales, flip) -> None:
    from .actors import ActorResources, map_with_model
    from .cams.stage import method_options
    from .data.dataset import open_dataset, split_rows

    cfg = config.cams
    ds = open_dataset(run.dataset_path, ["image_id", "image", "mask", "label_vector"],
                      list(config.evaluate.splits), require=("mask",),
                      rows_per_block=cfg.batch_size)
    out = map_with_model(
        ds, _RawMaps, {
            "model_dir": run.step_path("classifier"), "method": cfg.method, "scales": scales,
            "flip": flip, "threads": cfg.torch_threads or cfg.cpus_per_actor,
            "options": method_options(cfg), "max_side": cfg.max_image_side,
            "output_stride": cfg.output_stride},
        ActorResources(cfg.num_actors, cfg.cpus_per_actor, 0.0, "cams"), cfg.batch_size,
        rows=split_rows(run.dataset_path, config.evaluate.splits))
    tmp = storage.temp_sibling(path)
    write_parquet(out, tmp, config.ray)
    storage.publish(tmp, path)


# ---------------------------------------------------------------- driver

def sweep_key(spec: SweepSpec, config: PipelineConfig, run: Run) -> str:
    """What a sweep's results depend on beyond its file: the run ids of the steps its
    trials read (a refitted classifier or affinity network gets a new one), the hash of
    the config they apply their points to (resources left out), and `evaluate` (which
    images are scored). It names the Tune experiment and the map cache, so a sweep
    started again after any of these changed runs afresh instead of restoring a finished
    experiment of stale results; a sweep whose driver died, started again on the same
    run and config, resumes."""
    import dataclasses

    from .config import section_hash

    reads, scope = TRAINABLE_READS[spec.trainable]
    if scope is not None:
        config_hash = run.current_hash(scope)
    else:
        config_hash = section_hash(config, [
            f.name for f in dataclasses.fields(config)
            if dataclasses.is_dataclass(getattr(config, f.name)) and f.name not in _UNSWEPT])
    blob = json.dumps({"sweep": spec.digest(), "config": config_hash,
                       "evaluate": section_hash(config, ["evaluate"]),
                       "reads": {s: (run.stage_entry(s) or {}).get("run_id") for s in reads}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def trial_resources(spec: SweepSpec) -> dict:
    """What a trial's own process reserves. A classifier trial only drives a Ray Train
    fit whose workers and data tasks reserve their own CPUs: it must hold none, or on a
    small machine the fit's data tasks wait for the CPU the trial holds (a deadlock).
    Tune cannot place a trial that asks for nothing, so `cpus_per_trial: 0` asks for a
    token 1 MB of the logical `memory` resource instead."""
    if spec.cpus_per_trial > 0:
        return {"cpu": spec.cpus_per_trial}
    return {"cpu": 0, "memory": 2**20}


def run_sweep(config: PipelineConfig, run: Run, spec: SweepSpec, force: bool = False) -> dict:
    """Run (or resume) a sweep; returns {"rows": [...], "best": {...}, "dir": ...}."""
    from ray import tune

    sweep_dir = run.path("sweeps", spec.name)
    needs = TRAINABLES[spec.trainable][0]
    if not run.is_done(needs):
        raise StageError(f"sweep {spec.name}: stage {needs} must be finished "
                         f"in {run.root} first (ray-wsss run)")
    if spec.trainable == "classifier" and config.classifier.num_workers == 0:
        raise ConfigError(f"sweep {spec.name}: classifier.num_workers is 0 (Ray Train's "
                          "local mode), which cannot report each epoch to Tune; set it to "
                          "1 or more")
    info = run.dataset_info()
    key = sweep_key(spec, config, run)
    exp = f"{spec.name}-{key}"
    tune_dir = storage.join(sweep_dir, "tune")
    path = storage.join(tune_dir, exp)
    # a sweep started before is resumed as it was started: its points were checked then
    # (the spec and config are in its key), and checking them again under rules that
    # changed since would keep its finished trials from being collected
    resume = not force and tune.Tuner.can_restore(path)
    if not resume:
        check_space(spec, config)
    if force:
        storage.remove(sweep_dir)
    storage.makedirs(sweep_dir)
    ctx = {"config": config, "sweep": spec.name, "key": key, "sweep_dir": sweep_dir,
           "run_root": run.root,
           "dataset": run.dataset_path, "n_labels": info.num_classes + 1,
           "background": info.background, "max_rounds": spec.max_rounds}
    if spec.trainable == "refine":
        scales, flip = _cache_scales(spec, config)
        cache = storage.join(sweep_dir, f"cam_cache-{key}")
        if not storage.exists(cache):
            print(f"[ray-wsss] sweep {spec.name}: computing maps of the evaluation images "
                  f"for scales {scales}{' + flip' if flip else ''}", flush=True)
            build_cache(config, run, cache, scales, flip)
        ctx.update(cache=cache, scales=scales, flip=flip)
    if spec.trainable == "walk":
        ctx.update(affinity=run.step_path("affinity"), cams=run.step_path("cams"),
                   threads=max(1, spec.cpus_per_trial))
    trainable = tune.with_parameters(TRIALS[spec.trainable], ctx=ctx)
    trainable = tune.with_resources(trainable, trial_resources(spec))
    if resume:
        print(f"[ray-wsss] sweep {spec.name}: resuming {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                   restart_errored=True)
    else:
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler
            horizon = (spec.max_rounds if spec.trainable == "iterations"
                       else config.classifier.epochs)
            scheduler = ASHAScheduler(metric=spec.metric, mode=spec.mode,
                                      grace_period=spec.grace_period,
                                      max_t=max(horizon, spec.grace_period))
        elif spec.scheduler is not None:
            raise ConfigError(f"sweep {spec.name}: scheduler must be asha or null")
        points, num_samples = first_points(spec, config)
        tuner = tune.Tuner(
            trainable, param_space=tune_space(spec),
            tune_config=tune.TuneConfig(
                search_alg=_searcher(spec, points), scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=spec.max_concurrent,
                **({} if scheduler else {"metric": spec.metric, "mode": spec.mode})),
            run_config=tune.RunConfig(name=exp, storage_path=tune_dir, verbose=1))
    grid = tuner.fit()
    return _collect(config, run, spec, grid, sweep_dir)


def _collect(config, run: Run, spec: SweepSpec, grid, sweep_dir: str) -> dict:
    rows = []
    for r in grid:
        point = {k: _decode(r.config.get(k)) for k in spec.space}
        m = r.metrics or {}
        row = {"trial": m.get("trial_id"), "params": point,
               "metric": m.get(spec.metric), "epochs": m.get("training_iteration"),
               "metrics": {k: v for k, v in m.items()
                           if isinstance(v, (int, float)) and not k.startswith(
                               ("time_", "timestamp", "pid", "training_iteration"))},
               "error": str(r.error)[:300] if r.error else None}
        rows.append(row)
    good = [r for r in rows if r["metric"] is not None and np.isfinite(r["metric"])]
    if not good:
        raise StageError(f"sweep {spec.name}: no trial finished (see {sweep_dir})")
    sign = 1 if spec.mode == "max" else -1
    good.sort(key=lambda r: -sign * r["metric"])
    best = good[0]
    default = base_point(spec, config)
    base = next((r for r in rows if r["params"] == {k: _decode(v) for k, v in default.items()}),
                None)
    best_config = apply_point(config, {k: _encode(v) for k, v in best["params"].items()})
    if spec.trainable == "iterations":  # the ranked round's config, runnable as it stands:
        # the best round for `best_model_miou`, else the round of the trial's last report
        ranked = best["metrics"].get("best_round") if spec.metric == "best_model_miou" \
            else best["epochs"]
        best_config = loop_trial_config(best_config, int(ranked or spec.max_rounds))
    results = {"name": spec.name, "trainable": spec.trainable, "metric": spec.metric,
               "mode": spec.mode, "search": spec.search, "space": spec.space,
               "best": best, "base": base, "trials": rows}
    storage.write_json_atomic(storage.join(sweep_dir, "results.json"), results)
    buf = io.StringIO()
    keys = list(spec.space)
    w = csv.writer(buf)
    w.writerow(["trial", spec.metric, *keys, "error"])
    for r in rows:
        w.writerow([r["trial"], r["metric"], *[json.dumps(r["params"][k]) for k in keys],
                    r["error"] or ""])
    storage.write_bytes_atomic(storage.join(sweep_dir, "results.csv"), buf.getvalue().encode())
    header = (f"# best of sweep {spec.name}: {spec.metric} = {best['metric']:.4g} "
              f"({len(good)} trials); run it with `ray-wsss run <this file>`\n")
    storage.write_bytes_atomic(storage.join(sweep_dir, "best.yaml"), (header + yaml.safe_dump(
        to_dict(best_config), sort_keys=False)).encode())
    run.write_metrics(f"sweep:{spec.name}", {"best": best, "base": base, "trials": len(rows)})
    return {"rows": rows, "best": best, "base": base, "dir": sweep_dir,
            "best_yaml": storage.join(sweep_dir, "best.yaml")}

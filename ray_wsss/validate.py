"""Names and ranges of config values, checked when a config loads.

`config.py` checks keys and types; this module checks values, so that `cams.method:
gradcam++` or `classifier.epochs: -1` fails at once with its dotted key instead of after a
full training. The rules are one table, `RULES` (dotted key -> rule); values of None
(an optional key left unset) are not checked. Names that other modules define (explaining
methods, backbones) are read from those modules' registries when the config is checked,
so a method added there is valid here at once.

Keys not in `RULES` (seeds, booleans, free-form strings, split names) take any value of
their type; `UNCHECKED` lists the numeric ones, so that a test can insist that every new
numeric key either gets a rule or is listed there on purpose.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Iterable

from .config import PipelineConfig
from .errors import ConfigError

# A rule returns what is wrong with a value (completing "<key>: <value> ..."), or None;
# a rule over a list may return (index, item, what is wrong with the item).
Rule = Callable[[Any], "str | tuple[int, Any, str] | None"]


def at_least(low: float) -> Rule:
    return lambda v: None if v >= low else f"is below the minimum {low:g}"


def above(low: float) -> Rule:
    return lambda v: None if v > low else f"must be greater than {low:g}"


def between(low: float, high: float, high_open: bool = False) -> Rule:
    def rule(v):
        if low <= v < high or (not high_open and v == high):
            return None
        return f"is not in [{low:g}, {high:g}{')' if high_open else ']'}"
    return rule


def one_of(names: Callable[[], Iterable] | Iterable) -> Rule:
    """Allowed values; a callable is asked when checking (a live registry)."""
    def rule(v):
        allowed = list(names() if callable(names) else names)
        if v in allowed:
            return None
        return f"is not one of {', '.join(map(str, allowed))}"
    return rule


def each(rule: Rule, allow_empty: bool = False) -> Rule:
    """For a list: `rule` for every item (the message names the item's index)."""
    def check(values):
        if not allow_empty and len(values) == 0:
            return "is empty: give at least one value"
        for i, v in enumerate(values):
            problem = rule(v)
            if problem:
                return i, v, problem
        return None
    return check


def inside(low: float, high: float) -> Rule:
    """The open interval (low, high)."""
    return lambda v: None if low < v < high else f"is not in ({low:g}, {high:g})"


def non_empty() -> Rule:
    return lambda values: None if len(values) else "is empty: give at least one value"


def ordered_pair(rule: Rule) -> Rule:
    """A [low, high] pair: `rule` for both, and low <= high."""
    def check(pair):
        problem = each(rule)(pair)
        if problem:
            return problem
        return None if pair[0] <= pair[1] else "must be [low, high] with low <= high"
    return check


def _methods():
    from .cams.methods import METHODS
    return METHODS


def _backbones():
    from .models.classifier import BACKBONES
    return BACKBONES


def _segmenter_strides():
    from .models.deeplab import SEGMENTER_OUTPUT_STRIDES
    return SEGMENTER_OUTPUT_STRIDES


MIN_CROP = 16        # smaller crops vanish at output stride 16
MIN_IMAGE_SIDE = 16


def _fit_rules(s: str) -> dict[str, Rule]:
    """The keys shared by the Ray Train fits of section `s` (classifier, segmenter)."""
    return {
        f"{s}.epochs": at_least(1),
        f"{s}.batch_size": at_least(1),
        f"{s}.lr": above(0),
        f"{s}.head_lr_multiplier": above(0),
        f"{s}.momentum": between(0, 1, high_open=True),
        f"{s}.weight_decay": at_least(0),
        f"{s}.warmup_epochs": at_least(0),
        f"{s}.crop_size": at_least(MIN_CROP),
        f"{s}.scale_range": ordered_pair(above(0)),
        f"{s}.color_jitter": between(0, 1),
        f"{s}.num_workers": at_least(0),   # 0: Ray Train's local mode
        f"{s}.cpus_per_worker": at_least(1),
        f"{s}.torch_threads": at_least(1),
        f"{s}.max_failures": at_least(-1),   # Ray Train: -1 retries forever
    }


def _crf_kernel_rules(s: str) -> dict[str, Rule]:
    """The dense-CRF kernel keys of section `s`."""
    return {
        f"{s}.iterations": at_least(0),
        f"{s}.gaussian_sxy": above(0),
        f"{s}.gaussian_compat": at_least(0),
        f"{s}.bilateral_sxy": above(0),
        f"{s}.bilateral_srgb": above(0),
        f"{s}.bilateral_compat": at_least(0),
    }


RULES: dict[str, Rule] = {
    # data
    "data.demo.num_train": at_least(1),
    "data.demo.num_val": at_least(0),
    "data.demo.image_size": at_least(MIN_CROP),
    "data.ignore_values": each(between(0, 255), allow_empty=True),
    "data.max_image_side": at_least(MIN_IMAGE_SIDE),
    "data.tiles": each(at_least(1)),
    "data.tile_size": each(at_least(MIN_CROP)),
    "data.tile_min_fraction": between(0, 1),
    "data.max_megapixels": above(0),
    # model
    "model.backbone": one_of(_backbones),
    "model.output_stride": one_of((8, 16, 32)),
    # regularizers
    "regularizers.puzzle.alpha": at_least(0),
    "regularizers.puzzle.alpha_schedule": between(0, 1),
    "regularizers.oc_cse.weight": at_least(0),
    "regularizers.oc_cse.weight_init": at_least(0),
    "regularizers.pnoc.oc_weight": at_least(0),
    "regularizers.pnoc.mask_threshold": between(0, 1),
    "regularizers.pnoc.oc_lr_scale": above(0),
    "regularizers.mcis.co_weight": at_least(0),
    "regularizers.mcis.contrast_weight": at_least(0),
    "regularizers.mcis.contrast_from_epoch": at_least(1),
    "regularizers.mcis.pair_pool": at_least(0),
    "regularizers.mcis.pair_per_class": at_least(0),
    # classifier
    **_fit_rules("classifier"),
    # cams
    "cams.method": one_of(_methods),
    "cams.scales": each(above(0)),
    "cams.splits": non_empty(),
    "cams.lambda_pos": at_least(0),
    "cams.lambda_neg": at_least(0),
    "cams.lambda_bg": at_least(0),
    "cams.scorecam_batch": at_least(1),
    "cams.max_image_side": at_least(MIN_IMAGE_SIDE),
    "cams.output_stride": one_of((4, 8, 16, 32)),
    "cams.mcis_peers": at_least(0),
    "cams.mcis_bank": at_least(1),
    "cams.batch_size": at_least(1),
    "cams.num_actors": at_least(1),
    "cams.cpus_per_actor": at_least(1),
    "cams.gpus_per_actor": at_least(0),
    "cams.torch_threads": at_least(1),
    "cams.smoothgrad_samples": at_least(1),
    "cams.smoothgrad_noise": at_least(0),
    "cams.ablation_batch": at_least(1),
    "cams.layercam_gamma": above(0),
    "cams.grad_chunk": at_least(1),
    "explain.road_percentiles": each(between(0, 100, high_open=True), allow_empty=True),
    "explain.road_noise": at_least(0),
    "explain.curve_steps": at_least(1),
    "explain.insertion_blur": at_least(0),
    "explain.forward_batch": at_least(1),
    "explain.box_threshold": between(0, 1, high_open=True),
    # seeds
    "seeds.background_threshold": between(0, 1),
    "seeds.background_power": at_least(0),
    # crf
    "crf.iterations": at_least(0),
    "crf.gaussian_sxy": above(0),
    "crf.gaussian_compat": at_least(0),
    "crf.bilateral_sxy": above(0),
    "crf.bilateral_srgb": above(0),
    "crf.bilateral_compat": at_least(0),
    "crf.score_temperature": above(0),
    "crf.batch_size": at_least(1),
    "crf.cpus_per_task": above(0),
    # evaluate
    "evaluate.splits": non_empty(),
    "evaluate.thresholds": each(between(0, 1)),
    "evaluate.batch_size": at_least(1),
    # the iterative loop
    "loop.rounds": at_least(1),
    "loop.alpha": each(at_least(0)),
    "loop.batch_size": at_least(1),
    "loop.num_actors": at_least(1),
    "loop.cpus_per_actor": at_least(1),
    "loop.gpus_per_actor": at_least(0),
    "loop.torch_threads": at_least(1),
    # segmenter
    **_fit_rules("segmenter"),
    "segmenter.backbone": one_of(_backbones),
    "segmenter.output_stride": one_of(_segmenter_strides),
    "segmenter.aspp_channels": at_least(1),
    "segmenter.decoder_channels": at_least(1),
    "segmenter.unsure_band": ordered_pair(between(0, 1)),
    # semi-weak mode
    "semi.labelled_count": at_least(0),
    "semi.draw": one_of(("stratified", "uniform")),
    **_fit_rules("pct"),
    "pct.batch_size": at_least(2),           # half pixel-labelled, half tagged
    "pct.tag_weight": at_least(0),
    "pct.cross_weight": at_least(0),
    "pct.weight_power": at_least(0),
    "pct.iou_momentum": between(0, 1, high_open=True),
    "pct.scales": each(above(0)),
    "pct.max_image_side": at_least(MIN_IMAGE_SIDE),
    "pct.predict_batch_size": at_least(1),
    "pct.num_actors": at_least(1),
    "pct.cpus_per_actor": at_least(1),
    "pct.gpus_per_actor": at_least(0),
    # predict
    "predict.scales": each(above(0)),
    "predict.max_image_side": at_least(MIN_IMAGE_SIDE),
    "predict.batch_size": at_least(1),
    "predict.num_actors": at_least(1),
    "predict.cpus_per_actor": at_least(1),
    "predict.gpus_per_actor": at_least(0),
    "predict.torch_threads": at_least(1),
    # affinity (IRN's labels and boundary network)
    "affinity.fg_threshold": between(0, 1),
    "affinity.bg_threshold": between(0, 1),
    "affinity.label_crf.gt_prob": inside(0, 1),
    **_crf_kernel_rules("affinity.label_crf"),
    "affinity.radius": at_least(2),          # radius 1 has no pair
    "affinity.epochs": at_least(1),
    "affinity.batch_size": at_least(1),
    "affinity.lr": above(0),
    "affinity.momentum": between(0, 1, high_open=True),
    "affinity.weight_decay": at_least(0),
    "affinity.crop_size": at_least(MIN_CROP),
    "affinity.scale_range": ordered_pair(above(0)),
    "affinity.label_batch_size": at_least(1),
    "affinity.num_workers": at_least(0),   # 0: Ray Train's local mode
    "affinity.cpus_per_worker": at_least(1),
    "affinity.torch_threads": at_least(1),
    "affinity.max_failures": at_least(-1),
    "affinity.label_cpus_per_task": above(0),
    "affinity.saliency_threshold": between(0, 1),
    "affinity.saliency_fg_threshold": between(0, 1),
    # C²AM-H (affinity.labels_from: saliency)
    "c2am.hint_weight": at_least(0),
    "c2am.hint_fg_threshold": between(0, 1),
    "c2am.hint_bg_threshold": between(0, 1),
    "c2am.label_smoothing": between(0, 1, high_open=True),
    "c2am.rank_alpha": at_least(0),
    "c2am.memory_size": at_least(0),
    "c2am.epochs": at_least(1),
    "c2am.batch_size": at_least(2),          # the contrastive terms need pairs
    "c2am.lr": above(0),
    "c2am.head_lr_multiplier": above(0),
    "c2am.momentum": between(0, 1, high_open=True),
    "c2am.weight_decay": at_least(0),
    "c2am.crop_size": at_least(MIN_CROP),
    "c2am.scale_range": ordered_pair(above(0)),
    "c2am.num_workers": at_least(0),   # 0: Ray Train's local mode
    "c2am.cpus_per_worker": at_least(1),
    "c2am.torch_threads": at_least(1),
    "c2am.max_failures": at_least(-1),
    "saliency.threshold": between(0, 1, high_open=True),
    "saliency.crf.gt_prob": inside(0, 1),
    **_crf_kernel_rules("saliency.crf"),
    "saliency.splits": non_empty(),
    "saliency.max_image_side": at_least(MIN_IMAGE_SIDE),
    "saliency.batch_size": at_least(1),
    "saliency.num_actors": at_least(1),
    "saliency.cpus_per_actor": at_least(1),
    "saliency.gpus_per_actor": at_least(0),
    "saliency.torch_threads": at_least(1),
    # random walk
    "random_walk.radius": at_least(2),
    "random_walk.beta": above(0),
    "random_walk.steps": at_least(0),
    "random_walk.background_threshold": between(0, 1),
    "random_walk.background_power": at_least(0),
    **_crf_kernel_rules("random_walk.crf"),
    "random_walk.max_image_side": at_least(MIN_IMAGE_SIDE),
    "random_walk.batch_size": at_least(1),
    "random_walk.num_actors": at_least(1),
    "random_walk.cpus_per_actor": at_least(1),
    "random_walk.gpus_per_actor": at_least(0),
    "random_walk.torch_threads": at_least(1),
    # explain
    "explain.methods": each(one_of(_methods)),
    "explain.splits": non_empty(),
    "explain.max_images": at_least(1),
    "explain.scales": each(above(0)),
    "explain.sample_images": at_least(0),
    "explain.batch_size": at_least(1),
    # report
    "report.num_images": at_least(0),
    # ray
    "ray.num_cpus": at_least(1),
    "ray.output_file_mb": at_least(0),
    "ray.local_footer_readers": at_least(1),
}

# Numeric keys that take any value of their type on purpose.
UNCHECKED = {"data.demo.seed", "data.mask_offset", "classifier.seed", "cams.seed",
             "segmenter.seed", "affinity.seed", "semi.seed", "pct.seed",
             "c2am.seed"}


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def validate(config: PipelineConfig) -> None:
    """Raise ConfigError naming the first key whose value is out of range or unknown."""
    for key, rule in RULES.items():
        value = _lookup(config, key)
        if value is None:
            continue
        problem = rule(value)
        if isinstance(problem, tuple):
            index, item, text = problem
            raise ConfigError(f"{key}[{index}]: {item!r} {text}")
        if problem:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{key}: {shown!r} {problem}")
    for check in CROSS_CHECKS:
        problem = check(config)
        if problem:
            raise ConfigError(problem)


def _random_walk_masks(config) -> str | None:
    if config.segmenter.masks == "random_walk" and not config.random_walk.enabled:
        return ("segmenter.masks: 'random_walk' needs random_walk.enabled: true (the "
                "stages affinity_labels, affinity and random_walk make those masks)")
    return None


def _random_walk_train_cams(config) -> str | None:
    split = config.classifier.train_split
    if config.random_walk.enabled and split not in config.cams.splits:
        return (f"random_walk.enabled: the affinity labels come from the CAMs of the train "
                f"split {split!r}, which cams.splits {list(config.cams.splits)} leaves out")
    return None


def _self_training_needs_crf(config: PipelineConfig) -> "str | None":
    loop = config.loop
    if loop.rounds > 1 and loop.feedback == "labels" and not config.predict.crf:
        return ("loop.feedback: labels fits each round's segmentation model on the "
                "previous round's CRF-refined predictions: set predict.crf: true")
    return None


def _self_training_needs_train_predictions(config: PipelineConfig) -> "str | None":
    loop, split = config.loop, config.segmenter.train_split
    if loop.rounds > 1 and loop.feedback == "labels" and split not in config.predict.splits:
        return (f"loop.feedback: labels fits each round's segmentation model on the previous "
                f"round's predictions of its train split {split!r}, which predict.splits "
                f"{list(config.predict.splits)} leaves out")
    return None


def _fallback_needs_self_training(config: PipelineConfig) -> "str | None":
    loop = config.loop
    if loop.fallback == "none":
        return None
    if loop.feedback != "labels":
        return (f"loop.fallback: {loop.fallback} puts round 1's masks back into the targets "
                f"of self-training: set loop.feedback: labels")
    if config.segmenter.mode == "pct":
        return ("loop.fallback puts back round 1's masks made from the CAMs; "
                "segmenter.mode: pct learns the hybrid net's masks instead")
    return None


def _loop_prior_needs_train_cams(config: PipelineConfig) -> "str | None":
    loop = config.loop
    if loop.rounds > 1 and loop.feedback == "prior" and \
            config.classifier.train_split not in config.cams.splits:
        return (f"loop.rounds > 1: the prior is made for the images of cams.splits, which "
                f"must hold the classifier's train split {config.classifier.train_split!r}")
    return None


def _one_labelled_source(config: PipelineConfig) -> "str | None":
    semi = config.semi
    if semi.labelled_file and semi.labelled_count > 0:
        return ("semi.labelled_file and semi.labelled_count both name the pixel-labelled "
                "images: set one of them")
    return None


def _pct_needs_labelled_images(config: PipelineConfig) -> "str | None":
    semi = config.semi
    if config.segmenter.mode == "pct" and not semi.labelled_file and \
            semi.labelled_count <= 0:
        return ("segmenter.mode: 'pct' needs pixel-labelled images: set "
                "semi.labelled_count or semi.labelled_file")
    return None


def _saliency_labels(config: PipelineConfig) -> "str | None":
    """affinity.labels_from: saliency needs the random-walk stages and the saliency of
    the train split; the C²AM hints' thresholds in order."""
    c2am = config.c2am
    if c2am.hint_bg_threshold is not None and c2am.hint_bg_threshold > c2am.hint_fg_threshold:
        return (f"c2am.hint_bg_threshold {c2am.hint_bg_threshold} is above "
                f"c2am.hint_fg_threshold {c2am.hint_fg_threshold}")
    if config.affinity.labels_from != "saliency":
        return None
    if not config.random_walk.enabled:
        return ("affinity.labels_from: 'saliency' needs random_walk.enabled: true (the "
                "affinity labels are made for IRN's random walk)")
    split = config.classifier.train_split
    if split not in config.saliency.splits:
        return (f"affinity.labels_from: 'saliency' reads the saliency of the train split "
                f"{split!r}, which saliency.splits {list(config.saliency.splits)} leaves out")
    return None


# Rules over several keys: each returns what is wrong (naming the keys), or None.
CROSS_CHECKS: tuple[Callable[[PipelineConfig], "str | None"], ...] = (
    _random_walk_masks, _random_walk_train_cams, _self_training_needs_crf,
    _fallback_needs_self_training,
    _self_training_needs_train_predictions, _loop_prior_needs_train_cams,
    _one_labelled_source, _pct_needs_labelled_images, _saliency_labels)


def numeric_keys(cls: type = PipelineConfig, prefix: str = "") -> list[str]:
    """Every dotted key of `cls` whose type holds numbers (int, float, or lists,
    tuples and optionals of them): what `RULES` or `UNCHECKED` must cover."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += numeric_keys(tp, f"{key}.")
        elif _holds_numbers(tp):
            out.append(key)
    return out


def _holds_numbers(tp: Any) -> bool:
    if tp in (int, float):
        return True
    return any(_holds_numbers(a) for a in typing.get_args(tp) if a is not Ellipsis)

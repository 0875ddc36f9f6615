"""The stage graph, as data: every stage of the pipeline defined once.

```
dataset ─► classifier ─► cams ─► crf ─► evaluate            (pseudo masks scored)
                                   └──► segmenter ─► predict  (DeepLabV3+ fitted, applied, scored)
                          cams ─► affinity_labels ─► affinity ─► random_walk   (IRN; when
                                                  report     (after the last step)  enabled)
          classifier, cams ─► c2am ─► saliency ─► affinity_labels  (C²AM-H: when
                                     affinity.labels_from is saliency)
       dataset, classifier ─► pct ─► segmenter   (semi-weak mode: when segmenter.mode is
                                                  pct, in place of crf's masks)
```

A stage may be off for a config (`enabled`: the random-walk stages unless
`random_walk.enabled`): it then has no step to run, and no step counts it as an input,
so switching it off leaves every other step's hash as it was. An input may also be read
only under a condition (`optional`: the segmenter reads the random-walk masks only when
`segmenter.masks` is `random_walk`).

A stage is one entry of `STAGES`: its name, the config sections that decide its result,
its logical inputs, its entry function (imported here, so a reader and a tool can follow
the call), the folder it writes, and the fingerprints of files it reads from outside the
run. The manifest's hashes, the pipeline's order, the CLI's `stage` choices, the sweeps'
prerequisites and the resource fields left out of hashes all derive from this table:
adding a stage is one entry here and one module.

A **step** is a stage in a round (`Step("cams", 1)`). Round 1 keeps the layout of the
first release (`<run>/cams/`, manifest key `cams`) so older run directories resume;
round t > 1 writes under `<run>/rounds/<t>/` with manifest keys `cams@t`. Stages with
`per_round=False` (the dataset, the report) exist once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from . import evaluate as _evaluate
from . import predict as _predict
from . import report as _report
from . import storage
from .cams import stage as _cams
from .data import stage as _dataset
from .refine import affinity_stage as _affinity_labels
from .refine import saliency as _saliency
from .refine import stage as _crf
from .refine import walk_stage as _random_walk
from .train import affinity as _affinity
from .train import c2am as _c2am
from .train import classifier as _classifier
from .train import pct as _pct
from .train import prior as _prior
from .train import segmenter as _segmenter


def _no_external(config, cache: dict) -> list[str]:
    return []


def _dataset_external(config, cache: dict) -> list[str]:
    """A dataset used in place (data.source: parquet), by the id its import wrote: a
    re-import into the same folder makes every step stale."""
    from .data.dataset import CLASSES_FILE

    if config.data.source != "parquet" or not config.data.path:
        return []
    where = storage.join(storage.resolve(config.data.path), CLASSES_FILE)
    if where not in cache:
        try:
            cache[where] = storage.read_json(where).get("dataset_id") \
                if storage.exists(where) else None
        except (OSError, ValueError, AttributeError):
            cache[where] = None  # reading the dataset reports what is wrong with it
    return ["dataset_id:" + cache[where]] if cache[where] else []


def _always(config) -> bool:
    return True


def _random_walk_on(config) -> bool:
    return config.random_walk.enabled


def _saliency_on(config) -> bool:
    """C²AM-H: the affinity labels come from saliency (needs the random-walk stages)."""
    return config.random_walk.enabled and config.affinity.labels_from == "saliency"


def _c2am_hints(config) -> bool:
    return config.c2am.hint_weight > 0


def _c2am_from_classifier(config) -> bool:
    return _c2am.init_source(config) == "classifier"


def _walk_masks(config) -> bool:
    return config.segmenter.masks == "random_walk"


def _pct_on(config) -> bool:
    """Semi-weak mode with progressive cross training (segmenter.mode: pct)."""
    return config.segmenter.mode == "pct"


def _masks_from_cams(config) -> bool:
    """The segmenter learns masks made from the CAMs (not the pct step's)."""
    return config.segmenter.mode != "pct"


def _pct_from_classifier(config) -> bool:
    return _segmenter.init_source(config) == "classifier"


def _fallback_on(config) -> bool:
    """Self-training whose targets take round 1's masks where the model lost its tags."""
    return config.loop.feedback == "labels" and config.loop.fallback != "none" and \
        _masks_from_cams(config)


def _labelled_images(config) -> bool:
    from .data.labelled import has_labelled
    return has_labelled(config)


def _labelled_file(config, cache: dict) -> list[str]:
    from .data.labelled import labelled_file_fingerprint
    return labelled_file_fingerprint(config, cache)


# The segmenter's fields that decide the architecture and start of the pct step's nets;
# its other fields are the final fit's
SEGMENTER_NET_FIELDS = frozenset({"backbone", "pretrained", "output_stride", "init",
                                  "aspp_channels", "decoder_channels", "train_split",
                                  "val_split"})


def _segmenter_fit_fields() -> frozenset:
    import dataclasses

    from .config import SegmenterConfig
    return frozenset(f.name for f in dataclasses.fields(SegmenterConfig)) - \
        SEGMENTER_NET_FIELDS


# The fields of `affinity` that decide the affinity labels; the others are the fit's
# (changing the epochs must not recompute the labels' CRFs).
AFFINITY_LABEL_FIELDS = frozenset({"fg_threshold", "bg_threshold", "label_crf",
                                   "labels_from", "saliency_threshold",
                                   "saliency_fg_threshold"})
AFFINITY_RESOURCES = frozenset({"num_workers", "use_gpu", "cpus_per_worker", "torch_threads",
                                "max_failures", "label_batch_size", "label_cpus_per_task"})


def _affinity_fit_fields() -> frozenset:
    import dataclasses

    from .config import AffinityConfig
    return frozenset(f.name for f in dataclasses.fields(AffinityConfig)) - \
        AFFINITY_LABEL_FIELDS


def _loop_fields_but_fallback() -> frozenset:
    import dataclasses

    from .config import LoopConfig
    return frozenset(f.name for f in dataclasses.fields(LoopConfig)) - {"fallback"}


def _classifier_external(config, cache: dict) -> list[str]:
    """The ordinary classifier of OC-CSE / P-NOC, by the content of its weights."""
    reg = config.regularizers
    if reg.oc_cse.weight <= 0 or not reg.oc_cse.oc_model:
        return []
    weights = storage.join(storage.resolve(reg.oc_cse.oc_model), "model.pt")
    if weights not in cache:
        cache[weights] = (hashlib.sha256(storage.read_bytes(weights)).hexdigest()[:16]
                          if storage.exists(weights) else "missing")
    return ["oc_model:" + cache[weights]]


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]           # config sections that decide its result
    inputs: tuple[str, ...]             # stages whose outputs it reads (same round)
    entry: Callable                     # entry(config, step_context) -> summary dict
    output: str | None                  # folder it writes in its round's directory
    description: str
    # fields of its sections that say how much hardware it gets, not what it computes:
    # left out of the hash, so a run resumed on a bigger cluster recomputes nothing
    resources: dict[str, frozenset] = field(default_factory=dict)
    external: Callable = _no_external   # fingerprints of what it reads from outside
    per_round: bool = True
    # Inputs in rounds 2..T of the iterative loop, per `loop.feedback`: a tuple of tokens
    # (`crf`: this round's, `segmenter@prev`: the round before's, `classifier@1`: round
    # 1's), or None where the stage does not run in later rounds; a feedback missing here
    # means the same inputs as in round 1, of the same round. `labels+fallback`, where
    # given, replaces `labels` under a `loop.fallback` other than none.
    later: dict = field(default_factory=dict)
    # sections hashed in rounds 2..T only, when their predicate holds for the config (the
    # segmenter's targets under loop.fallback): round 1's hash stays as it was
    later_sections: dict[str, Callable] = field(default_factory=dict)
    first_round: int = 1                # the prior exists from round 2 on
    # whether the stage runs at all for a config (off: no step, nobody's input)
    enabled: Callable = _always
    # inputs read only when their predicate holds for the config (else not hashed, not
    # waited for)
    optional: dict[str, Callable] = field(default_factory=dict)
    # fields of its sections that decide another stage's result, not this one's: left
    # out of its hash like resources
    unhashed: dict[str, frozenset] = field(default_factory=dict)
    # sections hashed only when their predicate holds for the config (`semi` in the
    # segmenter's hash only when it names pixel-labelled images): a section added to a
    # stage later leaves older runs' hashes as they were while it is not used
    optional_sections: dict[str, Callable] = field(default_factory=dict)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("dataset", ("data",), (), _dataset.run, "dataset",
          "import the data (or generate the demo set) into Parquet",
          external=_dataset_external, per_round=False),
    # M_t for round t >= 2 (iterative loop): the previous round's segmentation model's
    # class masks weighted by its classifier's probabilities, an extra input channel
    Stage("prior", ("loop",), ("segmenter@prev", "cams@prev"), _prior.run, "prior",
          "the class-mask prior M_t of the next round (Ray Data actors)",
          # `rounds` decides how many steps there are, not what any step computes
          resources={"loop": frozenset({"rounds", "batch_size", "num_actors",
                                        "cpus_per_actor", "gpus_per_actor",
                                        "torch_threads"})},
          unhashed={"loop": frozenset({"fallback"})},  # the segmenter's, under labels
          later={"labels": None}, first_round=2),
    Stage("classifier", ("model", "head", "regularizers", "classifier"), ("dataset",),
          _classifier.run, "classifier",
          "fit the multi-label classifier (Ray Train, DDP)",
          later={"prior": ("dataset", "prior"), "labels": None},
          resources={"classifier": frozenset({"num_workers", "use_gpu", "cpus_per_worker",
                                              "torch_threads", "max_failures",
                                              "cache_images"})},
          external=_classifier_external),
    Stage("cams", ("cams",), ("classifier",), _cams.run, "cams",
          "class activation maps of every image (Ray Data actors)",
          later={"prior": ("classifier", "prior"), "labels": None},
          resources={"cams": frozenset({"batch_size", "num_actors", "cpus_per_actor",
                                        "gpus_per_actor", "torch_threads",
                                        "scorecam_batch", "grad_chunk",
                                        "ablation_batch"})}),
    Stage("crf", ("seeds", "crf"), ("cams",), _crf.run, "crf",
          "seeds and dense-CRF pseudo masks (Ray Data tasks)", later={"labels": None},
          resources={"crf": frozenset({"batch_size", "cpus_per_task"})}),
    Stage("evaluate", ("seeds", "evaluate"), ("cams", "crf"), _evaluate.run, None,
          "score CAM seeds and pseudo masks against ground truth", later={"labels": None},
          resources={"evaluate": frozenset({"batch_size"})}),
    # C²AM-H (affinity.labels_from: saliency): a class-agnostic map fitted with CAM
    # hints, its saliency replacing the low CAM threshold of the affinity labels
    Stage("c2am", ("model", "c2am"), ("dataset", "classifier", "cams"), _c2am.run, "c2am",
          "fit C²AM with CAM hints, the class-agnostic foreground map (Ray Train, DDP)",
          later={"labels": None}, enabled=_saliency_on,
          optional={"cams": _c2am_hints, "classifier": _c2am_from_classifier},
          resources={"c2am": frozenset({"num_workers", "use_gpu", "cpus_per_worker",
                                        "torch_threads", "max_failures"})}),
    Stage("saliency", ("saliency",), ("c2am",), _saliency.run, "saliency",
          "C²AM saliency maps and CRF masks, scored (Ray Data actors)",
          later={"labels": None}, enabled=_saliency_on,
          resources={"saliency": frozenset({"batch_size", "num_actors", "cpus_per_actor",
                                            "gpus_per_actor", "torch_threads"})}),
    # IRN (random_walk.enabled): affinity labels, boundary network, random-walk masks
    Stage("affinity_labels", ("affinity",), ("cams", "saliency"), _affinity_labels.run,
          "affinity_labels", "IRN's affinity labels from the train split's CAMs (Ray Data "
          "tasks)", later={"labels": None}, enabled=_random_walk_on,
          optional={"saliency": _saliency_on},
          resources={"affinity": AFFINITY_RESOURCES},
          unhashed={"affinity": _affinity_fit_fields()}),
    Stage("affinity", ("affinity",), ("classifier", "affinity_labels"), _affinity.run,
          "affinity", "fit IRN's boundary network on the frozen backbone (Ray Train, DDP)",
          later={"labels": None}, enabled=_random_walk_on,
          resources={"affinity": AFFINITY_RESOURCES}),
    Stage("random_walk", ("random_walk",), ("cams", "affinity"), _random_walk.run,
          "random_walk", "random-walk pseudo masks, scored (Ray Data actors)",
          later={"labels": None}, enabled=_random_walk_on,
          resources={"random_walk": frozenset({"batch_size", "num_actors", "cpus_per_actor",
                                               "gpus_per_actor", "torch_threads"})}),
    # self-training (loop.feedback: labels): round t's model learns from round t-1's
    # CRF-refined predictions, its backbone starting where round 1's did
    # semi-weak mode (segmenter.mode: pct): hybrid + pseudo net on the pixel-labelled and
    # the tagged train images; the hybrid net's label-restricted masks of the train split
    Stage("pct", ("semi", "pct", "segmenter"), ("dataset", "classifier"), _pct.run, "pct",
          "progressive cross training of the hybrid and pseudo nets (semi-weak mode; Ray "
          "Train, DDP), the hybrid net's masks of the train split (Ray Data actors)",
          later={"labels": None}, enabled=_pct_on,
          optional={"classifier": _pct_from_classifier},
          resources={"pct": frozenset({"num_workers", "use_gpu", "cpus_per_worker",
                                       "torch_threads", "max_failures",
                                       "predict_batch_size", "num_actors", "cpus_per_actor",
                                       "gpus_per_actor"})},
          unhashed={"segmenter": _segmenter_fit_fields()}, external=_labelled_file),
    Stage("segmenter", ("segmenter", "semi"), ("classifier", "cams", "crf", "random_walk",
                                               "pct"),
          _segmenter.run, "segmenter", "fit DeepLabV3+ on the pseudo masks (Ray Train, DDP)",
          later={"labels": ("classifier@1", "predict@prev"),
                 # round 1's masks, where the model lost an image's tags
                 "labels+fallback": ("classifier@1", "predict@prev", "crf@1",
                                     "random_walk@1")},
          later_sections={"loop": _fallback_on},
          # of the loop section, the segmenter's later rounds hash the fallback only
          unhashed={"loop": _loop_fields_but_fallback()},
          optional={"random_walk": _walk_masks, "pct": _pct_on, "cams": _masks_from_cams,
                    "crf": _masks_from_cams},
          optional_sections={"semi": _labelled_images}, external=_labelled_file,
          resources={"segmenter": frozenset({"num_workers", "use_gpu", "cpus_per_worker",
                                             "torch_threads", "max_failures",
                                             "cache_images"})}),
    Stage("predict", ("predict",), ("segmenter",), _predict.run, "predictions",
          "apply the segmentation model to every image and score it (Ray Data actors)",
          resources={"predict": frozenset({"batch_size", "num_actors", "cpus_per_actor",
                                           "gpus_per_actor", "torch_threads"})}),
    Stage("report", ("report",), ("cams@last", "crf@last", "evaluate@last", "predict@last",
                                  "random_walk@last", "saliency@last"),
          _report.run, "report", "the HTML report", per_round=False),
)}
STAGE_NAMES = tuple(STAGES)

def resource_fields() -> dict[str, frozenset]:
    """Per config section, the fields that are resources in some stage."""
    out: dict[str, set] = {}
    for s in STAGES.values():
        for section, names in s.resources.items():
            out.setdefault(section, set()).update(names)
    return {k: frozenset(v) for k, v in out.items()}


def get(name: str) -> Stage:
    from .errors import StageError

    if name not in STAGES:
        raise StageError(f"unknown stage {name!r} (stages: {', '.join(STAGE_NAMES)})")
    return STAGES[name]


@dataclass(frozen=True, order=True)
class Step:
    """A stage in a round. Its inputs depend on the loop's settings: `inputs(loop)`."""
    stage: str
    round: int = 1

    @property
    def key(self) -> str:
        """Its key in the manifest and metrics.json: `cams`, `cams@2`."""
        return self.stage if self.round == 1 else f"{self.stage}@{self.round}"

    @classmethod
    def parse(cls, key: str) -> "Step":
        name, _, rnd = key.partition("@")
        return cls(name, int(rnd) if rnd else 1)

    def inputs(self, loop=None) -> list["Step"]:
        """The steps this step reads, for the loop settings `loop` (rounds, feedback;
        None: a single round)."""
        return [self._resolve(tok, loop) for tok in _tokens(self, loop)]

    def _resolve(self, token: str, loop) -> "Step":
        name, _, which = token.partition("@")
        if name in STAGES and not STAGES[name].per_round:
            return Step(name, 1)
        if which == "prev":
            return Step(name, self.round - 1)
        if which == "last":
            return Step(name, last_round(name, loop))
        if which:
            return Step(name, int(which))
        return Step(name, self.round)

    def input(self, name: str, loop=None) -> "Step":
        """The step of stage `name` that this step reads."""
        for step in self.inputs(loop):
            if step.stage == name:
                return step
        from .errors import StageError
        raise StageError(f"stage {self.key} does not declare input {name!r}")


def active_inputs(step: Step, config) -> list[Step]:
    """The steps `step` reads for `config`: its inputs (`Step.inputs`) less those of
    stages that are off and optional ones whose condition does not hold. These are what
    its hash and freshness depend on and what it waits for."""
    optional = STAGES[step.stage].optional
    return [u for u in step.inputs(config.loop) if STAGES[u.stage].enabled(config)
            and optional.get(u.stage, _always)(config)]


def _later(stage: Stage, loop) -> "tuple[str, ...] | None":
    """`stage`'s input tokens in rounds 2..T under the loop settings `loop` (None: it
    does not run there)."""
    feedback = getattr(loop, "feedback", "prior")
    if feedback == "labels" and getattr(loop, "fallback", "none") != "none" and \
            "labels+fallback" in stage.later:
        return stage.later["labels+fallback"]
    return stage.later.get(feedback, stage.inputs)


def _tokens(step: Step, loop) -> tuple[str, ...]:
    stage = STAGES[step.stage]
    if step.round == 1 or not stage.per_round:
        return stage.inputs
    return _later(stage, loop) or ()


def runs_in(stage: Stage, round: int, loop) -> bool:
    """Whether `stage` has a step in `round` under the loop settings `loop`."""
    if not stage.per_round:
        return round == 1
    if round < stage.first_round:
        return False
    if round == 1:
        return True
    return _later(stage, loop) is not None


def last_round(name: str, loop) -> int:
    """The last round in which stage `name` has a step."""
    rounds = getattr(loop, "rounds", 1)
    return max(t for t in range(1, rounds + 1) if runs_in(STAGES[name], t, loop))


def steps(loop=None) -> list[Step]:
    """Every step of a run, in the order they run: the dataset, round 1's steps, round
    2's, ... round T's (`loop.rounds`), the report."""
    rounds = getattr(loop, "rounds", 1) if not isinstance(loop, int) else loop
    if isinstance(loop, int):
        from .config import LoopConfig
        loop = LoopConfig(rounds=loop)
    once_first = [Step(s.name) for s in STAGES.values() if not s.per_round
                  and not s.inputs]
    each = [Step(s.name, t) for t in range(1, rounds + 1) for s in STAGES.values()
            if s.per_round and runs_in(s, t, loop)]
    once_last = [Step(s.name) for s in STAGES.values() if not s.per_round and s.inputs]
    return once_first + each + once_last

"""The stage graph, as data: every stage of the pipeline defined once.

```
dataset ─► classifier ─► cams ─► crf ─► evaluate            (pseudo masks scored)
                                   └──► segmenter ─► predict  (DeepLabV3+ fitted, applied, scored)
                                                  report     (after the last step)
```

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
from .refine import stage as _crf
from .train import classifier as _classifier
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


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("dataset", ("data",), (), _dataset.run, "dataset",
          "import the data (or generate the demo set) into Parquet",
          external=_dataset_external, per_round=False),
    Stage("classifier", ("model", "head", "regularizers", "classifier"), ("dataset",),
          _classifier.run, "classifier",
          "fit the multi-label classifier (Ray Train, DDP)",
          resources={"classifier": frozenset({"num_workers", "use_gpu", "cpus_per_worker",
                                              "torch_threads", "max_failures",
                                              "cache_images"})},
          external=_classifier_external),
    Stage("cams", ("cams",), ("classifier",), _cams.run, "cams",
          "class activation maps of every image (Ray Data actors)",
          resources={"cams": frozenset({"batch_size", "num_actors", "cpus_per_actor",
                                        "gpus_per_actor", "torch_threads",
                                        "scorecam_batch"})}),
    Stage("crf", ("seeds", "crf"), ("cams",), _crf.run, "crf",
          "seeds and dense-CRF pseudo masks (Ray Data tasks)",
          resources={"crf": frozenset({"batch_size", "cpus_per_task"})}),
    Stage("evaluate", ("seeds", "evaluate"), ("cams", "crf"), _evaluate.run, None,
          "score CAM seeds and pseudo masks against ground truth",
          resources={"evaluate": frozenset({"batch_size"})}),
    Stage("segmenter", ("segmenter",), ("classifier", "cams", "crf"), _segmenter.run, "segmenter",
          "fit DeepLabV3+ on the pseudo masks (Ray Train, DDP)",
          resources={"segmenter": frozenset({"num_workers", "use_gpu", "cpus_per_worker",
                                             "torch_threads", "max_failures",
                                             "cache_images"})}),
    Stage("predict", ("predict",), ("segmenter",), _predict.run, "predictions",
          "apply the segmentation model to every image and score it (Ray Data actors)",
          resources={"predict": frozenset({"batch_size", "num_actors", "cpus_per_actor",
                                           "gpus_per_actor", "torch_threads"})}),
    Stage("report", ("report",), ("cams", "crf", "evaluate", "predict"), _report.run, "report",
          "the HTML report", per_round=False),
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
    """A stage in a round."""
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

    def input(self, name: str) -> "Step":
        """The step of stage `name` that this step reads."""
        return Step(name, self.round if STAGES[name].per_round else 1)


def steps(rounds: int = 1) -> list[Step]:
    """Every step of a run, in the order they run."""
    once_first = [Step(s.name) for s in STAGES.values() if not s.per_round
                  and not s.inputs]
    each = [Step(s.name, t) for t in range(1, rounds + 1) for s in STAGES.values()
            if s.per_round]
    once_last = [Step(s.name) for s in STAGES.values() if not s.per_round and s.inputs]
    return once_first + each + once_last

"""A run directory: where every step reads its inputs and writes its outputs.

```
<run>/manifest.json   config, versions, and per step: status, config hash, run id,
                      the run ids of the inputs it was computed from
<run>/dataset/  classifier/  cams/  crf/  segmenter/  predictions/  report/   round 1
<run>/rounds/<t>/classifier/  ...                                               round t
<run>/metrics.json    every evaluation, by step key (`evaluate`, `predict@2`)
```

A step (a stage in a round, `graph.Step`) is up to date when the manifest records it
done with the current config hash *and* with the run ids its input steps have now; so
re-running an upstream step (`--force`) makes everything downstream stale without any
bookkeeping of its own. Stage bodies receive a `StepContext`, which resolves their
inputs' folders for their round and owns their output: no stage names another stage's
folder.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import uuid
from typing import Iterator

from . import storage
from .config import PipelineConfig, section_hash, to_dict
from .data.dataset import DatasetInfo, read_info
from .errors import StageError


def versions() -> dict:
    import numpy
    import pyarrow
    import ray
    import torch

    from . import __version__
    return {"ray_wsss": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "pyarrow": pyarrow.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


class Run:
    def __init__(self, config: PipelineConfig, run_dir: str | None = None):
        self.config = config
        self.root = storage.resolve(run_dir or config.run_dir)
        self.manifest_path = storage.join(self.root, "manifest.json")
        self._fingerprints: dict[str, str | None] = {}
        self._hashes: dict[str, str] = {}

    # ------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def dataset_path(self) -> str:
        if self.config.data.source == "parquet":
            if not self.config.data.path:
                raise StageError("data.path must name the dataset folder when "
                                 "data.source is parquet")
            return storage.resolve(self.config.data.path)
        return self.path("dataset")

    def dataset_info(self) -> DatasetInfo:
        return read_info(self.dataset_path)

    # ------------------------------------------------------------ steps
    @staticmethod
    def _step(step) -> "Step":  # noqa: F821
        from .graph import Step
        return step if isinstance(step, Step) else Step.parse(step)

    def step_path(self, step, *parts: str) -> str:
        """The output folder of `step` (round 1: `<run>/<folder>`, round t:
        `<run>/rounds/<t>/<folder>`), or a path inside it."""
        from .graph import STAGES

        step = self._step(step)
        if step.stage == "dataset":
            return storage.join(self.dataset_path, *parts)
        folder = STAGES[step.stage].output or step.stage
        if step.round == 1:
            return self.path(folder, *parts)
        return self.path("rounds", str(step.round), folder, *parts)

    def current_hash(self, step) -> str:
        """Hash of what decides `step`'s result: its stage's config sections and, through
        the input steps' hashes, everything before it (and files it reads from outside
        the run, by content or id)."""
        from .graph import STAGES, active_inputs, resource_fields

        step = self._step(step)
        key = step.key
        if key not in self._hashes:
            stage = STAGES[step.stage]
            upstream = [self.current_hash(u) for u in active_inputs(step, self.config)]
            skip = resource_fields()
            for section, names in stage.unhashed.items():
                skip[section] = skip.get(section, frozenset()) | names
            sections = [s for s in stage.sections
                        if s not in stage.optional_sections
                        or stage.optional_sections[s](self.config)]
            if step.round > 1:
                sections += [s for s, when in stage.later_sections.items()
                             if when(self.config)]
            self._hashes[key] = section_hash(
                self.config, sections,
                upstream + stage.external(self.config, self._fingerprints), skip)
        return self._hashes[key]

    # ------------------------------------------------------------ manifest
    def manifest(self) -> dict:
        if not storage.exists(self.manifest_path):
            return {"stages": {}}
        return storage.read_json(self.manifest_path)

    def stage_entry(self, step) -> dict | None:
        return self.manifest().get("stages", {}).get(self._step(step).key)

    def is_current(self, step) -> bool:
        """The manifest entry (done or interrupted) has the current config hash and was
        made from the current outputs of its input steps, so its partial outputs can be
        resumed."""
        from .graph import active_inputs

        step = self._step(step)
        stages = self.manifest().get("stages", {})
        entry = stages.get(step.key)
        if not entry or entry.get("hash") != self.current_hash(step):
            return False
        inputs = [u.key for u in active_inputs(step, self.config)]
        return all(stages.get(u, {}).get("run_id") == entry.get("inputs", {}).get(u)
                   for u in inputs)

    def is_done(self, step) -> bool:
        entry = self.stage_entry(step)
        return bool(entry) and entry.get("status") == "done" and self.is_current(step)

    def mark(self, step, status: str, **extra) -> dict:
        from .graph import active_inputs

        step = self._step(step)
        manifest = self.manifest()
        stages = manifest.setdefault("stages", {})
        entry = {"status": status, "hash": self.current_hash(step),
                 "run_id": uuid.uuid4().hex[:12] if status == "done" else None,
                 "inputs": {u.key: stages.get(u.key, {}).get("run_id")
                            for u in active_inputs(step, self.config)},
                 "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        entry.update(extra)
        stages[step.key] = entry
        manifest["config"] = to_dict(self.config)
        manifest["versions"] = versions()
        storage.write_json_atomic(self.manifest_path, manifest)
        return entry

    # ------------------------------------------------------------ outputs
    @contextlib.contextmanager
    def output(self, step) -> Iterator[str]:
        """Directory for `step` to write its output into; published when the block ends.

        Locally it is a temporary sibling renamed into place. On object stores (no
        atomic rename of folders) the final folder is cleared and written directly; the
        manifest, updated only after this block, is what marks it complete.
        """
        from .graph import STAGES

        if isinstance(step, str) and self._step(step).stage not in STAGES:
            final = self.path(step)  # an output outside the graph (explain/)
        else:
            final = self.step_path(step)
        parent, name = storage.split(final)
        storage.clean_temps(parent, name)  # leftovers of interrupted writes beside it
        if storage.is_uri(final):
            storage.remove(final)
            yield final
            return
        tmp = storage.temp_sibling(final)
        storage.makedirs(tmp)
        try:
            yield tmp
        except BaseException:
            storage.remove(tmp)
            raise
        storage.publish(tmp, final)

    def attempt(self, step) -> str:
        """Id of the current computation of a step: kept when an interrupted step is
        resumed, new when it is recomputed (`--force`, other config or inputs)."""
        return (self.stage_entry(step) or {}).get("attempt") or "0"

    def read_metrics(self) -> dict:
        p = self.path("metrics.json")
        return storage.read_json(p) if storage.exists(p) else {}

    def write_metrics(self, section: str, values: dict) -> None:
        metrics = self.read_metrics()
        metrics[section] = values
        storage.write_json_atomic(self.path("metrics.json"), metrics)


class StepContext:
    """What a stage's entry function gets: its config, its round, its inputs' folders
    for that round, and its own output. `ctx.input("cams")` is the CAM folder of the
    same round; `ctx.output()` a folder published atomically when the block ends."""

    def __init__(self, run: Run, step):
        self.run = run
        self.step = run._step(step)
        self.config = run.config

    @property
    def round(self) -> int:
        return self.step.round

    @property
    def key(self) -> str:
        return self.step.key

    def input(self, name: str) -> str:
        """The output folder of input stage `name` for this step (its round's, or the
        round the graph says: the prior of round t reads round t-1's segmenter)."""
        if name == "dataset":
            return self.run.dataset_path
        # a stage reads only what the graph says it reads: the hash depends on it
        return self.run.step_path(self.step.input(name, self.config.loop))

    def input_key(self, name: str) -> str:
        return self.step.input(name, self.config.loop).key

    def has_input(self, name: str) -> bool:
        from .graph import active_inputs

        return any(s.stage == name for s in active_inputs(self.step, self.config))

    @property
    def path(self) -> str:
        """This step's final output folder."""
        return self.run.step_path(self.step)

    def output(self):
        return self.run.output(self.step)

    @property
    def hash(self) -> str:
        return self.run.current_hash(self.step)

    @property
    def attempt(self) -> str:
        return self.run.attempt(self.step)

    @property
    def dataset_path(self) -> str:
        return self.run.dataset_path

    def dataset_info(self) -> DatasetInfo:
        return self.run.dataset_info()

    def write_metrics(self, values: dict) -> None:
        self.run.write_metrics(self.key, values)

    def metrics(self, name: str | None = None) -> dict:
        """metrics.json's entry of this step, or of input stage `name` of its round."""
        key = self.key if name is None else self.input_key(name)
        return self.run.read_metrics().get(key, {})

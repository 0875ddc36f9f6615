"""A run directory: where every stage reads its inputs and writes its outputs.

```
<run>/manifest.json   config, versions, and per stage: status, config hash, run id,
                      the run ids of the inputs it was computed from
<run>/dataset/  classifier/  cams/  crf/  metrics.json  report/
```

A stage is up to date when the manifest records it done with the current config hash
*and* with the run ids its upstream stages have now; so re-running an upstream stage
(`--force`) makes everything downstream stale without any bookkeeping of its own.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import platform
import uuid
from typing import Iterator

from . import storage
from .config import PipelineConfig, section_hash, to_dict
from .data.dataset import CLASSES_FILE, DatasetInfo, read_info
from .errors import StageError


# name: (config sections that decide its result, upstream stages, outputs in the run dir)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "dataset": (("data",), (), ("dataset",)),
    "classifier": (("model", "head", "regularizers", "classifier"), ("dataset",),
                   ("classifier",)),
    "cams": (("cams",), ("classifier",), ("cams",)),
    "crf": (("seeds", "crf"), ("cams",), ("crf",)),
    "evaluate": (("seeds", "evaluate"), ("cams", "crf"), ()),
    "report": (("report",), ("evaluate",), ("report",)),
}


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

    def current_hash(self, name: str) -> str:
        """Hash of what decides stage `name`'s result: its config sections and, through
        the upstream hashes, everything before it."""
        sections, upstream, _ = STAGES[name]
        return section_hash(self.config, sections,
                            [self.current_hash(u) for u in upstream] + self._external(name))

    def _external(self, name: str) -> list[str]:
        """Fingerprints of what stage `name` reads from outside the run, so that replacing
        it in place makes the stage (and everything after it) stale: a dataset folder
        (data.source: parquet) by the id its import wrote, the ordinary classifier of
        OC-CSE / P-NOC by content. Where there is none, the hash is the plain config's."""
        if name == "dataset" and self.config.data.source == "parquet" and self.config.data.path:
            where = storage.join(storage.resolve(self.config.data.path), CLASSES_FILE)
            if where not in self._fingerprints:
                try:
                    found = storage.read_json(where).get("dataset_id") \
                        if storage.exists(where) else None
                except (OSError, ValueError, AttributeError):
                    found = None  # reading the dataset reports what is wrong with it
                self._fingerprints[where] = found
            return ["dataset_id:" + self._fingerprints[where]] \
                if self._fingerprints[where] else []
        reg = self.config.regularizers
        if name != "classifier" or reg.oc_cse.weight <= 0 or not reg.oc_cse.oc_model:
            return []
        weights = storage.join(storage.resolve(reg.oc_cse.oc_model), "model.pt")
        cache = self._fingerprints
        if weights not in cache:
            cache[weights] = (hashlib.sha256(storage.read_bytes(weights)).hexdigest()[:16]
                              if storage.exists(weights) else "missing")
        return ["oc_model:" + cache[weights]]

    # ------------------------------------------------------------ manifest
    def manifest(self) -> dict:
        if not storage.exists(self.manifest_path):
            return {"stages": {}}
        return storage.read_json(self.manifest_path)

    def stage_entry(self, name: str) -> dict | None:
        return self.manifest().get("stages", {}).get(name)

    def is_current(self, name: str) -> bool:
        """The manifest entry (done or interrupted) has the current config hash and was
        made from the current upstream outputs, so its partial outputs can be resumed."""
        stages = self.manifest().get("stages", {})
        entry = stages.get(name)
        if not entry or entry.get("hash") != self.current_hash(name):
            return False
        return all(stages.get(u, {}).get("run_id") == entry.get("inputs", {}).get(u)
                   for u in STAGES[name][1])

    def is_done(self, name: str) -> bool:
        entry = self.stage_entry(name)
        return bool(entry) and entry.get("status") == "done" and self.is_current(name)

    def mark(self, name: str, status: str, **extra) -> dict:
        manifest = self.manifest()
        stages = manifest.setdefault("stages", {})
        entry = {"status": status, "hash": self.current_hash(name),
                 "run_id": uuid.uuid4().hex[:12] if status == "done" else None,
                 "inputs": {u: stages.get(u, {}).get("run_id") for u in STAGES[name][1]},
                 "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        entry.update(extra)
        stages[name] = entry
        manifest["config"] = to_dict(self.config)
        manifest["versions"] = versions()
        storage.write_json_atomic(self.manifest_path, manifest)
        return entry

    # ------------------------------------------------------------ outputs
    @contextlib.contextmanager
    def output(self, name: str) -> Iterator[str]:
        """Directory for a stage to write `name` into; published when the block ends.

        Locally it is a temporary sibling renamed into place. On object stores (no
        atomic rename of folders) the final folder is cleared and written directly; the
        manifest, updated only after this block, is what marks it complete.
        """
        final = self.path(name)
        storage.clean_temps(self.root, name)
        if storage.is_uri(final):
            storage.remove(final)
            yield final
            return
        tmp = storage.temp_sibling(final)
        try:
            yield tmp
        except BaseException:
            storage.remove(tmp)
            raise
        storage.publish(tmp, final)

    def attempt(self, name: str) -> str:
        """Id of the current computation of a stage: kept when an interrupted stage is
        resumed, new when it is recomputed (`--force`, other config or inputs)."""
        return (self.stage_entry(name) or {}).get("attempt") or "0"

    def read_metrics(self) -> dict:
        p = self.path("metrics.json")
        return storage.read_json(p) if storage.exists(p) else {}

    def write_metrics(self, section: str, values: dict) -> None:
        metrics = self.read_metrics()
        metrics[section] = values
        storage.write_json_atomic(self.path("metrics.json"), metrics)

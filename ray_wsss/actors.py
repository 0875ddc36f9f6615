"""A model in a Ray Data actor pool: the one way this project runs a network over a
dataset (CAMs, `explain`, the sweeps' map cache, segmentation inference, the random
walk).

`map_with_model(ds, CallableClass, kwargs, resources, batch_size)` is Ray Data's
`map_batches` with a callable class: each actor builds its model once (on a GPU when
`gpus_per_actor` > 0) and then turns numpy batches into rows. Only small, picklable
values travel in the constructor arguments (folders, ids, frozen configs): a restarted
actor rebuilds itself from them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ActorResources:
    """How many actors and what each holds; `where` names the config section in
    messages."""
    num_actors: int | None = None   # null: one per GPU, or every CPU but one
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    where: str = "cams"

    @classmethod
    def of(cls, section, where: str) -> "ActorResources":
        """From a config section with num_actors / cpus_per_actor / gpus_per_actor."""
        return cls(section.num_actors, section.cpus_per_actor, section.gpus_per_actor, where)


def actor_count(res: ActorResources, batches: int | None = None) -> int:
    """`num_actors`, or by default one actor per GPU, or all CPUs but one: Ray Data's
    read and write tasks need a CPU of their own, and an actor pool that holds every CPU
    starves them (the stage would hang). Never more than `batches` (when known): an
    actor without a batch only costs its start (a process, torch, the model: 2-3 s of
    a CPU each)."""
    import ray

    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    if res.gpus_per_actor > 0:
        n = res.num_actors or max(1, int(resources.get("GPU", 0) // res.gpus_per_actor))
    else:
        n = res.num_actors or max(1, (cpus - 1) // res.cpus_per_actor)
    if n * res.cpus_per_actor >= cpus and cpus > 1:
        raise ConfigError(f"{res.where}: {n} actor(s) x {res.cpus_per_actor} CPU would hold "
                          f"all {cpus} CPUs of the cluster and starve Ray Data's read tasks; "
                          f"lower {res.where}.num_actors or {res.where}.cpus_per_actor")
    return n if batches is None else max(1, min(n, batches))


def map_with_model(ds, fn: type, kwargs: dict, res: ActorResources, batch_size: int,
                   rows: int | None = None):
    """`ds.map_batches(fn, ...)` on a pool of `actor_count(res)` actors, numpy batches;
    `rows` (at most that many rows in `ds`, when known) caps the pool at one actor per
    batch."""
    import ray.data

    batches = None if rows is None else -(-rows // max(1, batch_size))
    return ds.map_batches(
        fn, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=actor_count(res, batches)),
        batch_size=batch_size, batch_format="numpy",
        num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor or None)

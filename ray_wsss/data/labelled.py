"""Which train images are pixel-labelled in the semi-weak mode (section `semi`).

Teams that label a few images by the pixel and the rest by tags: the pixel-labelled set
is explicit, so that a run says (and its hash records) exactly which masks it learned
from. Either a text file of image ids (`semi.labelled_file`, one per line, `#` starts a
comment) or `semi.labelled_count` ids drawn with `semi.seed` from the sorted ids of the
train split's images that have a mask: the same draw on every machine, whatever order
the dataset's files list them in. The draw is stratified by default (`semi.draw`): it
first covers every class the candidates hold, rarest class first, so that 10 labelled
images of a 6-class dataset are not left without one of the classes (a uniform draw of
10 demo images held no `ball`), and fills the remaining places uniformly; a count too
small to cover every class is warned about, naming the classes left out. A validation
or test image can never be among them: a list that names one is refused, as is an id
the dataset lacks or an image without a mask. Every other train image contributes its
tags only, even where its mask is stored.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from .. import storage
from ..errors import ConfigError


def has_labelled(config) -> bool:
    """Whether `semi` names any pixel-labelled image."""
    return bool(config.semi.labelled_file) or config.semi.labelled_count > 0


def labelled_file_fingerprint(config, cache: dict) -> list[str]:
    """The labelled-id file by its content (a stage's `external`): editing the file makes
    the steps that read it stale."""
    if not config.semi.labelled_file:
        return []
    where = storage.resolve(config.semi.labelled_file)
    if where not in cache:
        cache[where] = (hashlib.sha256(storage.read_bytes(where)).hexdigest()[:16]
                        if storage.exists(where) else "missing")
    return ["labelled_file:" + cache[where]]


def _index(dataset_path: str) -> dict[str, tuple[str, bool, tuple[int, ...]]]:
    """image_id -> (split, has a mask, its classes), read from the Parquet files on the
    driver (ids, splits, tags and the mask column's validity, not the images)."""
    from .dataset import read_table

    table = read_table(dataset_path, ["image_id", "split", "mask", "labels"])
    ids = table.column("image_id").to_pylist()
    splits = table.column("split").to_pylist()
    valid = table.column("mask").is_valid().to_pylist()
    labels = table.column("labels").to_pylist()
    return {i: (s, v, tuple(c)) for i, s, v, c in zip(ids, splits, valid, labels)}


def stratified_draw(classes: list[tuple[int, ...]], count: int,
                    rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """`count` indices into `classes` (each candidate's class ids) that cover every class
    the candidates hold when `count` allows, and the classes left uncovered.

    Greedy, rarest class first: while a class is uncovered and places remain, take the
    uncovered class held by the fewest candidates not yet drawn, and among its holders the
    one that covers the most uncovered classes (ties broken by a random permutation drawn
    from `rng`); then fill the remaining places in that permutation's order, i.e.
    uniformly. Deterministic for a given `rng` state."""
    order = rng.permutation(len(classes))
    holders: dict[int, list[int]] = {}
    for i in order.tolist():
        for c in set(classes[i]):
            holders.setdefault(int(c), []).append(i)
    left = {c: len(h) for c, h in holders.items()}   # holders not yet drawn
    uncovered = set(holders)
    chosen: list[int] = []
    taken: set[int] = set()

    def take(i: int) -> None:
        chosen.append(i)
        taken.add(i)
        for c in set(classes[i]):
            left[int(c)] -= 1

    while uncovered and len(chosen) < count:
        rarest = min(uncovered, key=lambda c: (left[c], c))
        # holders are listed in permutation order: min keeps the first of equal cover
        pick = min((i for i in holders[rarest] if i not in taken),
                   key=lambda i: -len(uncovered.intersection(classes[i])))
        take(pick)
        uncovered.difference_update(classes[pick])
    for i in order.tolist():
        if len(chosen) >= count:
            break
        if i not in taken:
            take(i)
    return chosen, sorted(uncovered)


def parse_id_file(text: str) -> list[tuple[int, str]]:
    """(line number, image id) of each non-empty line; `#` starts a comment."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        image_id = line.split("#", 1)[0].strip()
        if image_id:
            out.append((n, image_id))
    return out


def labelled_ids(config, dataset_path: str) -> list[str]:
    """The sorted ids of the pixel-labelled images of `config` in the dataset at
    `dataset_path` ([] when `semi` names none). ConfigError naming the id, the line and
    the file (or the key) for an id the dataset lacks, of another split than
    `segmenter.train_split`, or without a mask."""
    semi, train = config.semi, config.segmenter.train_split
    if not has_labelled(config):
        return []
    index = _index(dataset_path)
    if semi.labelled_file:
        path = storage.resolve(semi.labelled_file)
        if not storage.exists(path):
            raise ConfigError(f"semi.labelled_file: {path} does not exist")
        entries = parse_id_file(storage.read_bytes(path).decode("utf-8", errors="replace"))
        if not entries:
            raise ConfigError(f"semi.labelled_file: {path} names no image id")
        seen: dict[str, int] = {}
        for line, image_id in entries:
            where = f"semi.labelled_file: {path}, line {line}: image id {image_id!r}"
            if image_id in seen:
                raise ConfigError(f"{where} is listed twice (first on line "
                                  f"{seen[image_id]})")
            seen[image_id] = line
            if image_id not in index:
                raise ConfigError(f"{where} is not in the dataset {dataset_path}")
            split, has_mask, _ = index[image_id]
            if split != train:
                raise ConfigError(f"{where} is in split {split!r}: only images of the train "
                                  f"split {train!r} may be pixel-labelled (an evaluation "
                                  f"image learned from would inflate its scores)")
            if not has_mask:
                raise ConfigError(f"{where} has no mask in the dataset")
        return sorted(seen)
    eligible = sorted(i for i, (split, has_mask, _) in index.items()
                      if split == train and has_mask)
    if semi.labelled_count > len(eligible):
        raise ConfigError(f"semi.labelled_count: {semi.labelled_count} exceeds the "
                          f"{len(eligible)} images of split {train!r} that have a mask")
    rng = np.random.default_rng(semi.seed)
    if semi.draw == "uniform":
        chosen = rng.choice(len(eligible), size=semi.labelled_count, replace=False)
        return sorted(eligible[i] for i in chosen)
    chosen, missing = stratified_draw([index[i][2] for i in eligible],
                                      semi.labelled_count, rng)
    if missing:
        from .dataset import read_info

        names = read_info(dataset_path).classes
        print(f"[ray-wsss] warning: semi.labelled_count={semi.labelled_count}: the "
              f"stratified draw of split {train!r} leaves out "
              f"{', '.join(names[c - 1] for c in missing)} (too few images to cover every "
              f"class): no ground truth of them is learned from", file=sys.stderr, flush=True)
    return sorted(eligible[i] for i in chosen)


def write_labelled(directory: str, ids: list[str]) -> None:
    """The ids a step learned ground truth from, beside its output (provenance)."""
    storage.write_json_atomic(storage.join(directory, "labelled.json"),
                              {"count": len(ids), "image_ids": list(ids)})

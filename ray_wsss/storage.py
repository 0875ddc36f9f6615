"""Run-directory storage: local paths or any URI pyarrow understands (s3://, gs://, ...).

Stages write their outputs under a temporary name and `publish` them (rename) when
complete; the run manifest, written atomically after that, is what marks a stage done.
A reader therefore never sees a half-written output: either the manifest names it or
the stage is redone.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> str:
    """Absolute local path or URI (so it means the same thing on every Ray worker)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    path = resolve(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def listdir(path: str) -> list[str]:
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p)))


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as fh:
        return fh.read()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    fs, p = filesystem(path)
    parent = posixpath.dirname(p) if is_uri(path) else os.path.dirname(p)
    fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as fh:
        fh.write(data)
    fs.move(tmp, p)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())


def split(path: str) -> tuple[str, str]:
    """(parent folder, name) of a local path or URI."""
    path = path.rstrip("/")
    if is_uri(path):
        return posixpath.dirname(path), posixpath.basename(path)
    return os.path.dirname(path), os.path.basename(path)


def temp_sibling(path: str) -> str:
    """A fresh temporary name beside `path` for a stage to write into before publishing."""
    parent, name = split(path)
    return join(parent, f".tmp-{name}-{uuid.uuid4().hex[:8]}")


def publish(tmp: str, final: str) -> None:
    """Replace `final` by the finished `tmp` directory."""
    remove(final)
    fs, t = filesystem(tmp)
    fs.move(t, filesystem(final)[1])


def clean_temps(parent: str, name: str) -> None:
    """Remove leftovers of interrupted writes of `name` under `parent`."""
    for entry in listdir(parent):
        if entry.startswith(f".tmp-{name}-"):
            remove(join(parent, entry))

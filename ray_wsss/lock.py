"""One owner per run directory: a lock file held for a run's lifetime.

Two runs on one run directory delete each other's work (a stage removes the Ray Train
folders of other attempts, outputs are replaced on publish), so a run takes
`RunLock(root)` first and a second run is refused at once, with a `LockError` that
names the holder and says how to break the lock.

The lock is the file `<root>/run.lock`, JSON: host, pid, start time, a random token, the
command line and a heartbeat time that a daemon thread rewrites every `heartbeat_s`
seconds. A lock is stale, and the next acquirer takes it over with a printed note, when
its heartbeat is older than `stale_after_s` (the holder's machine died or lost the
storage), or at once when its holder ran on this host and its process has ended. Clocks
of the hosts that share a run directory must agree to well within `stale_after_s`.

What acquisition guarantees:

- Local paths (and network filesystems with atomic hard links, NFSv3 and later): the lock
  is created by hard-linking a fully written temporary file to `run.lock`, which fails if
  the name exists, so of any number of concurrent acquirers exactly one wins, and no
  reader sees a half-written lock. A stale lock is taken over by renaming it aside, which
  only one process can do, and checking that the file renamed is the stale lock that was
  judged (not a fresh one that replaced it meanwhile).
- Object stores (`s3://`, `gs://`, ... through pyarrow, which has no create-if-absent):
  best effort. The acquirer writes the lock if none exists, waits `SETTLE_S`, reads it
  back and holds the lock only if its own token is there; the last writer wins. Exactly
  one of several concurrent acquirers holds the lock provided each one's write lands
  within `SETTLE_S` of its existence check and the store reads its own writes (S3, GCS
  and Azure Blob do). Should two still both believe they hold it, the heartbeat of the
  one whose token was overwritten finds the other token at its next beat: `check()`
  then raises, and a warning is printed.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid

from . import storage
from .errors import LockError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 20.0      # how often the holder rewrites its heartbeat
STALE_AFTER_S = 120.0   # a heartbeat older than this marks a lock left by a dead run
SETTLE_S = 1.0          # object stores: wait between writing the lock and reading it back
UNREADABLE_BEATS = 1    # unreadable lock-file reads in a row the holder lets pass
_ATTEMPTS = 5           # create / take over rounds before giving up on a contended lock

# roots this process holds -> the RunLock holding it (nested acquisitions share it)
_HELD: dict[str, "RunLock"] = {}
_HELD_GUARD = threading.Lock()


def lock_path(root: str) -> str:
    return storage.join(storage.resolve(root), LOCK_NAME)


def _object_store(path: str) -> bool:
    return storage.is_uri(path)


def _when(ts: float | None) -> str:
    if ts is None:
        return "an unknown time"
    return _dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def describe(holder: dict, now: float | None = None) -> str:
    """One line naming a lock's holder: host, pid, since when, last heartbeat."""
    now = time.time() if now is None else now
    beat = holder.get("heartbeat")
    age = f"{max(0.0, now - beat):.0f} s ago" if beat is not None else "never"
    text = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
            f"{_when(holder.get('started'))}, last heartbeat {age}")
    if holder.get("command"):
        text += f", command: {holder['command']}"
    return text


def read_lock(root: str) -> dict | None:
    """The record of the lock on `root`, or None when it is not locked. A lock file that
    cannot be parsed reads as a holder with unknown fields and the file's modification
    time as its heartbeat."""
    return _read(lock_path(root))


def break_lock(root: str) -> dict | None:
    """Remove the lock on `root` whoever holds it (`ray-wsss unlock RUN_DIR`); returns the
    record of the lock removed, None when there was none."""
    path = lock_path(root)
    holder = _read(path)
    if holder is not None:
        storage.remove(path)
    return holder


def _read(path: str) -> dict | None:
    fs, p = storage.filesystem(path)
    try:
        with fs.open_input_stream(p) as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError:
        if not storage.exists(path):
            return None
        raise
    try:
        record = json.loads(data.decode("utf-8"))
        if isinstance(record, dict) and "token" in record:
            return record
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    info = fs.get_file_info(p)
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    return {"host": "?", "pid": "?", "token": None, "heartbeat": mtime, "unreadable": True}


def _pid_ended(pid: int) -> bool:
    """Whether process `pid` of this host has ended (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
        return state in ("Z", "X")
    except (OSError, IndexError):
        return False


class RunLock:
    """`with RunLock(run_dir): ...` holds the run directory for the block.

    `heartbeat_s`: how often the holder's heartbeat is rewritten; `stale_after_s`: how old
    another holder's heartbeat may be before its lock is taken over. A process that
    already holds `root` may take it again (nested `with`, e.g. a pipeline that runs its
    stages) unless `reentrant` is False; the lock file is removed when the last holder
    of the process releases it. Raises LockError when another run holds it.
    """

    def __init__(self, root: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, reentrant: bool = True):
        if not 0 < heartbeat_s < stale_after_s / 2:
            raise ValueError("RunLock: heartbeat_s must be below half of stale_after_s, got "
                             f"{heartbeat_s} and {stale_after_s}")
        self.root = storage.resolve(root)
        self.path = lock_path(self.root)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.reentrant = reentrant
        self.token = uuid.uuid4().hex
        self.record: dict | None = None
        self._owner: RunLock | None = None
        self._depth = 0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public
    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._owner is not None

    def acquire(self) -> "RunLock":
        if self._owner is not None:
            raise RuntimeError(f"RunLock({self.root}) is already acquired by this object")
        with _HELD_GUARD:
            owner = _HELD.get(self.root)
            if owner is not None and self.reentrant:
                owner._depth += 1
                self._owner = owner
                return self
        for _ in range(_ATTEMPTS):
            if self._create():
                break
            holder = _read(self.path)
            if holder is None:      # released meanwhile: try again
                continue
            reason = self._stale(holder)
            if reason is None:
                raise LockError(self._refusal(holder))
            print(f"[ray-wsss] note: taking over the lock of {self.root}: {reason} "
                  f"({describe(holder)})", file=sys.stderr, flush=True)
            self._remove_stale(holder)
        else:
            holder = _read(self.path)
            raise LockError(self._refusal(holder) if holder else
                            f"{self.root}: could not take the run lock {self.path}: other "
                            "processes keep creating and removing it")
        with _HELD_GUARD:
            _HELD[self.root] = self
            self._owner, self._depth = self, 1
        self._lost, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"ray-wsss lock heartbeat {self.root}")
        self._thread.start()
        return self

    def release(self) -> None:
        """Let go of this holding; the lock file goes when the last holder of this
        process lets go (and only if it is still this process's lock)."""
        owner = self._owner
        if owner is None:
            return
        self._owner = None
        with _HELD_GUARD:
            owner._depth -= 1
            if owner._depth > 0:
                return
            if _HELD.get(owner.root) is owner:
                del _HELD[owner.root]
        owner._stop.set()
        if owner._thread is not None:
            owner._thread.join()
        holder = _read(owner.path)
        if holder is not None and holder.get("token") == owner.token:
            storage.remove(owner.path)

    def check(self) -> None:
        """Raise LockError if the lock was taken over by another run while held (its
        heartbeat found another token): call between stages."""
        owner = self._owner or self
        if owner._lost:
            raise LockError(owner._lost)

    # ------------------------------------------------------------ internals
    def _new_record(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                "started_iso": _when(now), "heartbeat": now, "token": self.token,
                "command": " ".join(sys.argv)}

    def _create(self) -> bool:
        """Create the lock if absent; True when this process now holds it."""
        storage.makedirs(self.root)
        record = self._new_record()
        data = json.dumps(record, indent=1).encode()
        if _object_store(self.path):
            if storage.exists(self.path):
                return False
            self._put(data)
            time.sleep(SETTLE_S)
            back = _read(self.path)
            won = back is not None and back.get("token") == self.token
        else:
            won = self._create_local(data)
        if won:
            self.record = record
        return won

    def _create_local(self, data: bytes) -> bool:
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: O_EXCL create
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        finally:
            os.unlink(tmp)

    def _put(self, data: bytes) -> None:
        """Write the lock file whole: readers see the old or the new content."""
        if _object_store(self.path):
            fs, p = storage.filesystem(self.path)
            with fs.open_output_stream(p) as fh:  # one PUT: atomic on object stores
                fh.write(data)
        else:
            tmp = f"{self.path}.{self.token}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)

    def _stale(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over, or None when it is live."""
        now = time.time()
        beat = holder.get("heartbeat")
        if beat is not None and now - beat > self.stale_after_s:
            return f"its heartbeat is {now - beat:.0f} s old (limit {self.stale_after_s:.0f} s)"
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                with _HELD_GUARD:
                    mine = _HELD.get(self.root)
                if mine is None or mine.token != holder.get("token"):
                    return f"it was left by an earlier process with this process's pid {pid}"
            elif _pid_ended(pid):
                return f"its process {pid} on this host has ended"
        return None

    def _remove_stale(self, holder: dict) -> None:
        """Remove the stale lock `holder`, but not a fresh lock that replaced it."""
        if _object_store(self.path):
            current = _read(self.path)
            if current is not None and current.get("token") == holder.get("token"):
                storage.remove(self.path)
            return
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            try:  # a fresh lock replaced the stale one meanwhile: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)

    def _refusal(self, holder: dict) -> str:
        if holder.get("unreadable"):
            who = f"an unreadable lock file last written {_when(holder.get('heartbeat'))}"
        else:
            who = describe(holder)
        return (f"{self.root} is in use by another run ({who}). Two runs on one run "
                f"directory delete each other's outputs: wait for it to finish. If it is "
                f"gone, its lock is taken over once its heartbeat is "
                f"{self.stale_after_s:.0f} s old (at once on its own host when its process "
                f"has ended); to break it now run `ray-wsss unlock {self.root}` or delete "
                f"{self.path}")

    def _beat(self) -> None:
        misses = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                misses = self._beat_once(misses)
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not end the beat
                misses = 0  # counted in a row only: this beat read no unreadable file
                print(f"[ray-wsss] warning: {self.root}: cannot refresh the run lock's "
                      f"heartbeat: {exc}", file=sys.stderr, flush=True)
            if self._lost:
                return

    def _beat_once(self, misses: int = 0) -> int:
        """One heartbeat: the lock file read back and, while it is still this run's,
        rewritten with a fresh heartbeat; removed or another run's, the lock is lost
        (`_lost` says how). An unreadable file is left as it is and read again at the
        next beat (`misses`: unreadable reads in a row, returned): something that writes
        it in place (a copy tool, an editor) leaves it unreadable for a moment, and
        declaring the lock lost then would stop a healthy run. Unreadable
        `UNREADABLE_BEATS` + 1 times in a row, it is lost."""
        holder = _read(self.path)
        if holder is not None and holder.get("unreadable") and misses < UNREADABLE_BEATS:
            return misses + 1
        if holder is None or holder.get("token") != self.token:
            self._lost = (f"{self.root}: the run lock was "
                          + ("removed" if holder is None else
                             f"unreadable at {misses + 1} heartbeats in a row (not a lock "
                             f"record: {self.path})" if holder.get("unreadable") else
                             f"taken over by another run ({describe(holder)})")
                          + " while this run held it; this run's outputs may have "
                          "been changed by the other run")
            print(f"[ray-wsss] warning: {self._lost}", file=sys.stderr, flush=True)
            return misses
        self.record = {**self.record, "heartbeat": time.time()}
        self._put(json.dumps(self.record, indent=1).encode())
        return 0

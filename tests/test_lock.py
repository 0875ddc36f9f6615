"""The run-directory lock: one run per directory, a refusal that names the holder, and
locks left by dead runs taken over."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from ray_wsss import lock as lock_mod
from ray_wsss.errors import LockError, StageError
from ray_wsss.lock import RunLock, break_lock, read_lock

HOLD = textwrap.dedent("""
    import sys, time
    from ray_wsss.lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")
TRY = textwrap.dedent("""
    import sys
    from ray_wsss.errors import LockError
    from ray_wsss.lock import RunLock
    try:
        RunLock(sys.argv[1]).acquire()
    except LockError as exc:
        print(exc)
        sys.exit(3)
""")


def _python(code: str, *args: str, **kw):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _fake_lock(root, **fields):
    record = {"host": "gpu-node-7", "pid": 4242, "started": time.time() - 600,
              "heartbeat": time.time(), "token": "f" * 32, "command": "ray-wsss run x.yaml"}
    record.update(fields)
    os.makedirs(root, exist_ok=True)
    # whole, as RunLock writes it: a heartbeat thread reading a half-written file would
    # see an unreadable holder, not this one (a CI run on 2026-12-07 did)
    tmp = os.path.join(root, "run.lock.fake.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, os.path.join(root, "run.lock"))
    return record


def test_a_second_acquirer_is_refused_naming_the_holder(tmp_path):
    root = str(tmp_path / "run")
    with RunLock(root, reentrant=False) as first:
        record = read_lock(root)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["token"] == first.token
        with pytest.raises(LockError) as err:
            RunLock(root, reentrant=False).acquire()
        msg = str(err.value)
        assert isinstance(err.value, StageError)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "since " in msg and "last heartbeat 0 s ago" in msg
        assert f"ray-wsss unlock {root}" in msg and os.path.join(root, "run.lock") in msg
        assert read_lock(root)["token"] == first.token  # the refused one changed nothing
    assert not os.path.exists(os.path.join(root, "run.lock"))  # release removes it


def test_a_live_lock_of_another_host_is_refused(tmp_path):
    root = str(tmp_path / "run")
    _fake_lock(root)
    with pytest.raises(LockError, match=r"host gpu-node-7, pid 4242, since .*"
                                        r"last heartbeat \d s ago, command: ray-wsss run"):
        RunLock(root).acquire()
    assert read_lock(root)["token"] == "f" * 32


def test_nested_acquisitions_in_one_process_share_the_lock(tmp_path):
    root = str(tmp_path / "run")
    with RunLock(root) as outer:
        with RunLock(root):
            pass
        assert read_lock(root)["token"] == outer.token  # the inner exit kept it
    assert read_lock(root) is None


def test_a_stale_heartbeat_is_taken_over_with_a_note(tmp_path, capsys):
    root = str(tmp_path / "run")
    _fake_lock(root, heartbeat=time.time() - 1000)
    with RunLock(root) as lock:
        assert read_lock(root)["token"] == lock.token
    err = capsys.readouterr().err
    assert "taking over the lock" in err and "heartbeat is 1000 s old" in err
    assert "gpu-node-7" in err


def test_the_heartbeat_is_refreshed_and_a_lost_lock_is_reported(tmp_path, capsys):
    root = str(tmp_path / "run")
    lock = RunLock(root, heartbeat_s=0.05, stale_after_s=10).acquire()
    first = read_lock(root)["heartbeat"]
    time.sleep(0.3)
    assert read_lock(root)["heartbeat"] > first
    lock.check()
    _fake_lock(root)  # another run took it (e.g. this one was suspended for minutes)
    time.sleep(0.3)
    with pytest.raises(LockError, match="taken over by another run .*gpu-node-7"):
        lock.check()
    lock.release()
    assert read_lock(root)["token"] == "f" * 32  # not ours: left in place
    assert "warning" in capsys.readouterr().err


def test_break_lock_removes_any_lock(tmp_path):
    root = str(tmp_path / "run")
    assert break_lock(root) is None
    _fake_lock(root)
    assert break_lock(root)["host"] == "gpu-node-7"
    assert read_lock(root) is None


def test_an_unreadable_lock_file_is_refused_while_fresh(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.lock").write_text("")
    with pytest.raises(LockError, match="unreadable lock file"):
        RunLock(str(root)).acquire()
    old = time.time() - 1000
    os.utime(root / "run.lock", (old, old))
    with RunLock(str(root)):
        pass


def test_another_process_is_refused_and_its_dead_lock_taken_over(tmp_path, capsys):
    root = str(tmp_path / "run")
    holder = _python(HOLD, root)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(LockError, match=f"pid {holder.pid}, since"):
            RunLock(root).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its heartbeat is fresh but its pid on this host is gone
    with RunLock(root) as lock:
        assert read_lock(root)["token"] == lock.token
        other = _python(TRY, root)
        out, err = other.communicate(timeout=60)
        assert other.returncode == 3, err
        assert f"pid {os.getpid()}" in out and "ray-wsss unlock" in out
    assert f"its process {holder.pid} on this host has ended" in capsys.readouterr().err


def test_object_store_acquisition_reads_its_token_back(tmp_path, monkeypatch):
    """The best-effort path for URIs (no create-if-absent), run on a local folder."""
    monkeypatch.setattr(lock_mod, "_object_store", lambda path: True)
    monkeypatch.setattr(lock_mod, "SETTLE_S", 0.0)
    root = str(tmp_path / "run")
    with RunLock(root, reentrant=False) as first:
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            RunLock(root, reentrant=False).acquire()
        assert read_lock(root)["token"] == first.token
    assert read_lock(root) is None
    _fake_lock(root, heartbeat=time.time() - 1000)
    with RunLock(root) as lock:
        assert read_lock(root)["token"] == lock.token


def test_the_lock_goes_with_the_last_holder_even_out_of_order(tmp_path):
    root = str(tmp_path / "run")
    outer = RunLock(root).acquire()
    inner = RunLock(root).acquire()
    outer.release()
    assert read_lock(root)["token"] == outer.token  # the inner holder still runs
    inner.release()
    assert read_lock(root) is None


def test_the_holder_lets_one_unreadable_read_pass_and_loses_the_lock_at_two(tmp_path):
    """A lock file written in place (not whole) reads unreadable for a moment: the
    holder leaves it alone at that beat and reads it again at the next; only a second
    unreadable read in a row loses the lock. Beats are driven by hand (the thread's
    period is an hour here), so the test does not race the heartbeat."""
    root = str(tmp_path / "run")
    path = os.path.join(root, "run.lock")
    lock = RunLock(root, heartbeat_s=3600, stale_after_s=8000).acquire()
    try:
        ours = open(path).read()
        open(path, "w").write(ours[:len(ours) // 2])  # half-written
        assert lock._beat_once(0) == 1 and lock._lost is None
        assert open(path).read() == ours[:len(ours) // 2]  # left as it was
        open(path, "w").write(ours)  # the writer finished
        before = read_lock(root)["heartbeat"]
        time.sleep(0.01)
        assert lock._beat_once(1) == 0 and lock._lost is None
        assert read_lock(root)["heartbeat"] > before
        lock.check()
        open(path, "w").write("")
        assert lock._beat_once(0) == 1
        assert lock._beat_once(1) == 1
        with pytest.raises(LockError, match=r"unreadable at 2 heartbeats in a row"):
            lock.check()
    finally:
        lock.release()

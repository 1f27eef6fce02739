"""The run-directory lock: one trainer per run, across processes (and hosts, through the heartbeat), stale locks of
dead processes taken over."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling.train.lock import LOCK_FILE, DirLock


def test_second_holder_is_refused_until_release(tmp_path):
    a, b = DirLock(tmp_path), DirLock(tmp_path)
    assert a.acquire()
    assert not b.acquire()
    assert b.describe() == f"{socket.gethostname()}:{os.getpid()}"
    a.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert b.acquire()
    b.release()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)  # exited: its pid is free (reuse within this test is vanishingly unlikely)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "token": "x",
                                                  "since": time.time()}))
    lock = DirLock(tmp_path)
    assert lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from Linux's /proc")
def test_lock_whose_pid_now_names_a_younger_process_is_taken_over(tmp_path):
    # After a reboot (or a restored machine image) the dead owner's pid can name any process; the owner started
    # before it took the lock, so a process that started after it is not the owner. The real owner keeps its lock.
    path = tmp_path / LOCK_FILE
    other = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.1)
        for since, taken in ((time.time() - 3600, True), (time.time() + 60, False)):
            path.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "token": "x",
                                        "since": since}))
            lock = DirLock(tmp_path)
            assert lock.acquire() is taken, (since, taken)
            lock.release()
        assert other.poll() is None  # judged, not signalled
    finally:
        other.kill()


def test_other_hosts_lock_is_stale_only_once_its_heartbeat_stops(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "node-17", "pid": 1234, "token": "remote", "since": time.time()}))
    lock = DirLock(tmp_path, stale_after_s=60, heartbeat_s=10)
    assert not lock.acquire()  # touched just now: alive on its node
    old = time.time() - 120
    os.utime(path, (old, old))  # no heartbeat for two minutes: that node's process is gone
    assert lock.acquire()
    lock.release()


def test_heartbeat_keeps_the_lock_fresh_and_release_never_removes_anothers_lock(tmp_path):
    lock = DirLock(tmp_path, stale_after_s=0.5, heartbeat_s=0.1)
    assert lock.acquire()
    old = time.time() - 100
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.35)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 0.3  # touched again by the heartbeat
    # taken over meanwhile (e.g. its host was cut off for longer than stale_after_s): release leaves the new lock
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "other", "pid": 1, "token": "new", "since": time.time()}))
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "new"


def test_bad_timing_is_refused():
    with pytest.raises(ValueError, match="stale_after_s=10 must exceed twice heartbeat_s=30"):
        DirLock(".", stale_after_s=10, heartbeat_s=30)

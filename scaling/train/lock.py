"""An exclusive lock on a run (or sweep) directory that holds across processes and across hosts sharing a filesystem.

Why not fcntl/flock (filelock): advisory locks do not cross NFS clients reliably, and a SLURM requeue can start the
same run on another node while the first is still dying. So the lock is a file created with O_CREAT | O_EXCL (atomic
on local filesystems and on NFSv3+), holding its owner's host and pid, and touched every `heartbeat_s` by a daemon
thread. A lock is stale when its owner is on this host and its pid is gone (kill -9) or now names a process that
started after the lock was taken (the pid reused after a reboot or a restored machine image: without this a relaunch
left the run to that stranger forever), or when it is on another host and has not been touched for `stale_after_s`;
a stale lock is taken over by renaming it away first, so of two processes taking it over at once only one succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

log = logging.getLogger("scaling.train.lock")

LOCK_FILE = ".lock"
PID_SLACK_S = 2.0


def _started_at(pid: int) -> Optional[float]:
    """When process `pid` started, in epoch seconds (Linux's /proc: boot time + its start in clock ticks since boot,
    proc(5) /proc/pid/stat field 22); None where that is unknown (another OS, the process gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the command name: field 3 on
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class DirLock:
    def __init__(self, directory: Path | str, stale_after_s: float = 300.0, heartbeat_s: float = 30.0) -> None:
        if not stale_after_s > 2 * heartbeat_s:
            raise ValueError(f"lock: stale_after_s={stale_after_s} must exceed twice heartbeat_s={heartbeat_s}")
        self.path = Path(directory) / LOCK_FILE
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop: Optional[threading.Event] = None

    # -- who holds it ----------------------------------------------------------------------------------------------
    def holder(self) -> Optional[dict]:
        """The current owner {"host", "pid", "token", "since"}; None when unlocked. An unreadable lock file (a writer
        killed between create and write) reads as an owner of unknown pid, stale once untouched for stale_after_s."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"host": None, "pid": None, "token": None, "since": None}

    def _is_stale(self, owner: dict) -> bool:
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True  # its process died (kill -9, OOM): no heartbeat needed to know
            except PermissionError:
                pass  # alive, another user's: judged by its start time below
            started, since = _started_at(owner["pid"]), owner.get("since")
            # The owner started before it took the lock; a process that started after is another one under the same
            # pid (PID_SLACK_S: /proc/stat's boot time is whole seconds).
            return started is not None and isinstance(since, (int, float)) and started > since + PID_SLACK_S
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    # -- taking and giving back -------------------------------------------------------------------------------------
    def acquire(self) -> bool:
        """True if this process now holds the lock; False if a live owner holds it (never blocks)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.holder()
                if owner is None:
                    continue  # released meanwhile: try again
                if not self._is_stale(owner):
                    return False
                self._take_over(owner)
                continue
            with os.fdopen(fd, "w") as f:
                host, pid, _ = self.token.split(":")
                json.dump({"host": host, "pid": int(pid), "token": self.token, "since": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            self._start_heartbeat()
            return True
        return False

    def _take_over(self, owner: dict) -> None:
        """Move a stale lock aside; if what was moved is not the stale lock judged (another process took it over and
        wrote a fresh one meanwhile), put it back unless a lock exists again."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {"host": None, "pid": None, "token": None, "since": None}
        if moved.get("token") != owner.get("token"):
            try:
                os.link(aside, self.path)  # atomic, and fails if a lock exists again
            except FileExistsError:
                pass
        else:
            log.warning("took over the stale lock of %s (pid %s) on %s", owner.get("host"), owner.get("pid"),
                        self.path.parent)
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat(stop: threading.Event) -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        threading.Thread(target=beat, args=(self._stop,), daemon=True, name=f"lock-heartbeat {self.path}").start()

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        owner = self.holder()
        if owner is not None and owner.get("token") == self.token:  # never remove a lock taken over from us
            self.path.unlink(missing_ok=True)

    def describe(self) -> str:
        owner = self.holder() or {}
        return f"{owner.get('host')}:{owner.get('pid')}"

    def __enter__(self) -> "DirLock":
        if not self.acquire():
            raise RuntimeError(f"{self.path.parent} is locked by {self.describe()}: another process is training it; "
                               f"wait for it, or delete {self.path} if that process is gone for good.")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""A lock file that keeps two trainings from writing the same run folder.

``RUN/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems) and holds the
owner's PID, host name and, on Linux, the boot id and process start time. Another training that
finds the lock held by a live process refuses to start, naming that PID. A lock left behind by a
process that no longer runs (killed, power loss) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from unetcli.errors import OutputError

log = logging.getLogger("unetcli")

LOCK_NAME = ".lock"
_FRESH_SECONDS = 10.0
"""An empty or unreadable lock younger than this is being written right now: treat it as held."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return not _is_zombie(pid)


def owner_info() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_time": _start_time(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder_is_alive(holder: dict[str, Any]) -> bool | None:
    """True/False for a holder on this host; None when it runs on another host (cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return False  # the machine was restarted since
    pid = int(holder.get("pid", -1))
    if not _pid_alive(pid):
        return False
    started = holder.get("start_time")
    return not (started and _start_time(pid) not in (None, started))  # same PID, another process


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` for the block (the folder must exist)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        info = owner_info()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder()
                continue  # a stale lock was removed: try again
            except OSError as exc:
                raise OutputError(f"{self.run_dir}: cannot create the lock file {self.path.name} ({exc.strerror or exc})",
                                  hint="check that the run folder is writable") from exc
            try:
                os.write(fd, json.dumps(info).encode("utf-8"))
                os.fsync(fd)
            except OSError as exc:  # e.g. a full disk: no half-written lock is left behind
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise OutputError(f"{self.run_dir}: cannot write the lock file {self.path.name} ({exc.strerror or exc})",
                                  hint="check the free space and permissions of the folder") from exc
            else:
                os.close(fd)
            self.held = True
            self.owner = info
            return
        raise OutputError(f"{self.run_dir}: could not take the lock file {self.path}", hint="another training may be starting; try again")

    def _check_holder(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError("not a mapping")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, UnicodeDecodeError):
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return
            if age < _FRESH_SECONDS:
                raise OutputError(f"{self.run_dir} is being written by another training (its lock file was just created)",
                                  hint="wait for it to finish, or write this training to another --out") from None
            log.warning("%s: taking over an unreadable lock file left by a crashed training", self.run_dir)
            self.path.unlink(missing_ok=True)
            return
        alive = holder_is_alive(holder)
        pid, host = holder.get("pid"), holder.get("host")
        if alive is None:
            raise OutputError(
                f"{self.run_dir} is being written by another training (PID {pid} on host {host}, since {holder.get('since')})",
                hint=f"wait for it to finish; if that training no longer runs, delete {self.path}",
            )
        if alive:
            raise OutputError(
                f"{self.run_dir} is being written by another training (PID {pid}, since {holder.get('since')})",
                hint="wait for it to finish or stop it, or write this training to another --out",
            )
        log.warning("%s: taking over the lock of training PID %s, which no longer runs", self.run_dir, pid)
        # Re-read right before removing, so that a lock taken over meanwhile by another process survives.
        try:
            if self.path.read_text(encoding="utf-8") == text:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            if holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def live_holder(folder: Path) -> dict[str, Any] | None:
    """The holder of ``folder/.lock`` when it is (or may be: another host) a live process; None when
    there is no lock or only a stale one."""
    try:
        holder = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        try:  # an unreadable lock: held while it is being written, stale afterwards
            fresh = time.time() - (Path(folder) / LOCK_NAME).stat().st_mtime < _FRESH_SECONDS
        except OSError:
            return None
        return {"pid": "?", "since": "just now"} if fresh else None
    if not isinstance(holder, dict):
        return None
    return holder if holder_is_alive(holder) is not False else None

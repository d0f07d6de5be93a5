"""Whether the process holding a 'running' run is still alive (see :mod:`kdlab.store.database`).

The claiming process records its pid, the pid's start time and its host, and refreshes
``heartbeat_at`` while it trains (:class:`Heartbeat`). :func:`abandoned_reason` is the one rule every
reader and writer applies: on this host the pid decides alone; on another host a heartbeat older
than the timeout does.
"""
from __future__ import annotations

import math
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Mapping

from kdlab.errors import KdlabError

HEARTBEAT_TIMEOUT_SECONDS = 300.0  # a run of another host with no heartbeat for this long is abandoned
HEARTBEAT_ENV = "KDLAB_HEARTBEAT_TIMEOUT"


def _process_start_ticks(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ") ".
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int | None, pid_start: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that claimed the run.

    ``pid_start`` (Linux: the process start time in ticks, recorded at claim)
    detects a pid reused by an unrelated process; zombies count as dead.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill() would terminate the process there; assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except (OSError, OverflowError):
        return False
    stat = _process_start_ticks(pid)
    if stat is None:
        return True  # no /proc (macOS, or it vanished): trust kill()
    state, start = stat
    if state in ("Z", "X"):
        return False
    return pid_start is None or start == pid_start


def _own_start_ticks() -> int | None:
    stat = _process_start_ticks(os.getpid())
    return None if stat is None else stat[1]


def resolve_heartbeat_timeout(value: float | None) -> float:
    """The given timeout, else ``$KDLAB_HEARTBEAT_TIMEOUT``, else the default; a bad value is a KdlabError."""
    source = "heartbeat_timeout"
    if value is None:
        text = os.environ.get(HEARTBEAT_ENV)
        if not text:
            return HEARTBEAT_TIMEOUT_SECONDS
        source = f"${HEARTBEAT_ENV}"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise KdlabError(f"{source}: expected a positive number of seconds, got {value!r}; e.g. {HEARTBEAT_ENV}=300")
    return float(value)


def abandoned_reason(row: Mapping[str, Any], *, host: str, now: float, timeout: float) -> str | None:
    """Why a 'running' row's process is gone, or None while it may be alive.

    ``row`` needs ``pid``, ``pid_start``, ``host`` and ``heartbeat_at``. A row of another host
    without any heartbeat (written by a kdlab without heartbeats) has unknown liveness and is kept.
    """
    if row["host"] == host:
        if _process_alive(row["pid"], row["pid_start"]):
            return None
        return f"process {row['pid']} on {host} ended without finishing the run"
    beat = row["heartbeat_at"]
    if not isinstance(beat, (int, float)) or now - beat <= timeout:
        return None
    return (f"process {row['pid']} on {row['host']} sent no heartbeat for {now - beat:.0f} s "
            f"(timeout {timeout:g} s)")


class Heartbeat:
    """While open, refresh run ``run_id``'s heartbeat from a background thread.

    The thread opens its own ``Store`` (a connection belongs to the thread that
    opened it) and writes every ``heartbeat_timeout / 5`` seconds, so another
    host sees the run alive with four beats to spare. A failed beat (a locked or
    full disk) is retried at the next interval: it must never stop training.
    """

    def __init__(self, workspace: str | Path, run_id: str, *, heartbeat_timeout: float | None = None):
        self.workspace = workspace
        self.run_id = run_id
        self.timeout = resolve_heartbeat_timeout(heartbeat_timeout)
        self.interval = min(60.0, max(0.05, self.timeout / 5))
        self._stop = threading.Event()
        self.lost = threading.Event()  # set when a beat finds the run no longer ours (taken over or ended)
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        from kdlab.store.database import Store

        store = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    if store is None:
                        # The claiming process checked the database when it opened it; no second check here.
                        store = Store(self.workspace, heartbeat_timeout=self.timeout, check=False)
                    if not store.heartbeat(self.run_id):
                        self.lost.set()  # the trainer checks this after each epoch and stops writing
                        return
                except (sqlite3.Error, KdlabError, OSError):
                    pass  # retried at the next beat
        finally:
            if store is not None:
                store.close()

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._beat, name=f"kdlab-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

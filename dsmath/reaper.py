"""A watchdog that ends what a process started when that process ends — also when it is SIGKILLed.

A local Ray cluster started by ``ray.init()`` shares its driver's fate only in part: the GCS server and raylet die
with the driver (Linux parent-death signal), but the raylet's own children (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``, idle workers) outlive a SIGKILLed driver: their parent check exits only after reporting to
the dead GCS, which blocks. :func:`start_reaper` starts a small process, in its own session, that records the
watched process's descendants every ``interval_s`` and, once that process is gone, terminates every recorded one
still alive (SIGTERM, then SIGKILL after ``grace_s``); then it exits.

Guaranteed: only processes that were descendants of the watched process when last recorded are signalled, each
checked by pid *and* start time (a reused pid is left alone). Not guaranteed: a process started and orphaned
within one interval is missed; processes on other machines are not touched (a joined cluster is never reaped:
callers start a reaper only for a cluster they started). No Ray import: any process tree can be watched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

INTERVAL_S = 0.5
GRACE_S = 3.0


def start_reaper(pid: int | None = None, *, interval_s: float = INTERVAL_S) -> subprocess.Popen:
    """Watch ``pid`` (default: this process) from a child process in its own session (a Ctrl-C or a kill of the
    terminal's process group does not end the watchdog before the work it must clean up). Its output goes nowhere:
    a caller reading this process's stdout to its end is never held open by the watchdog."""
    watched = os.getpid() if pid is None else pid
    return subprocess.Popen([sys.executable, "-m", "dsmath.reaper", str(watched), str(interval_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env={**os.environ, "PYTHONPATH": _path()})


def _path() -> str:
    """This checkout first on the watchdog's path (the module must import the same ``dsmath`` as its parent)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


def watch(pid: int, interval_s: float = INTERVAL_S, grace_s: float = GRACE_S) -> list[int]:
    """Record ``pid``'s descendants until it is gone, then end the recorded ones still alive; returns their pids."""
    import psutil

    try:
        watched = psutil.Process(pid)
        born = watched.create_time()
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, float] = {}  # pid -> start time
    while _alive(watched, born):
        try:
            for child in watched.children(recursive=True):
                if child.pid != os.getpid():
                    seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass  # the tree changed while it was read: the next round sees it
        time.sleep(interval_s)
    return end(seen, grace_s)


def _alive(proc, born: float) -> bool:
    import psutil

    try:
        return proc.create_time() == born and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end(seen: dict[int, float], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every process of ``seen`` (pid -> start time) still running as that process, SIGKILL those left
    after ``grace_s``; returns the pids signalled."""
    import psutil

    procs = []
    for pid, started in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=grace_s)
    return [p.pid for p in procs]


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else INTERVAL_S)

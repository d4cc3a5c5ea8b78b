"""Helpers for tests that start their own Ray nodes with `ray start --block` (test_job_submit, test_two_nodes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


def pymp_socket_dirs(session: int) -> set[Path]:
    """The ``pymp-*`` folders holding a Unix socket that a process of ``session`` has open (Linux; elsewhere none).

    Ray's dashboard starts its modules through a multiprocessing forkserver, whose socket folder in the temp dir goes
    only with a clean exit, which a stopped head never has."""
    try:
        unix = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    paths = {}
    for line in unix:
        fields = line.split()
        if len(fields) > 7 and "/pymp-" in fields[7]:
            paths[fields[6]] = Path(fields[7]).parent  # socket inode -> its folder
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat[stat.rfind(")") + 2:].split()[3]) != session:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in paths:
                    held.add(paths[target[8:-1]])
        except OSError:  # the process ended meanwhile
            continue
    return held


def stop_ray_start(proc: subprocess.Popen) -> None:
    """Stop a blocking `ray start` started in its own session: SIGTERM (it shuts down the processes it started),
    then SIGKILL to whatever of its process group is left, then remove the socket folders its processes held in the
    temp dir (:func:`pymp_socket_dirs`)."""
    left = pymp_socket_dirs(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for folder in left:
        shutil.rmtree(folder, ignore_errors=True)

"""Helpers for tests that start their own Ray nodes with `ray start --block` (test_job_submit, test_two_nodes)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_ray_start(proc: subprocess.Popen) -> None:
    """Stop a blocking `ray start` started in its own session: SIGTERM (it shuts down the processes it started),
    then SIGKILL to whatever of its process group is left."""
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

"""`cluster/jobs/local_cluster.sh stop` on a real Ray head leaves nothing of the head in the temp dir.

Ray's dashboard starts its modules through a multiprocessing forkserver, whose socket folder (``pymp-*`` in the temp
dir) goes only with a clean exit, which a stopped head never has: each start/stop left one behind. The script's
``stop`` notes the folders the head's processes listen in and removes them once the head is gone. Checked on the
folders this head's processes hold (found through /proc), never on the temp dir as a whole: other tests' processes may
make their own meanwhile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_nodes import pymp_socket_dirs
from test_job_submit import free_ports

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "jobs" / "local_cluster.sh"


@pytest.mark.skipif(not Path("/proc/net/unix").exists(), reason="Linux only: reads the head's sockets from /proc")
def test_stop_removes_the_socket_folders_the_heads_dashboard_leaves_in_the_temp_dir() -> None:
    state = tempfile.mkdtemp(prefix="dlc", dir="/tmp")  # short: the script's limit for Ray's socket paths
    dashboard, gcs = free_ports(2)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DSMATH_LOCAL_CLUSTER_DIR": state, "DASHBOARD_PORT": str(dashboard), "RAY_PORT": str(gcs), "NUM_CPUS": "1"}

    def script(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=180)

    try:
        started = script("start")
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        held = pymp_socket_dirs(int((Path(state) / "head.pid").read_text()))
        assert held, "the head's processes hold no pymp-* socket folder (has Ray's dashboard changed?)"
        stopped = script("stop")
        assert stopped.returncode == 0 and "local Ray head stopped" in stopped.stdout, stopped.stderr[-2000:]
        assert sorted(str(d) for d in held if d.exists()) == []
    finally:
        script("stop")
        shutil.rmtree(state, ignore_errors=True)

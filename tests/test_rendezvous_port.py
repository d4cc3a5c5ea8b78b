"""The one-rank learner's rendezvous port: chosen where no outgoing connection can take it, and taken again if
another process binds it first (CI once lost a run to ``EADDRINUSE`` between the check and the bind)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from dsmath.utils.net import _LOW, _ephemeral_low, free_port

ROOT = Path(__file__).resolve().parents[1]


def test_free_ports_lie_between_rays_worker_ports_and_the_ephemeral_range() -> None:
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 10  # drawn at random, not one fixed port
    if low - 1 - _LOW >= 1000:  # Linux with the usual 32768-60999 ephemeral range
        assert all(_LOW <= p < low for p in ports), (ports, low)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free when handed out


def test_a_one_rank_group_takes_another_port_when_its_first_is_taken() -> None:
    script = """
import os, socket, sys
import learner.engine as engine
squatter = socket.socket(); squatter.bind(("127.0.0.1", 0)); squatter.listen()
taken = squatter.getsockname()[1]
ports = iter([taken])
real = engine.free_port
engine.free_port = lambda: next(ports, None) or real()  # the first pick is a port someone else now holds
backend = engine.init_distributed(0, 1)
import torch.distributed as dist
print("RESULT", taken, os.environ["MASTER_PORT"], backend, dist.get_world_size())
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(ROOT)})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    _, taken, used, backend, world = line[0].split()
    assert used != taken and backend == "gloo" and world == "1"

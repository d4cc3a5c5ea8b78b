"""`dsmath sandbox run --address`: the service's failures are one-line user errors (exit 2), and a server that is
still starting is waited for (the README runs `serve &` then `run` at once)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

DSMATH = str(Path(sys.executable).with_name("dsmath"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(address: str, token: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSMATH_SANDBOX_TOKEN": token}
    return subprocess.run([DSMATH, "sandbox", "run", "--address", address, *extra, "-"], input="print(6 * 7)\n",
                          capture_output=True, text=True, env=env, timeout=120)


def test_dead_port_and_wrong_token_are_one_line_errors_and_a_starting_server_is_waited_for() -> None:
    port = _free_port()
    dead = _run(f"127.0.0.1:{port}", "x" * 20, "--connect-timeout", "1")
    assert dead.returncode == 2 and dead.stderr.count("\n") == 1 and "no sandbox service answered" in dead.stderr
    assert "Traceback" not in dead.stderr

    token = "t0ken-" + "a" * 26
    server = subprocess.Popen([DSMATH, "sandbox", "serve", "--port", str(port), "--workers", "1"],
                              env={**os.environ, "DSMATH_SANDBOX_TOKEN": token}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        ok = _run(f"127.0.0.1:{port}", token)  # issued while the server is still starting
        assert ok.returncode == 0 and ok.stdout == "42\n", ok.stderr
        wrong = _run(f"127.0.0.1:{port}", "w" * 24)
        assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "rejected the token" in wrong.stderr
        assert time.monotonic() - started < 60
    finally:
        server.terminate()
        server.wait(timeout=60)

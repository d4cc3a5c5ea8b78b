"""Network helpers shared by every layer."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's worker processes listen on 10002-19999 by default; the kernel hands out outgoing connections' local ports
# from its ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range, usually 32768-60999).
_LOW = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now, for a server another process binds a moment later (a rendezvous).

    Guaranteed: nothing listened on it when checked. Not guaranteed: that nothing binds it first. To make that
    unlikely on a busy machine, the port comes from below the kernel's ephemeral range and above Ray's worker
    ports, so the outgoing connections of Ray, gRPC or HTTP clients (which draw their local ports from the
    ephemeral range) cannot take it in between; where that range is unknown or too narrow, the kernel picks one.
    Prefer binding port 0 yourself where the API allows.
    """
    high = _ephemeral_low() - 1
    if high - _LOW >= 1000:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randint(_LOW, high)
            if _bindable(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

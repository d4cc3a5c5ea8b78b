"""Which sandbox reward code runs programs on: the process's local pool, or the gRPC service at an address.

Its own module so that the pool (local) and the service (gRPC, which runs a pool) never import each other.
"""

from __future__ import annotations

from dsmath.sandbox.pool import default_pool


def runner_for(address: str = "", token: str | None = None):
    """What reward code should call ``run(...)`` on: the default local pool, or a SandboxClient for
    ``address`` (e.g. ``reward.sandbox_address``; token from $DSMATH_SANDBOX_TOKEN when not given)."""
    if not address:
        return default_pool()
    from dsmath.sandbox.service import SandboxClient

    return SandboxClient(address, token)

"""``gloo``: the collective transport (:mod:`dsmath.transports.collective`) over ``ProcessGroupGloo`` — the CPU
analogue of NCCL. Host buffers on both sides; receivers stage the buckets and load them all at the end."""

from __future__ import annotations

from dsmath.transports.collective import CollectiveTransport


def GlooTransport() -> CollectiveTransport:  # noqa: N802 - the registry's factory, named like the other classes
    return CollectiveTransport("gloo", streams=False)

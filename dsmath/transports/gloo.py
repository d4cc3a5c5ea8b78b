"""``gloo``: the collective transport (:mod:`dsmath.transports.collective`) over ``ProcessGroupGloo`` — the CPU
analogue of NCCL. Host buffers on both sides; receivers stage the buckets and load them all at the end."""

from __future__ import annotations

from functools import partial

from dsmath.transports.collective import CollectiveTransport

GlooTransport = partial(CollectiveTransport, "gloo", streams=False)

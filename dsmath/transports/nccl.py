"""``nccl``: the collective transport (:mod:`dsmath.transports.collective`) over ``ProcessGroupNCCL`` between GPUs
(registered with ``needs_gpu``). The sender packs on its GPU, each receiver broadcasts into a buffer on its own;
receivers stream each bucket into the engine as it arrives (one bucket held at a time)."""

from __future__ import annotations

from functools import partial

from dsmath.transports.collective import CollectiveTransport

NcclTransport = partial(CollectiveTransport, "nccl", streams=True)

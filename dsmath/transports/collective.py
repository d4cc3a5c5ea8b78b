"""The collective transports' shared machinery (``gloo``, ``nccl``): a process group of its own between the sender
(rank 0) and every receiver (ranks 1..N) over a ``TCPStore``; per bucket one metadata RPC per receiver plus one
``broadcast`` from rank 0 into a buffer each receiver allocates on its device.

Not a transport itself: :mod:`dsmath.transports.gloo` and :mod:`dsmath.transports.nccl` each make a
:class:`CollectiveTransport` with their backend. ``torch.distributed`` is imported inside the functions.

Guaranteed: a group is formed once per set of receivers and reused; a broadcast that fails (a dead peer) or a
timeout drops the sender's group, and the next send forms a new one (receivers drop theirs when they join anew).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from dsmath.records import WeightBucket
from dsmath.weight_wire import BucketLayout, WeightSyncError, WeightSyncTimeout, empty_bucket


def open_store(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """The rendezvous ``TCPStore``: rank 0 hosts it (returns at once), the others connect (retrying until
    ``timeout_s``)."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def arrived_key(rank: int) -> str:
    return f"dsmath_weight_sync/arrived/{rank}"


@dataclass
class CollectiveGroup:
    group: Any
    store: Any


def open_group(store, rank: int, world_size: int, backend: str, timeout_s: float) -> CollectiveGroup:
    """A process group of its own over ``store`` (not torch.distributed's default group, which vLLM already
    owns in-process). Blocks until every rank joined or ``timeout_s`` passed. Before blocking, a rank > 0 marks
    itself arrived in the store so that rank 0 can name the ranks that never came."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if rank > 0:
        store.set(arrived_key(rank), "1")
    prefixed = dist.PrefixStore(f"dsmath_weight_sync/{backend}", store)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        raise ValueError(f"no process group for backend {backend!r}")
    return CollectiveGroup(group, store)  # the store must live as long as the group


def broadcast_from_rank0(group: CollectiveGroup, tensor: torch.Tensor, timeout_s: float) -> None:
    """``broadcast`` in ``group`` with root 0, waiting at most ``timeout_s`` (raises RuntimeError on timeout)."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    options.timeout = timedelta(seconds=timeout_s)
    work = group.group.broadcast([tensor], options)
    work.wait(timedelta(seconds=timeout_s))


class CollectiveTransport:
    """Both sides of a broadcast transport over ``backend`` (``"gloo"`` or ``"nccl"``). ``group``: the sender's or
    this receiver's :class:`CollectiveGroup` (None until formed / joined)."""

    lends_memory = False

    def __init__(self, backend: str, *, streams: bool):
        self.backend = backend
        self.streams = streams
        self.group: CollectiveGroup | None = None
        self.members: tuple[str, ...] = ()

    # -- send side ----------------------------------------------------------------------------------------

    def connect(self, link) -> float:
        """Form the group with ``link``'s receivers unless it already exists. Returns seconds spent."""
        if self.group is not None and link.members == self.members:
            return 0.0
        self.close()
        start = time.monotonic()
        host = link.host()
        timeout_s = link.remaining()
        world_size = len(link.names) + 1
        # Bind the store first on a kernel-chosen port, then tell the receivers: picking a "free" port and
        # binding it later races with every other process on the machine (EADDRINUSE).
        store = open_store(host, 0, 0, world_size, timeout_s)
        what = f"joining the {self.backend} group"
        pending = link.call_each("join_weight_group", [(host, store.port, rank, world_size, self.backend, timeout_s)
                                                       for rank in range(1, world_size)])
        try:
            group = open_group(store, 0, world_size, self.backend, timeout_s)
        except Exception as exc:  # noqa: BLE001 - name the ranks that never arrived
            late = [n for rank, n in enumerate(link.names, start=1) if not store.check([arrived_key(rank)])]
            if late:
                raise WeightSyncTimeout(what, late, link.timeout_s) from exc
            raise WeightSyncError(f"opening the {self.backend} weight-sync group failed: {exc}") from exc
        link.wait(pending, what)
        self.group, self.members = group, link.members
        return time.monotonic() - start

    def send_bucket(self, link, flat: torch.Tensor, record: WeightBucket, layout: BucketLayout, what: str) -> None:
        pending = link.call("receive_bucket", record, layout, None)  # the receivers enter the broadcast
        try:
            broadcast_from_rank0(self.group, flat, link.remaining())
        except Exception as exc:  # noqa: BLE001 - a dead peer breaks the collective: name it
            self.close()
            link.wait(pending, what)
            raise WeightSyncError(f"{self.backend} broadcast of {what} failed: {exc}") from exc
        link.wait(pending, what)

    def close(self) -> None:
        self.group, self.members = None, ()

    # -- receive side -------------------------------------------------------------------------------------

    def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self.group = None
        store = open_store(host, port, rank, world_size, timeout_s)
        self.group = open_group(store, rank, world_size, self.backend, timeout_s)

    def open_bucket(self, owner: str, layout: BucketLayout, payload: Any, device: torch.device,
                    timeout_s: float) -> torch.Tensor:
        if self.group is None:
            raise WeightSyncError(f"{owner}: {self.backend} bucket but no group joined")
        flat = empty_bucket(layout, device)  # the collective's buffer lives on the transport's device
        broadcast_from_rank0(self.group, flat, timeout_s)
        return flat

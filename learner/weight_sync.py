"""Versioned, bucketed weight sync from the learner's rank-0 process to the generators.

One sender interface, four transports:

``object_store``  each bucket is one flat tensor ``ray.put`` once, then one RPC per generator (CPU / tests).
``gloo``          a ``ProcessGroupGloo`` over a ``TCPStore`` between the sender (rank 0) and every generator
                  process (ranks 1..N): per bucket one metadata RPC + one ``broadcast`` (the CPU analogue of NCCL).
``nccl``          the same shape with ``ProcessGroupNCCL`` and CUDA buffers (GPU only).
``cuda_ipc``      colocated GPU: the bucket's CUDA buffer is shared by handle (``reduce_tensor``), no copy over
                  a wire; one RPC per generator per bucket (GPU only).

Wire format: the named tensors are grouped by dtype and packed, in the order given, into flat buffers of at most
``bucket_mb`` (a single tensor larger than that gets a bucket of its own). Each bucket travels with a
:class:`dsmath.records.WeightBucket` (version, index, count, names) plus a :class:`BucketLayout` (shapes, offsets).

Protocol (what a receiver, e.g. ``actors.generator.Generator``, implements)::

    begin_weight_update(version, num_buckets, transport, timeout_s) -> None  # refuses version != current + 1
    receive_bucket(bucket, layout, payload) -> float               # refuses out-of-order / wrong version
    finish_weight_update(version) -> float                         # applies, then switches version
    join_weight_group(host, port, rank, world_size, backend, timeout_s) -> None   # gloo / nccl only

Guarantees: every RPC and collective has a deadline (``WeightSyncConfig.timeout_s``); when it passes,
:class:`WeightSyncTimeout` names the receivers that did not answer. A receiver switches its version only after the
last bucket arrived and was applied. Not guaranteed: after a timeout the receivers that did answer hold a staged,
unapplied update (they keep their old weights and version and refuse further buckets until the next
``begin_weight_update``); the collective group is torn down and re-formed on the next send.

This module imports ``torch`` eagerly and ``ray`` only inside the functions that need it.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Mapping, Sequence

import torch

from dsmath.config import WeightSyncConfig
from dsmath.records import WeightBucket

TRANSPORTS = ("object_store", "gloo", "nccl", "cuda_ipc")


class WeightSyncError(RuntimeError):
    """A weight update was refused or could not complete."""


class WeightSyncTimeout(WeightSyncError):
    """A receiver did not answer within the deadline. ``.receivers`` names them."""

    def __init__(self, what: str, receivers: Sequence[str], timeout_s: float):
        self.what = what
        self.receivers = tuple(receivers)
        self.timeout_s = timeout_s
        super().__init__(
            f"weight sync: {what} not answered within {timeout_s:g}s by {', '.join(self.receivers)}"
        )

    def __reduce__(self):  # crosses Ray process boundaries: rebuild from the fields, not the message
        return (type(self), (self.what, self.receivers, self.timeout_s))


class StaleWeightVersion(WeightSyncError):
    """A version that is not the one expected (stale sampling, out-of-order update)."""


# ------------------------------------------------------------------------------------------- wire format


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor lives inside one flat bucket buffer (element offsets, one dtype)."""

    dtype: str
    numel: int
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class PlannedBucket:
    names: tuple[str, ...]
    layout: BucketLayout


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype {name!r} in a weight bucket")
    return dtype


def plan_buckets(named_tensors: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[PlannedBucket]:
    """Group tensors by dtype (first-seen order) and pack each group greedily into buckets of ≤ ``bucket_bytes``.

    Metadata only: no tensor data is touched. A tensor larger than ``bucket_bytes`` gets its own bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise WeightSyncError(f"tensor {name!r} appears twice in the weights to send")
        seen.add(name)
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    buckets: list[PlannedBucket] = []
    for dtype, items in by_dtype.items():
        element_size = torch.empty((), dtype=dtype).element_size()
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        offsets: list[int] = []
        numel = 0

        def flush() -> None:
            nonlocal names, shapes, offsets, numel
            if names:
                layout = BucketLayout(_dtype_name(dtype), numel, tuple(shapes), tuple(offsets))
                buckets.append(PlannedBucket(tuple(names), layout))
            names, shapes, offsets, numel = [], [], [], 0

        for name, tensor in items:
            if names and (numel + tensor.numel()) * element_size > bucket_bytes:
                flush()
            names.append(name)
            shapes.append(tuple(tensor.shape))
            offsets.append(numel)
            numel += tensor.numel()
        flush()
    return buckets


def pack_bucket(tensors: Sequence[torch.Tensor], layout: BucketLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """One flat buffer holding ``tensors`` at ``layout.offsets`` (a copy, on ``device``)."""
    flat = torch.empty(layout.numel, dtype=_dtype_of(layout.dtype), device=device)
    for tensor, offset in zip(tensors, layout.offsets):
        flat[offset : offset + tensor.numel()].copy_(tensor.detach().reshape(-1))
    return flat


def unpack_bucket(flat: torch.Tensor, names: Sequence[str], layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """Views into ``flat``, one per tensor, with their original shapes (no copy)."""
    if flat.numel() != layout.numel or _dtype_name(flat.dtype) != layout.dtype:
        raise WeightSyncError(
            f"bucket buffer is {flat.numel()} x {_dtype_name(flat.dtype)}, layout says {layout.numel} x {layout.dtype}"
        )
    out = []
    for name, shape, offset in zip(names, layout.shapes, layout.offsets):
        numel = math.prod(shape)
        out.append((name, flat[offset : offset + numel].view(shape)))
    return out


def empty_bucket(layout: BucketLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(layout.numel, dtype=_dtype_of(layout.dtype), device=device)


# ---------------------------------------------------------------------------------------- process groups


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_ip() -> str:
    """An address of this host that other Ray nodes can reach (127.0.0.1 on a single machine)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - fall back to loopback: tests and single-node runs
        pass
    return "127.0.0.1"


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


def open_group(store, rank: int, world_size: int, backend: str, timeout_s: float):
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


# ----------------------------------------------------------------------------------------------- sender


@dataclass
class SyncStats:
    """What one ``send`` cost. ``pause_s``: from the first begin RPC until every receiver switched version
    (generators refuse to sample in this window); ``transfer_s``: time inside puts / RPCs / collectives of
    the buckets; ``pack_s``: flattening into buckets; ``apply_s``: the slowest receiver's in-engine load."""

    version: int
    transport: str
    num_receivers: int
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    pause_s: float = 0.0
    transfer_s: float = 0.0
    pack_s: float = 0.0
    apply_s: float = 0.0
    setup_s: float = 0.0
    per_bucket_bytes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("per_bucket_bytes")
        return d


def _receiver_names(receivers: Sequence[Any] | Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    if isinstance(receivers, Mapping):
        return list(receivers.keys()), list(receivers.values())
    names = []
    for i, handle in enumerate(receivers):
        actor_id = getattr(handle, "_actor_id", None)
        names.append(f"receiver[{i}] (actor {actor_id.hex()[:12]})" if actor_id is not None else f"receiver[{i}]")
    return names, list(receivers)


def _wait_all(refs: list, names: list[str], what: str, deadline: float, timeout_s: float) -> list:
    """``ray.get`` of ``refs`` before ``deadline``; a :class:`WeightSyncTimeout` names those that did not answer."""
    import ray

    remaining = max(0.0, deadline - time.monotonic())
    ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=remaining)
    if not_ready:
        missing = {r.hex() for r in not_ready}
        raise WeightSyncTimeout(what, [n for n, r in zip(names, refs) if r.hex() in missing], timeout_s)
    return ray.get(refs)


class WeightSender:
    """Pushes named tensors to receivers, bucketed and versioned. Construct one per learner rank-0 process.

    ``send`` is synchronous: it returns when every receiver applied the new weights and switched version, or
    raises :class:`WeightSyncTimeout` / :class:`WeightSyncError`. Not thread-safe: one send at a time.
    """

    def __init__(self, cfg: WeightSyncConfig, *, device: str | torch.device | None = None):
        if cfg.transport not in TRANSPORTS:
            raise ValueError(f"unknown weight-sync transport {cfg.transport!r}; one of {', '.join(TRANSPORTS)}")
        if cfg.transport in ("nccl", "cuda_ipc") and not torch.cuda.is_available():
            raise WeightSyncError(f"transport {cfg.transport!r} needs a CUDA GPU; use 'gloo' or 'object_store' on CPU")
        self.cfg = cfg
        self.transport = cfg.transport
        self.bucket_bytes = max(1, int(cfg.bucket_mb * 1024 * 1024))
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if cfg.transport in ("nccl", "cuda_ipc") else torch.device("cpu")
        )
        self._group = None
        self._group_members: tuple[str, ...] = ()

    # -- collective group -------------------------------------------------------------------------------

    def _ensure_group(self, names: list[str], handles: list[Any], deadline: float) -> float:
        """Form the gloo/nccl group with these receivers unless it already exists. Returns seconds spent."""
        key = tuple(h._actor_id.hex() if hasattr(h, "_actor_id") else n for n, h in zip(names, handles))
        if self._group is not None and key == self._group_members:
            return 0.0
        self.close()
        start = time.monotonic()
        host = local_ip()
        timeout_s = max(0.1, deadline - time.monotonic())
        backend = self.transport
        # Bind the store first on a kernel-chosen port, then tell the receivers: picking a "free" port and
        # binding it later races with every other process on the machine (EADDRINUSE).
        store = open_store(host, 0, 0, len(handles) + 1, timeout_s)
        port = store.port
        refs = [
            h.join_weight_group.remote(host, port, rank + 1, len(handles) + 1, backend, timeout_s)
            for rank, h in enumerate(handles)
        ]
        try:
            group = open_group(store, 0, len(handles) + 1, backend, timeout_s)
        except Exception as exc:  # noqa: BLE001 - name the ranks that never arrived
            late = [n for rank, n in enumerate(names, start=1) if not store.check([arrived_key(rank)])]
            if late:
                raise WeightSyncTimeout(f"joining the {backend} group", late, self.cfg.timeout_s) from exc
            raise WeightSyncError(f"opening the {backend} weight-sync group failed: {exc}") from exc
        _wait_all(refs, names, f"joining the {backend} group", deadline, self.cfg.timeout_s)
        self._group = group
        self._group_members = key
        return time.monotonic() - start

    def close(self) -> None:
        """Drop the collective group (receivers drop theirs when they join a new one)."""
        self._group = None
        self._group_members = ()

    # -- send -------------------------------------------------------------------------------------------

    def send(
        self,
        named_weights: Iterable[tuple[str, torch.Tensor]],
        version: int,
        receivers: Sequence[Any] | Mapping[str, Any],
    ) -> SyncStats:
        """Send ``named_weights`` as policy ``version`` to every receiver (Ray actor handles; a mapping gives
        them names for error messages). Each receiver must currently be at ``version - 1``."""
        import ray

        names, handles = _receiver_names(receivers)
        if not handles:
            raise WeightSyncError("weight sync needs at least one receiver")
        start = time.monotonic()
        deadline = start + self.cfg.timeout_s
        timeout_s = self.cfg.timeout_s
        named = [(n, t) for n, t in named_weights]
        plan = plan_buckets(named, self.bucket_bytes)
        tensors = dict(named)
        stats = SyncStats(version=version, transport=self.transport, num_receivers=len(handles),
                          buckets=len(plan), tensors=len(named))
        collective = self.transport in ("gloo", "nccl")
        try:
            if collective:
                stats.setup_s = self._ensure_group(names, handles, deadline)
            pause_start = time.monotonic()
            _wait_all([h.begin_weight_update.remote(version, len(plan), self.transport, timeout_s) for h in handles],
                      names, f"begin_weight_update(version={version})", deadline, timeout_s)
            for index, planned in enumerate(plan):
                t0 = time.monotonic()
                flat = pack_bucket([tensors[n] for n in planned.names], planned.layout, self.device)
                stats.pack_s += time.monotonic() - t0
                stats.bytes += flat.numel() * flat.element_size()
                stats.per_bucket_bytes.append(flat.numel() * flat.element_size())
                record = WeightBucket(version=version, bucket_index=index, num_buckets=len(plan), names=planned.names)
                what = f"bucket {index + 1}/{len(plan)} of version {version}"
                t1 = time.monotonic()
                if self.transport == "object_store":
                    payload = ray.put(flat)
                    refs = [h.receive_bucket.remote(record, planned.layout, payload) for h in handles]
                    _wait_all(refs, names, what, deadline, timeout_s)
                    del payload
                elif collective:
                    refs = [h.receive_bucket.remote(record, planned.layout, None) for h in handles]
                    try:
                        broadcast_from_rank0(self._group, flat, max(0.1, deadline - time.monotonic()))
                    except Exception as exc:  # noqa: BLE001 - a dead peer breaks the collective: name it
                        self.close()
                        _wait_all(refs, names, what, deadline, timeout_s)
                        raise WeightSyncError(f"{self.transport} broadcast of {what} failed: {exc}") from exc
                    _wait_all(refs, names, what, deadline, timeout_s)
                else:  # cuda_ipc
                    from torch.multiprocessing.reductions import reduce_tensor

                    handle = reduce_tensor(flat)  # (rebuild function, args): pickles a CUDA IPC handle
                    refs = [h.receive_bucket.remote(record, planned.layout, handle) for h in handles]
                    # ``flat`` must outlive every receiver's copy: wait before it goes out of scope.
                    _wait_all(refs, names, what, deadline, timeout_s)
                stats.transfer_s += time.monotonic() - t1
            applied = _wait_all([h.finish_weight_update.remote(version) for h in handles],
                                names, f"finish_weight_update(version={version})", deadline, timeout_s)
            stats.apply_s = max(float(a) for a in applied)
            stats.pause_s = time.monotonic() - pause_start
        except WeightSyncTimeout:
            if collective:
                self.close()
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, StaleWeightVersion):
                raise StaleWeightVersion(str(cause)) from exc
            raise WeightSyncError(f"a receiver failed during the update to version {version}: {cause}") from exc
        stats.seconds = time.monotonic() - start
        return stats


def make_sender(cfg: WeightSyncConfig, *, device: str | torch.device | None = None) -> WeightSender:
    """The sender for ``cfg.transport``; construct it in the learner's rank-0 process (it holds the weights)."""
    return WeightSender(cfg, device=device)


# ---------------------------------------------------------------------------------------------- receiver


class BucketReceiver:
    """Receiver-side state machine: version checks, staged buckets, collective group membership.

    Buckets are staged (the received flat buffers are kept, views into them handed out at the end) so that the
    version switches atomically: ``finish`` returns every named tensor only when all buckets arrived.
    Memory: one extra copy of the weights on ``staging_device`` (host memory by default) while an update is in
    flight; on the accelerator at most one bucket. The engine then copies host -> device when applying.
    """

    def __init__(self, owner: str, device: str | torch.device = "cpu", staging_device: str | torch.device = "cpu"):
        self.owner = owner
        self.device = torch.device(device)
        self.staging_device = torch.device(staging_device)
        self.version = 0
        self._pending: int | None = None
        self._num_buckets = 0
        self._staged: list[tuple[str, torch.Tensor]] = []
        self._received = 0
        self._transport = ""
        self.timeout_s = 120.0
        self._group = None

    @property
    def updating(self) -> bool:
        return self._pending is not None

    def join_group(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self._group = None
        store = open_store(host, port, rank, world_size, timeout_s)
        self._group = open_group(store, rank, world_size, backend, timeout_s)

    def begin(self, version: int, num_buckets: int, transport: str, timeout_s: float = 120.0) -> None:
        if version != self.version + 1:
            raise StaleWeightVersion(
                f"{self.owner}: update to version {version} refused, it holds version {self.version} "
                f"(expected {self.version + 1})"
            )
        if transport not in TRANSPORTS:
            raise WeightSyncError(f"{self.owner}: unknown transport {transport!r}")
        self._pending, self._num_buckets, self._transport = version, num_buckets, transport
        self.timeout_s = timeout_s
        self._staged, self._received = [], 0

    def receive(self, bucket: WeightBucket, layout: BucketLayout, payload: Any) -> None:
        if self._pending is None or bucket.version != self._pending:
            raise StaleWeightVersion(
                f"{self.owner}: bucket of version {bucket.version} refused (holds {self.version}, "
                f"update in flight: {self._pending})"
            )
        if bucket.bucket_index != self._received or bucket.num_buckets != self._num_buckets:
            raise WeightSyncError(
                f"{self.owner}: bucket {bucket.bucket_index}/{bucket.num_buckets} out of order "
                f"(expected {self._received}/{self._num_buckets})"
            )
        if self._transport == "object_store":
            flat = payload
        elif self._transport in ("gloo", "nccl"):
            if self._group is None:
                raise WeightSyncError(f"{self.owner}: {self._transport} bucket but no group joined")
            flat = empty_bucket(layout, self.device)  # the collective's buffer lives on the transport's device
            broadcast_from_rank0(self._group, flat, self.timeout_s)
        else:  # cuda_ipc: rebuild the sender's buffer from its handle; copy out before the sender frees it
            rebuild, args = payload
            args = list(args)
            # args[6] is the device index in torch's CUDA rebuild signature; map it to this process's device.
            if len(args) > 6 and isinstance(args[6], int) and self.device.type == "cuda":
                args[6] = self.device.index if self.device.index is not None else torch.cuda.current_device()
            flat = rebuild(*args)
        if flat.device != self.staging_device or self._transport == "cuda_ipc":
            # Staging off the accelerator keeps its memory at one bucket, not one extra copy of the model.
            flat = flat.to(self.staging_device, copy=True)
        self._staged.extend(unpack_bucket(flat, bucket.names, layout))
        self._received += 1

    def finish(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """The staged tensors, once all buckets of ``version`` arrived. The caller applies them, then ``commit``."""
        if self._pending != version:
            raise StaleWeightVersion(f"{self.owner}: finish of version {version}, but {self._pending} is in flight")
        if self._received != self._num_buckets:
            raise WeightSyncError(
                f"{self.owner}: finish of version {version} after {self._received}/{self._num_buckets} buckets"
            )
        return self._staged

    def commit(self, version: int) -> None:
        self.version = version
        self._pending, self._staged, self._received = None, [], 0

    def abort(self) -> None:
        self._pending, self._staged, self._received = None, [], 0


# --------------------------------------------------------------------------------------- driver helper


def broadcast_weights(sender_actor: Any, generator_actors: Sequence[Any] | Mapping[str, Any], version: int,
                      cfg: WeightSyncConfig) -> SyncStats:
    """Driver side: ask ``sender_actor`` (an actor exposing ``sync_weights(version, receivers)`` that calls
    :meth:`WeightSender.send` in its process) to push ``version`` to ``generator_actors``.

    The sender issues the receivers' RPCs itself, concurrently with its own side of every collective; this
    helper only bounds the whole exchange by ``cfg.timeout_s`` (plus a small margin for the sender to report
    which receiver timed out) and surfaces the sender's own error unchanged.
    """
    import ray

    ref = sender_actor.sync_weights.remote(version, generator_actors)
    ready, _ = ray.wait([ref], timeout=cfg.timeout_s + 10.0)
    if not ready:
        raise WeightSyncTimeout(f"sync_weights(version={version})", ["the weight sender"], cfg.timeout_s)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, WeightSyncError):
            raise cause from None
        raise

"""The weight-sync wire: bucket format, receiver state machine and weight-sync process groups (torch only).

Shared by the sender (:mod:`learner.weight_sync`, in the learner's rank-0 process) and every receiver
(:mod:`actors.generator`, the benches, tests), so that a receiver imports neither the learner nor Ray: this module
imports ``torch`` and ``dsmath`` only (``torch.distributed`` inside the functions that form groups).

Wire format: the named tensors are grouped by *wire dtype* and packed, in the order given, into flat buffers of at
most ``bucket_bytes`` (a single tensor larger than that gets a bucket of its own). The wire dtype of a floating
tensor is the receiver's dtype when the receiver announced one (a bf16 engine gets bf16: half the bytes of fp32),
else the tensor's own; integer and bool tensors travel as they are. Each bucket travels with a
:class:`dsmath.records.WeightBucket` (version, index, count, names) plus a :class:`BucketLayout` (shapes, offsets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch

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


def wire_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` travels in when the receiver wants ``target`` (None: as it is).
    Only floating tensors are cast; integer and bool tensors (step counters, masks) keep their dtype."""
    return target if target is not None and dtype.is_floating_point else dtype


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    return _dtype_of(str(name).removeprefix("torch."))


def plan_buckets(named_tensors: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int,
                 target_dtype: torch.dtype | None = None) -> list[PlannedBucket]:
    """Group tensors by wire dtype (:func:`wire_dtype`, first-seen order) and pack each group greedily into
    buckets of ≤ ``bucket_bytes`` wire bytes.

    Metadata only: no tensor data is touched (shapes and dtypes only, so a ZeRO-3 placeholder would do as well as
    the full tensor). A tensor larger than ``bucket_bytes`` gets its own bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise WeightSyncError(f"tensor {name!r} appears twice in the weights to send")
        seen.add(name)
        by_dtype.setdefault(wire_dtype(tensor.dtype, target_dtype), []).append((name, tensor))
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


def layout_bytes(layout: BucketLayout) -> int:
    """Bytes of one bucket on the wire."""
    return layout.numel * torch.empty((), dtype=_dtype_of(layout.dtype)).element_size()


def pack_bucket(tensors: Sequence[torch.Tensor], layout: BucketLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """One flat buffer holding ``tensors`` at ``layout.offsets`` (a copy, on ``device``), in ``layout.dtype``:
    each tensor is cast while it is copied in (fp32 -> bf16 rounds to nearest even), so a cast costs no
    buffer beyond the bucket itself."""
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


# ------------------------------------------------------------------------------------------------ cuda_ipc


def cuda_uuid(device: torch.device | int | None = None) -> str:
    """The physical GPU's UUID (the same in every process, whatever ``CUDA_VISIBLE_DEVICES`` calls it)."""
    index = device.index if isinstance(device, torch.device) else device
    return str(torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).uuid)


def cuda_ipc_payload(flat: torch.Tensor) -> tuple[str, tuple]:
    """What travels for one ``cuda_ipc`` bucket: the sender's GPU UUID and torch's ``reduce_tensor`` of ``flat``
    (a CUDA IPC handle, no data). ``flat`` must stay alive until every receiver finished with the bucket."""
    from torch.multiprocessing.reductions import reduce_tensor

    return cuda_uuid(flat.device), reduce_tensor(flat)


def open_cuda_ipc(payload: tuple[str, tuple], device: torch.device) -> torch.Tensor:
    """The sender's bucket as a tensor on this process's ``device``, mapping the sender's memory (no copy).

    Refused (one line) when the sender's buffer is on another GPU: CUDA IPC shares memory, it does not move it."""
    sender_uuid, (rebuild, args) = payload
    index = device.index if device.index is not None else torch.cuda.current_device()
    if cuda_uuid(index) != sender_uuid:
        raise WeightSyncError(f"cuda_ipc: the sender's bucket is on GPU {sender_uuid}, this receiver is on "
                              f"{cuda_uuid(index)}; use transport 'nccl' between GPUs")
    args = list(args)
    args[6] = index  # the device index in torch's CUDA rebuild signature: this process's numbering
    return rebuild(*args)


# ---------------------------------------------------------------------------------------------- receiver

DEVICE_TRANSPORTS = ("cuda_ipc", "nccl")


class BucketReceiver:
    """Receiver-side state machine: version checks, bucket order, collective group membership, and where a
    received bucket lives.

    Two ways to hand buckets to the engine, chosen per update from the transport (``stream=None``) or forced:

    * **staged** (``object_store``, ``gloo``): the buckets are kept (on ``staging_device``, host memory by default)
      and :meth:`finish` returns every named tensor once all arrived; the engine then loads them in one call.
      Memory: one extra copy of the weights while an update is in flight.
    * **streamed** (``cuda_ipc``, ``nccl``): :meth:`receive` returns the bucket's named tensors on the device
      (``cuda_ipc``: views of the sender's memory, no copy; ``nccl``: views of one buffer the broadcast filled),
      the caller loads them into the engine before the next call, and the receiver drops the bucket when the next
      one arrives (before anything is allocated for it), at :meth:`finish` and at :meth:`abort`. Guaranteed: this
      receiver references at most one bucket at a time (``held_buckets`` ≤ 1) and never copies it to the host.
      Not guaranteed: that the engine releases its own references (vLLM's layer-wise reload may keep the tensors
      of a layer split across two buckets until its last piece arrives). The engine's weights change bucket by
      bucket: the caller must not sample until :meth:`commit` (``updating`` says so).

    ``dtype`` is the dtype this receiver's engine holds its floating weights in; the sender asks for it
    (:meth:`wire_dtype`) and casts before sending. None: take whatever is sent.
    """

    def __init__(self, owner: str, device: str | torch.device = "cpu", staging_device: str | torch.device = "cpu",
                 *, dtype: str | torch.dtype | None = None, stream: bool | None = None):
        self.owner = owner
        self.device = torch.device(device)
        self.staging_device = torch.device(staging_device)
        self.dtype = parse_dtype(dtype)
        self.stream_mode = stream
        self.version = 0
        self._pending: int | None = None
        self._num_buckets = 0
        self._staged: list[tuple[str, torch.Tensor]] = []
        self._held: torch.Tensor | None = None  # streamed mode: the one bucket buffer this receiver references
        self.max_held_buckets = 0  # the most buckets ever referenced at once (streamed mode): at most 1
        self._received = 0
        self._transport = ""
        self.timeout_s = 120.0
        self._group = None

    @property
    def updating(self) -> bool:
        return self._pending is not None

    @property
    def streaming(self) -> bool:
        """Whether the update in flight (or the last one) hands buckets out one at a time."""
        return self.stream_mode if self.stream_mode is not None else self._transport in DEVICE_TRANSPORTS

    @property
    def held_buckets(self) -> int:
        return int(self._held is not None)

    def wire_dtype(self) -> str | None:
        """The dtype the sender should cast floating weights to (``"bfloat16"``...), or None for as-is."""
        return _dtype_name(self.dtype) if self.dtype is not None else None

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
        self._staged, self._received, self._held = [], 0, None

    def _check_next(self, bucket: WeightBucket) -> None:
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

    def _materialize(self, layout: BucketLayout, payload: Any) -> torch.Tensor:
        """The bucket's flat buffer, where the transport put it (no copy beyond the transport's own)."""
        if self._transport == "object_store":
            return payload
        if self._transport in ("gloo", "nccl"):
            if self._group is None:
                raise WeightSyncError(f"{self.owner}: {self._transport} bucket but no group joined")
            flat = empty_bucket(layout, self.device)  # the collective's buffer lives on the transport's device
            broadcast_from_rank0(self._group, flat, self.timeout_s)
            return flat
        return open_cuda_ipc(payload, self.device)  # cuda_ipc: the sender's memory, mapped

    def receive(self, bucket: WeightBucket, layout: BucketLayout, payload: Any) -> list[tuple[str, torch.Tensor]] | None:
        """Take the next bucket. Streamed: returns its named tensors (valid until the next call); staged: None."""
        self._check_next(bucket)
        self._held = None  # streamed: drop the previous bucket before the next one takes memory
        flat = self._materialize(layout, payload)
        if _dtype_name(flat.dtype) != layout.dtype:
            raise WeightSyncError(f"{self.owner}: bucket holds {flat.dtype}, layout says {layout.dtype}")
        self._received += 1
        if self.streaming:
            self._held = flat
            self.max_held_buckets = max(self.max_held_buckets, self.held_buckets)
            return unpack_bucket(flat, bucket.names, layout)
        if flat.device != self.staging_device or self._transport == "cuda_ipc":
            # Staging off the accelerator keeps its memory at one bucket, not one extra copy of the model;
            # a cuda_ipc bucket is the sender's memory, which it frees after this call.
            flat = flat.to(self.staging_device, copy=True)
        self._staged.extend(unpack_bucket(flat, bucket.names, layout))
        return None

    def finish(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """Staged: every tensor, once all buckets of ``version`` arrived (the caller applies them, then
        ``commit``). Streamed: [] (the buckets were handed out as they came); the last bucket is dropped."""
        if self._pending != version:
            raise StaleWeightVersion(f"{self.owner}: finish of version {version}, but {self._pending} is in flight")
        if self._received != self._num_buckets:
            raise WeightSyncError(
                f"{self.owner}: finish of version {version} after {self._received}/{self._num_buckets} buckets"
            )
        self._held = None
        return self._staged

    def commit(self, version: int) -> None:
        self.version = version
        self._pending, self._staged, self._received, self._held = None, [], 0, None

    def abort(self) -> None:
        self._pending, self._staged, self._received, self._held = None, [], 0, None

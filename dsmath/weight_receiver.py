"""The receiving side of a weight sync: :class:`BucketReceiver`, the state machine every generator (and test
receiver) runs behind its ``begin_weight_update`` / ``receive_bucket`` / ``finish_weight_update`` /
``join_weight_group`` methods. Transport-agnostic: the transport named in ``begin`` (looked up in
:mod:`dsmath.transports`) turns what ``receive_bucket`` got into the bucket's buffer. Imports torch and dsmath only.
"""

from __future__ import annotations

from typing import Any

import torch

from dsmath import transports
from dsmath.records import WeightBucket
from dsmath.weight_wire import (
    BucketLayout,
    StaleWeightVersion,
    WeightSyncError,
    dtype_name,
    parse_dtype,
    unpack_bucket,
)


class BucketReceiver:
    """Receiver-side state machine: version checks, bucket order, collective group membership, and where a
    received bucket lives.

    Two ways to hand buckets to the engine, chosen per update from the transport (its ``streams``; ``stream=None``)
    or forced:

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

    One transport instance per transport name is kept for the receiver's lifetime (a collective's group outlives
    an update); joining a group drops every other transport's state (one group at a time).
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
        self._transports: dict[str, transports.Transport] = {}
        self._transport: transports.Transport | None = None  # the one of the update in flight (or the last)
        self.timeout_s = 120.0

    @property
    def updating(self) -> bool:
        return self._pending is not None

    @property
    def streaming(self) -> bool:
        """Whether the update in flight (or the last one) hands buckets out one at a time."""
        if self.stream_mode is not None:
            return self.stream_mode
        return self._transport is not None and self._transport.streams

    @property
    def held_buckets(self) -> int:
        return int(self._held is not None)

    def wire_dtype(self) -> str | None:
        """The dtype the sender should cast floating weights to (``"bfloat16"``...), or None for as-is."""
        return dtype_name(self.dtype) if self.dtype is not None else None

    def transport(self, name: str) -> transports.Transport:
        """This receiver's instance of transport ``name`` (made on first use; ``WeightSyncError`` if unknown)."""
        if name not in self._transports:
            try:
                self._transports[name] = transports.create(name)
            except ValueError:
                raise WeightSyncError(f"{self.owner}: unknown transport {name!r}") from None
        return self._transports[name]

    def join_group(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        """Join the sender's ``backend`` group as ``rank`` (``join_weight_group``)."""
        joining = self.transport(backend)
        self._transports = {backend: joining}
        joining.join(host, port, rank, world_size, timeout_s)

    def begin(self, version: int, num_buckets: int, transport: str, timeout_s: float = 120.0) -> None:
        if version != self.version + 1:
            raise StaleWeightVersion(
                f"{self.owner}: update to version {version} refused, it holds version {self.version} "
                f"(expected {self.version + 1})"
            )
        self._transport = self.transport(transport)
        self._pending, self._num_buckets = version, num_buckets
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

    def receive(self, bucket: WeightBucket, layout: BucketLayout, payload: Any) -> list[tuple[str, torch.Tensor]] | None:
        """Take the next bucket. Streamed: returns its named tensors (valid until the next call); staged: None."""
        self._check_next(bucket)
        self._held = None  # streamed: drop the previous bucket before the next one takes memory
        # The bucket's flat buffer, where the transport put it (no copy beyond the transport's own).
        flat = self._transport.open_bucket(self.owner, layout, payload, self.device, self.timeout_s)
        if dtype_name(flat.dtype) != layout.dtype:
            raise WeightSyncError(f"{self.owner}: bucket holds {flat.dtype}, layout says {layout.dtype}")
        self._received += 1
        if self.streaming:
            self._held = flat
            self.max_held_buckets = max(self.max_held_buckets, self.held_buckets)
            return unpack_bucket(flat, bucket.names, layout)
        if flat.device != self.staging_device or self._transport.lends_memory:
            # Staging off the accelerator keeps its memory at one bucket, not one extra copy of the model;
            # a lent bucket (cuda_ipc) is the sender's memory, which it frees after this call.
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

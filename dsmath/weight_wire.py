"""The weight-sync wire format and errors, shared by the sender and every receiver (torch only).

Shared by the sender (:mod:`learner.weight_sync`, in the learner's rank-0 process), the transports
(:mod:`dsmath.transports`) and every receiver (:mod:`dsmath.weight_receiver`, used by :mod:`actors.generator`, the
benches, tests), so that a receiver imports neither the learner nor Ray: this module imports ``torch`` and
``dsmath`` only. How a bucket travels is a transport's business (:mod:`dsmath.transports`), not this module's.

Wire format: the named tensors are grouped by *wire dtype* and packed, in the order given, into flat buffers of at
most ``bucket_bytes`` (a single tensor larger than that gets a bucket of its own). The wire dtype of a floating
tensor is the receiver's dtype when the receiver announced one (a bf16 engine gets bf16: half the bytes of fp32),
else the tensor's own; integer and bool tensors travel as they are. Each bucket travels with a
:class:`dsmath.records.WeightBucket` (version, index, count, names) plus a :class:`BucketLayout` (shapes, offsets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


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


def dtype_name(dtype: torch.dtype) -> str:
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
                layout = BucketLayout(dtype_name(dtype), numel, tuple(shapes), tuple(offsets))
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
    if flat.numel() != layout.numel or dtype_name(flat.dtype) != layout.dtype:
        raise WeightSyncError(
            f"bucket buffer is {flat.numel()} x {dtype_name(flat.dtype)}, layout says {layout.numel} x {layout.dtype}"
        )
    out = []
    for name, shape, offset in zip(names, layout.shapes, layout.offsets):
        numel = math.prod(shape)
        out.append((name, flat[offset : offset + numel].view(shape)))
    return out


def empty_bucket(layout: BucketLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(layout.numel, dtype=_dtype_of(layout.dtype), device=device)

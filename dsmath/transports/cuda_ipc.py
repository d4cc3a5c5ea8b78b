"""``cuda_ipc``: colocated GPUs (registered with ``needs_gpu``). The sender packs each bucket on its GPU and sends
only a CUDA IPC handle (torch's ``reduce_tensor``) in the ``receive_bucket`` RPC; each receiver maps the sender's
buffer (no copy over a wire) and loads from it before answering. One RPC per receiver per bucket.

Receivers stream each bucket into the engine by default; a staging receiver copies it to host memory at once (the
buffer is the sender's, freed after the receivers answered). Refused in one line when the receiver's GPU is not
the sender's: CUDA IPC shares memory, it does not move it."""

from __future__ import annotations

from typing import Any

import torch

from dsmath.records import WeightBucket
from dsmath.weight_wire import BucketLayout, WeightSyncError


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


class CudaIpcTransport:
    streams = True
    lends_memory = True

    def connect(self, link) -> float:
        return 0.0

    def send_bucket(self, link, flat: torch.Tensor, record: WeightBucket, layout: BucketLayout, what: str) -> None:
        handle = cuda_ipc_payload(flat)  # the receivers map ``flat`` itself: a handle travels, not the bytes
        # ``flat`` must outlive every receiver's copy: wait before the caller lets it go.
        link.wait(link.call("receive_bucket", record, layout, handle), what)

    def close(self) -> None:
        pass

    def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        raise WeightSyncError("transport 'cuda_ipc' forms no process group")

    def open_bucket(self, owner: str, layout: BucketLayout, payload: Any, device: torch.device,
                    timeout_s: float) -> torch.Tensor:
        return open_cuda_ipc(payload, device)  # the sender's memory, mapped

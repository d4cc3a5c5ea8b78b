"""``object_store``: each bucket is stored once in the sender's object store (``SendLink.share``: one ``ray.put``)
and every receiver fetches it through its ``receive_bucket`` argument — one RPC per receiver per bucket. CPU
buffers; works between any processes the RPC fabric reaches (CPU runs, tests, restarted generators).

Receivers stage the buckets (the fetched buffer is theirs: no further copy on a CPU receiver)."""

from __future__ import annotations

from typing import Any

import torch

from dsmath.records import WeightBucket
from dsmath.weight_wire import BucketLayout, WeightSyncError


class ObjectStoreTransport:
    streams = False
    lends_memory = False

    def connect(self, link) -> float:
        return 0.0

    def send_bucket(self, link, flat: torch.Tensor, record: WeightBucket, layout: BucketLayout, what: str) -> None:
        payload = link.share(flat)  # one copy in the store, whatever the number of receivers
        link.wait(link.call("receive_bucket", record, layout, payload), what)
        del payload

    def close(self) -> None:
        pass

    def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        raise WeightSyncError("transport 'object_store' forms no process group")

    def open_bucket(self, owner: str, layout: BucketLayout, payload: Any, device: torch.device,
                    timeout_s: float) -> torch.Tensor:
        return payload  # already fetched by the RPC fabric (a read-only host tensor)

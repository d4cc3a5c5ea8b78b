"""Versioned, bucketed weight sync from the learner's rank-0 process to the generators.

One sender (:class:`WeightSender`), any registered transport: how a bucket travels — ``object_store``, ``gloo``,
``nccl``, ``cuda_ipc``, or one added later — is one module in :mod:`dsmath.transports` holding both its send and
its receive side; this module drives it through :class:`RayLink` (the receivers' RPCs, the object store and the
deadline, over Ray) and knows no transport by name.

Wire format: :mod:`dsmath.weight_wire`; receiver: :mod:`dsmath.weight_receiver` (the generators import neither
this module nor Ray). Tensors are packed in buckets of at most ``bucket_mb`` in the receivers' dtype: a
generator whose engine holds bfloat16 gets bfloat16 from an fp32 learner (half the bytes), cast per bucket on the
sender side.

ZeRO-3 with several learner ranks: gathering a parameter is a collective, so every rank must iterate the weights
for a sync; :func:`broadcast_weights` takes all ranks' actors (rank 0 sends, the others gather and drop). Rank 0
announces the shapes (``send(..., shapes=)``) and sends each bucket as soon as its parameters are gathered: it holds
about one bucket of them at a time, never the full weights.

Protocol (what a receiver, e.g. ``actors.generator.Generator``, implements)::

    weight_dtype() -> str | None                                   # optional: the dtype to send floats in
    begin_weight_update(version, num_buckets, transport, timeout_s) -> None  # refuses version != current + 1
    receive_bucket(bucket, layout, payload) -> float               # refuses out-of-order / wrong version
    finish_weight_update(version) -> float                         # applies, then switches version
    join_weight_group(host, port, rank, world_size, backend, timeout_s) -> None   # transports with a group

Guarantees: every RPC and collective has a deadline (``WeightSyncConfig.timeout_s``); when it passes,
:class:`WeightSyncTimeout` names the receivers that did not answer. A receiver switches its version only after the
last bucket arrived and was applied. Not guaranteed: after a timeout the receivers that did answer hold an
unfinished update (they keep their old version, refuse to sample and refuse further buckets until the next
``begin_weight_update``; a staged receiver also keeps its old weights, a streamed one — ``cuda_ipc``/``nccl`` —
may have loaded part of the new ones); the collective group is torn down and re-formed on the next send.

This module imports ``torch`` eagerly and ``ray`` only inside the functions that need it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from dsmath.config import WeightSyncConfig
from dsmath.records import WeightBucket
from dsmath import transports
from dsmath.weight_wire import (  # the wire format (shared with the receivers: dsmath/weight_receiver.py)
    PlannedBucket,
    StaleWeightVersion,
    WeightSyncError,
    WeightSyncTimeout,
    pack_bucket,
    parse_dtype,
    plan_buckets,
)


def local_ip() -> str:
    """An address of this host that other Ray nodes can reach (127.0.0.1 on a single machine)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - fall back to loopback: tests and single-node runs
        pass
    return "127.0.0.1"


# ----------------------------------------------------------------------------------------------- sender


@dataclass
class SyncStats:
    """What one ``send`` cost. ``pause_s``: from the first begin RPC until every receiver switched version
    (generators refuse to sample in this window); ``transfer_s``: time inside puts / RPCs / collectives of
    the buckets; ``pack_s``: flattening (and casting) into buckets; ``apply_s``: the slowest receiver's in-engine
    load. ``bytes``: what went on the wire per receiver (in ``wire_dtype``, e.g. ``"bfloat16"``, or
    ``"bfloat16+int64"`` when integer tensors travel too); ``source_bytes``: the same tensors in the learner's own
    dtypes; ``held_bytes``: the most of them the sender held at once (``source_bytes`` unless streamed, see
    :meth:`WeightSender.send`)."""

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
    source_bytes: int = 0
    held_bytes: int = 0
    wire_dtype: str = ""
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


class RayLink:
    """The :class:`dsmath.transports.SendLink` of one ``send`` over Ray: the receivers' actor handles, their RPCs
    and the object store, every wait bounded by the send's deadline."""

    def __init__(self, names: list[str], handles: list[Any], deadline: float, timeout_s: float):
        self.names, self.handles = names, handles
        self.members = _members_key(names, handles)
        self.deadline, self.timeout_s = deadline, timeout_s

    def remaining(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    def host(self) -> str:
        return local_ip()

    def share(self, obj: Any) -> Any:
        import ray

        return ray.put(obj)

    def call(self, method: str, *args: Any) -> list:
        return [getattr(h, method).remote(*args) for h in self.handles]

    def call_each(self, method: str, args: Sequence[tuple]) -> list:
        return [getattr(h, method).remote(*a) for h, a in zip(self.handles, args, strict=True)]

    def wait(self, pending: list, what: str) -> list:
        return _wait_all(pending, self.names, what, self.deadline, self.timeout_s)


class WeightSender:
    """Pushes named tensors to receivers, bucketed and versioned, over the transport ``cfg.transport`` names in
    :mod:`dsmath.transports`. Construct one per learner rank-0 process.

    ``send`` is synchronous: it returns when every receiver applied the new weights and switched version, or
    raises :class:`WeightSyncTimeout` / :class:`WeightSyncError`. Not thread-safe: one send at a time.
    """

    def __init__(self, cfg: WeightSyncConfig, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None):
        """``dtype``: send floating tensors in this dtype whatever the receivers say; None: ask the receivers
        (their ``weight_dtype()``; receivers without it get the tensors' own dtypes)."""
        entry = transports.info(cfg.transport)  # ValueError naming the registered ones
        if entry.needs_gpu and not torch.cuda.is_available():
            raise WeightSyncError(f"transport {cfg.transport!r} needs a CUDA GPU; use 'gloo' or 'object_store' on CPU")
        self.cfg = cfg
        self.transport = cfg.transport
        self.impl = transports.create(cfg.transport)  # the transport's send side (and its state: a group)
        self.bucket_bytes = max(1, int(cfg.bucket_mb * 1024 * 1024))
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if entry.needs_gpu else torch.device("cpu")
        )
        self.dtype = parse_dtype(dtype)
        self._dtype_cache: tuple[tuple[str, ...], torch.dtype | None] | None = None

    # -- receivers' dtype -------------------------------------------------------------------------------

    def _target_dtype(self, link: RayLink) -> torch.dtype | None:
        """The dtype every receiver wants floating weights in (asked once per set of receivers)."""
        if self.dtype is not None:
            return self.dtype
        if self._dtype_cache is not None and self._dtype_cache[0] == link.members:
            return self._dtype_cache[1]
        methods = [getattr(h, "weight_dtype", None) for h in link.handles]
        asked = [(n, m.remote()) for n, m in zip(link.names, methods) if m is not None]
        answers = _wait_all([r for _, r in asked], [n for n, _ in asked], "weight_dtype()", link.deadline,
                            self.cfg.timeout_s) if asked else []
        wanted = {parse_dtype(a) for a in answers}
        if len(asked) < len(link.handles):
            wanted.add(None)  # a receiver that does not say takes the tensors as they are
        if len(wanted) > 1:
            said = ", ".join(f"{n}: {a}" for (n, _), a in zip(asked, answers))
            raise WeightSyncError(f"weight sync: the receivers hold different dtypes ({said}); one sync sends one")
        target = wanted.pop() if wanted else None
        self._dtype_cache = (link.members, target)
        return target

    def close(self) -> None:
        """Drop the transport's state (a collective group; receivers drop theirs when they join a new one)."""
        self.impl.close()

    # -- send -------------------------------------------------------------------------------------------

    def send(
        self,
        named_weights: Iterable[tuple[str, torch.Tensor]],
        version: int,
        receivers: Sequence[Any] | Mapping[str, Any],
        *,
        shapes: Sequence[tuple[str, torch.Tensor]] | None = None,
    ) -> SyncStats:
        """Send ``named_weights`` as policy ``version`` to every receiver (Ray actor handles; a mapping gives
        them names for error messages). Each receiver must currently be at ``version - 1``.

        ``shapes``: every tensor's name, shape and dtype, in the order ``named_weights`` yields them (tensors on the
        ``meta`` device will do). Given, the buckets are planned from them and ``named_weights`` is consumed
        lazily, bucket by bucket (ZeRO-3: each parameter is gathered as its bucket is sent): the sender then holds
        one bucket's tensors plus any of another wire dtype that came early (their bucket is sent later), never
        all of them; the gathering then falls inside ``pause_s``. The bytes sent are the same either way. A
        tensor that does not match ``shapes``, or missing ones, raise :class:`WeightSyncError` mid-update (the
        receivers keep their version). ``named_weights`` is not necessarily consumed to its end."""
        import ray

        names, handles = _receiver_names(receivers)
        if not handles:
            raise WeightSyncError("weight sync needs at least one receiver")
        start = time.monotonic()
        timeout_s = self.cfg.timeout_s
        link = RayLink(names, handles, start + timeout_s, timeout_s)
        if shapes is None:
            named = [(n, t) for n, t in named_weights]
            specs, source = named, iter(named)
        else:
            specs, source = list(shapes), iter(named_weights)
        try:
            stats = self._send(link, specs, source, version, streamed=shapes is not None)
        except WeightSyncTimeout:
            self.close()
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, StaleWeightVersion):
                raise StaleWeightVersion(str(cause)) from exc
            raise WeightSyncError(f"a receiver failed during the update to version {version}: {cause}") from exc
        stats.seconds = time.monotonic() - start
        return stats

    def _send(self, link: RayLink, specs: list[tuple[str, torch.Tensor]], source: Iterator[tuple[str, torch.Tensor]],
              version: int, *, streamed: bool) -> SyncStats:
        """Plan, connect, begin, every bucket through the transport, finish; see :meth:`send`."""
        target = self._target_dtype(link)
        plan = plan_buckets(specs, self.bucket_bytes, target)
        source_bytes = sum(t.numel() * t.element_size() for _, t in specs)
        stats = SyncStats(version=version, transport=self.transport, num_receivers=len(link.handles),
                          buckets=len(plan), tensors=len(specs), source_bytes=source_bytes,
                          held_bytes=0 if streamed else source_bytes,
                          wire_dtype="+".join(sorted({b.layout.dtype for b in plan})))
        stats.setup_s = self.impl.connect(link)
        pause_start = time.monotonic()
        link.wait(link.call("begin_weight_update", version, len(plan), self.transport, link.timeout_s),
                  f"begin_weight_update(version={version})")
        for index, (planned, bucket) in enumerate(_plan_order(plan, specs, source, stats)):
            t0 = time.monotonic()
            flat = pack_bucket(bucket, planned.layout, self.device)  # [numel] in the wire dtype
            del bucket
            stats.pack_s += time.monotonic() - t0
            stats.bytes += flat.numel() * flat.element_size()
            stats.per_bucket_bytes.append(flat.numel() * flat.element_size())
            record = WeightBucket(version=version, bucket_index=index, num_buckets=len(plan), names=planned.names)
            t1 = time.monotonic()
            what = f"bucket {index + 1}/{len(plan)} of version {version}"
            self.impl.send_bucket(link, flat, record, planned.layout, what)
            stats.transfer_s += time.monotonic() - t1
            del flat  # every receiver has it: free it before the next bucket is gathered
        applied = link.wait(link.call("finish_weight_update", version), f"finish_weight_update(version={version})")
        stats.apply_s = max(float(a) for a in applied)
        stats.pause_s = time.monotonic() - pause_start
        return stats


def _plan_order(plan: list[PlannedBucket], specs: list[tuple[str, torch.Tensor]],
                source: Iterator[tuple[str, torch.Tensor]], stats: SyncStats):
    """Each planned bucket with its tensors, pulling from ``source`` only as far as that bucket needs: a tensor
    that arrives before its bucket's turn (another wire dtype) is held until then. Checks every tensor against its
    spec, and keeps in ``stats.held_bytes`` the most bytes held at once."""
    expected = {n: (tuple(t.shape), t.dtype) for n, t in specs}
    held: dict[str, torch.Tensor] = {}
    held_bytes = 0
    for planned in plan:
        for wanted in planned.names:
            while wanted not in held:
                arrived = next(source, None)
                if arrived is None:
                    raise WeightSyncError(f"weight sync: the weights ended before {wanted!r} (announced, never sent)")
                name, tensor = arrived
                if expected.get(name) != (tuple(tensor.shape), tensor.dtype) or name in held:
                    raise WeightSyncError(f"weight sync: {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match "
                                          f"the announced {expected.get(name)}")
                held[name] = tensor
                held_bytes += tensor.numel() * tensor.element_size()
                stats.held_bytes = max(stats.held_bytes, held_bytes)
        held_bytes -= sum(held[n].numel() * held[n].element_size() for n in planned.names)
        yield planned, [held.pop(n) for n in planned.names]  # no name kept here: the caller's drop frees them


def _members_key(names: list[str], handles: list[Any]) -> tuple[str, ...]:
    return tuple(h._actor_id.hex() if hasattr(h, "_actor_id") else n for n, h in zip(names, handles))


def make_sender(cfg: WeightSyncConfig, *, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None) -> WeightSender:
    """The sender for ``cfg.transport``; construct it in the learner's rank-0 process (it holds the weights)."""
    return WeightSender(cfg, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------- driver helper


def broadcast_weights(sender_actor: Any, generator_actors: Sequence[Any] | Mapping[str, Any], version: int,
                      cfg: WeightSyncConfig) -> SyncStats:
    """Driver side: ask the learner to push ``version`` to ``generator_actors``.

    ``sender_actor`` is one actor exposing ``sync_weights(version, receivers)`` that calls
    :meth:`WeightSender.send` in its process, or a list of them — every learner rank, rank 0 first — all of
    which are called together: rank 0 sends, the others take part in gathering the weights (ZeRO-3 shards them,
    and gathering is a collective) and return None. The sender issues the receivers' RPCs itself, concurrently
    with its own side of every collective; this helper only bounds the whole exchange by ``cfg.timeout_s`` (plus
    a small margin for the sender to report which receiver timed out) and surfaces the sender's own error
    unchanged. Returns rank 0's :class:`SyncStats`.
    """
    import ray

    senders = list(sender_actor) if isinstance(sender_actor, (list, tuple)) else [sender_actor]
    refs = [s.sync_weights.remote(version, generator_actors) for s in senders]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.timeout_s + 10.0)
    if len(ready) < len(refs):
        late = ["the weight sender" if i == 0 else f"learner rank {i}" for i, r in enumerate(refs) if r not in ready]
        raise WeightSyncTimeout(f"sync_weights(version={version})", late, cfg.timeout_s)
    try:
        return ray.get(refs)[0]
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, WeightSyncError):
            raise cause from None
        raise

"""Weight-sync transports: how one bucket of weights travels from the learner's rank-0 process to every generator.

One module per transport in this package holds both of its sides: the send side (driven by
:class:`learner.weight_sync.WeightSender` through a :class:`SendLink`) and the receive side (driven by
:class:`dsmath.weight_receiver.BucketReceiver`). Both sides find it here, by the name that travels in
``begin_weight_update(version, num_buckets, transport, ...)`` and that ``weight_sync.transport`` holds.

Adding a transport: one new module with a class (or a zero-argument factory) satisfying :class:`Transport`, plus
its :func:`register` line at the bottom of this file — or a :func:`register` call at run time in every process
that sends or receives with it (tests do). Config validation and the sender read :func:`info` (which names exist,
which need a GPU); nothing else lists transports.

Guaranteed: this module imports only the standard library (config validation reads it without loading torch); a
transport's module is imported on first :func:`create`. Not guaranteed: that a registered transport works here
(``needs_gpu`` transports are refused by the sender and by config validation where there is no GPU, nothing else
is checked before the first send). The registry is per process and not thread-safe to mutate.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from dsmath.records import WeightBucket
    from dsmath.weight_wire import BucketLayout


class SendLink(Protocol):
    """What a transport's send side may use during one ``send``: the receivers and an RPC fabric bounded by the
    send's deadline (Ray in the learner: :class:`learner.weight_sync.RayLink`). Receivers are called by method
    name with the generator's weight-sync methods (``receive_bucket``, ``join_weight_group``)."""

    names: list[str]  # the receivers' names, for error messages, in receiver order
    members: tuple[str, ...]  # identifies this set of receivers (a collective re-forms its group when it changes)
    timeout_s: float  # the configured deadline of the whole send (for error messages)

    def remaining(self) -> float:
        """Seconds left before the send's deadline (at least 0.1)."""

    def host(self) -> str:
        """An address of the sender's host that every receiver can reach."""

    def share(self, obj: Any) -> Any:
        """One stored copy of ``obj`` that every receiver can fetch (Ray: ``ray.put``); keep it until waited."""

    def call(self, method: str, *args: Any) -> Any:
        """Start ``method(*args)`` on every receiver; returns what :meth:`wait` takes."""

    def call_each(self, method: str, args: Sequence[tuple]) -> Any:
        """Start ``method(*args[i])`` on receiver ``i``; returns what :meth:`wait` takes."""

    def wait(self, pending: Any, what: str) -> list:
        """The receivers' answers, or :class:`~dsmath.weight_wire.WeightSyncTimeout` naming the late ones."""


class Transport(Protocol):
    """One transport, both sides. One instance per sender (holding e.g. its process group) and one per receiver
    per transport name; an instance is used by one thread at a time.

    ``streams``: receivers hand each bucket to the engine as it arrives, on their device (else they stage every
    bucket in host memory and load all at the end) — the default, a receiver may force either.
    ``lends_memory``: the buffer :meth:`open_bucket` returns is the sender's memory, valid only until the receiver
    answers ``receive_bucket``; a staging receiver copies it.
    """

    streams: bool
    lends_memory: bool

    # -- send side (learner rank 0) -----------------------------------------------------------------------
    def connect(self, link: SendLink) -> float:
        """Before ``begin_weight_update``: set up what the buckets travel over (a process group) unless it already
        exists for ``link.members``. Returns the seconds spent (0.0 when nothing was done)."""

    def send_bucket(self, link: SendLink, flat: torch.Tensor, record: WeightBucket, layout: BucketLayout,
                    what: str) -> None:
        """Deliver ``flat`` (``layout.numel`` elements, on the sender's device) to every receiver through their
        ``receive_bucket(record, layout, payload)``; return once every receiver answered (``flat`` may then be
        freed). Raise :class:`~dsmath.weight_wire.WeightSyncError` (or its timeout) naming ``what``."""

    def close(self) -> None:
        """Drop the sender's state (a group); called after a timeout. The next :meth:`connect` sets it up anew."""

    # -- receive side (each generator) --------------------------------------------------------------------
    def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        """``join_weight_group``: join the sender's group as ``rank`` (refused by transports without a group)."""

    def open_bucket(self, owner: str, layout: BucketLayout, payload: Any, device: torch.device,
                    timeout_s: float) -> torch.Tensor:
        """The bucket's flat buffer (``layout.numel`` x ``layout.dtype``) from what ``receive_bucket`` got."""


@dataclass(frozen=True)
class TransportInfo:
    """A registered transport. ``target``: ``"package.module:attr"`` (imported on first use) or the callable
    itself; calling it with no arguments gives a :class:`Transport`. ``needs_gpu``: both sides hold the buckets in
    CUDA memory (the sender packs them on its GPU): refused where there is none."""

    name: str
    target: str | Callable[[], Transport]
    needs_gpu: bool = False


_REGISTRY: dict[str, TransportInfo] = {}


def register(name: str, target: str | Callable[[], Transport], *, needs_gpu: bool = False) -> None:
    """Make ``name`` a transport in this process. Registering the same entry again is a no-op; another entry under
    a taken name is refused (:func:`unregister` it first)."""
    entry = TransportInfo(name, target, needs_gpu)
    if _REGISTRY.get(name, entry) != entry:
        raise ValueError(f"weight-sync transport {name!r} is already registered ({_REGISTRY[name].target!r})")
    _REGISTRY[name] = entry


def unregister(name: str) -> None:
    """Forget ``name`` (tests that registered one of their own)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered transport names, in registration order."""
    return tuple(_REGISTRY)


def info(name: str) -> TransportInfo:
    """The entry for ``name``; ``ValueError`` in one line naming the registered ones when there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown weight-sync transport {name!r}; one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create(name: str) -> Transport:
    """A new instance of transport ``name`` (imports its module on first use)."""
    target = info(name).target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target()


register("object_store", "dsmath.transports.object_store:ObjectStoreTransport")
register("gloo", "dsmath.transports.gloo:GlooTransport")
register("nccl", "dsmath.transports.nccl:NcclTransport", needs_gpu=True)
register("cuda_ipc", "dsmath.transports.cuda_ipc:CudaIpcTransport", needs_gpu=True)

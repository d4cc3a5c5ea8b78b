"""Weight sync: bucketing and casting (pure), the receiver state machine (staged and streamed), both CPU transports
between real Ray actors (tensor receivers without a vLLM engine; the engine path is in test_generator_ray.py and
test_zero3_sync.py), deadlines, and — on a GPU — the cuda_ipc receive between two processes without Ray."""

import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

from dsmath import transports
from dsmath.config import WeightSyncConfig
from dsmath.records import WeightBucket
from dsmath.weight_receiver import BucketReceiver
from dsmath.weight_wire import (
    StaleWeightVersion,
    WeightSyncError,
    WeightSyncTimeout,
    layout_bytes,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from learner.weight_sync import make_sender


def _weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("embed.weight", torch.randn(64, 32, generator=g)),
        ("layer0.q.weight", torch.randn(32, 32, generator=g)),
        ("layer0.norm.weight", torch.randn(32, generator=g)),
        ("layer0.q.bias", torch.randn(32, generator=g).to(torch.bfloat16)),
        ("layer1.q.weight", torch.randn(32, 32, generator=g)),
        ("big", torch.randn(4096, generator=g)),
        ("step", torch.tensor([7], dtype=torch.int64)),
    ]


def _plan_reference(named, bucket_bytes, target=None):
    """Plain-loop reference for plan_buckets: per wire dtype in first-seen order, greedy fill."""

    def wire(t):
        return target if target is not None and t.is_floating_point() else t.dtype

    dtypes = []
    for _, t in named:
        if wire(t) not in dtypes:
            dtypes.append(wire(t))
    out = []
    for dtype in dtypes:
        current, size = [], 0
        for name, t in named:
            if wire(t) != dtype:
                continue
            nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
            if current and size + nbytes > bucket_bytes:
                out.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            out.append(current)
    return out


@pytest.mark.parametrize("bucket_bytes", [1, 4096, 8192, 20000, 10**9])
def test_plan_buckets_matches_reference_and_respects_size(bucket_bytes):
    named = _weights()
    plan = plan_buckets(named, bucket_bytes)
    assert [list(b.names) for b in plan] == _plan_reference(named, bucket_bytes)
    sizes = dict((n, t.numel() * t.element_size()) for n, t in named)
    for b in plan:
        total = sum(sizes[n] for n in b.names)
        assert total <= bucket_bytes or len(b.names) == 1  # only a lone oversized tensor may exceed
        assert len({dict(named)[n].dtype for n in b.names}) == 1
    assert sorted(n for b in plan for n in b.names) == sorted(n for n, _ in named)


@pytest.mark.parametrize("bucket_bytes", [1, 4096, 8192, 10**9])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32])
def test_plan_buckets_in_the_receivers_dtype_matches_reference(bucket_bytes, target):
    named = _weights()
    plan = plan_buckets(named, bucket_bytes, target)
    assert [list(b.names) for b in plan] == _plan_reference(named, bucket_bytes, target)
    lookup = dict(named)
    for b in plan:
        dtypes = {lookup[n].dtype for n in b.names}
        assert b.layout.dtype == ("int64" if dtypes == {torch.int64} else str(target).removeprefix("torch."))
        assert layout_bytes(b.layout) <= bucket_bytes or len(b.names) == 1


def test_pack_casts_per_bucket_to_the_wire_dtype():
    named = _weights(5)
    lookup = dict(named)
    plan = plan_buckets(named, 8192, torch.bfloat16)
    wire_bytes = 0
    for b in plan:
        flat = pack_bucket([lookup[n] for n in b.names], b.layout)
        wire_bytes += flat.numel() * flat.element_size()
        for name, got in unpack_bucket(flat, b.names, b.layout):
            want = lookup[name].to(torch.bfloat16) if lookup[name].is_floating_point() else lookup[name]
            assert got.dtype == want.dtype and torch.equal(got, want)  # the cast torch's .to() does, bit for bit
    floats = sum(t.numel() for _, t in named if t.is_floating_point())
    assert wire_bytes == 2 * floats + 8  # every float in 2 bytes, the int64 counter as it was


def test_pack_unpack_round_trip_is_exact():
    named = _weights(3)
    lookup = dict(named)
    restored = {}
    for b in plan_buckets(named, 8192):
        flat = pack_bucket([lookup[n] for n in b.names], b.layout)
        assert flat.numel() == b.layout.numel
        restored.update(unpack_bucket(flat, b.names, b.layout))
    assert restored.keys() == lookup.keys()
    for name, t in named:
        assert restored[name].dtype == t.dtype and torch.equal(restored[name], t)


def test_receiver_versions_and_order():
    recv = BucketReceiver("gen-x")
    named = _weights()
    plan = plan_buckets(named, 8192)
    with pytest.raises(StaleWeightVersion, match="holds version 0"):
        recv.begin(2, len(plan), "object_store")
    recv.begin(1, len(plan), "object_store")
    lookup = dict(named)
    flat0 = pack_bucket([lookup[n] for n in plan[0].names], plan[0].layout)
    with pytest.raises(WeightSyncError, match="out of order"):
        recv.receive(WeightBucket(1, 1, len(plan), plan[1].names), plan[1].layout, flat0)
    recv.receive(WeightBucket(1, 0, len(plan), plan[0].names), plan[0].layout, flat0)
    with pytest.raises(WeightSyncError, match=f"after 1/{len(plan)} buckets"):
        recv.finish(1)
    assert recv.version == 0  # no switch before the last bucket
    with pytest.raises(StaleWeightVersion):
        recv.receive(WeightBucket(2, 1, len(plan), plan[1].names), plan[1].layout, flat0)


def test_streamed_receiver_holds_at_most_one_bucket_and_never_copies():
    """Streamed mode (what cuda_ipc / nccl use on a GPU), driven with host buffers: each bucket is handed out as
    views of the buffer that arrived (same memory, no staging copy) and the receiver lets go of it when the next
    bucket comes, so at most one bucket is referenced at a time; finish hands out nothing more."""
    named = _weights(7)
    lookup = dict(named)
    plan = plan_buckets(named, 4096)
    recv = BucketReceiver("gen-s", stream=True)
    recv.begin(1, len(plan), "object_store")
    previous, loaded = None, {}
    for index, b in enumerate(plan):
        flat = pack_bucket([lookup[n] for n in b.names], b.layout)
        ptr, flat_ref = flat.data_ptr(), weakref.ref(flat)
        tensors = recv.receive(WeightBucket(1, index, len(plan), b.names), b.layout, flat)
        del flat
        assert recv.held_buckets == 1 and flat_ref() is not None
        assert [n for n, _ in tensors] == list(b.names)
        assert tensors[0][1].data_ptr() == ptr  # a view of what arrived: no copy
        if previous is not None:
            assert previous() is None  # the previous bucket was released when this one came
        loaded.update((n, t.clone()) for n, t in tensors)  # the "engine" copies the bucket into its weights
        del tensors
        previous = flat_ref
    assert recv.finish(1) == [] and recv.held_buckets == 0 and previous() is None
    recv.commit(1)
    assert recv.version == 1 and recv.max_held_buckets == 1
    assert all(torch.equal(loaded[n], t) for n, t in named)


def test_staged_receiver_keeps_every_bucket_until_finish():
    named = _weights(8)
    lookup = dict(named)
    plan = plan_buckets(named, 4096)
    recv = BucketReceiver("gen-t")
    recv.begin(1, len(plan), "object_store")
    for index, b in enumerate(plan):
        assert recv.receive(WeightBucket(1, index, len(plan), b.names), b.layout,
                            pack_bucket([lookup[n] for n in b.names], b.layout)) is None
    staged = dict(recv.finish(1))
    assert staged.keys() == lookup.keys() and all(torch.equal(staged[n], t) for n, t in named)
    assert not recv.streaming and recv.max_held_buckets == 0


def test_receiver_announces_its_dtype():
    assert BucketReceiver("a").wire_dtype() is None
    assert BucketReceiver("b", dtype="bfloat16").wire_dtype() == "bfloat16"
    assert BucketReceiver("c", dtype=torch.float16).wire_dtype() == "float16"
    assert BucketReceiver("d", dtype="torch.float32").wire_dtype() == "float32"
    assert BucketReceiver("e").streaming is False  # before any update: staged
    r = BucketReceiver("f")
    r.begin(1, 1, "object_store")
    assert not r.streaming


def test_wire_and_sender_modules_do_not_import_ray():
    """A receiver (and the GPU test below) imports these where Ray is not installed."""
    code = ("import sys, dsmath.weight_wire, dsmath.weight_receiver, learner.weight_sync, actors.generator\n"
            "import dsmath.transports as t\n"
            "[t.create(n) for n in t.names()]\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'deepspeed'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    code = "import sys, actors.generator\nprint(','.join(m for m in sys.modules if m.split('.')[0] == 'learner'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""  # the generator side shares dsmath.weight_receiver/transports, not the learner


# ------------------------------------------------------------------ a transport defined here, through the registry


class InlineTransport:
    """A transport this test adds without touching any other file: the bucket travels inside the
    ``receive_bucket`` RPC's own arguments (no object-store put, no group). Both sides, as in dsmath/transports/."""

    streams = False
    lends_memory = False
    sent = 0  # buckets this process sent with it

    def connect(self, link):
        return 0.0

    def send_bucket(self, link, flat, record, layout, what):
        link.wait(link.call("receive_bucket", record, layout, flat), what)
        InlineTransport.sent += 1

    def close(self):
        pass

    def join(self, host, port, rank, world_size, timeout_s):
        raise WeightSyncError("transport 'inline' forms no process group")

    def open_bucket(self, owner, layout, payload, device, timeout_s):
        return payload.to(device)


def _register_inline():
    """Called in every process that sends or receives with it (the registry is per process)."""
    transports.register("inline", InlineTransport)


def test_registry_refuses_unknown_and_taken_names():
    with pytest.raises(ValueError, match="unknown weight-sync transport 'carrier_pigeon'; one of object_store, gloo"):
        make_sender(WeightSyncConfig(transport="carrier_pigeon"))
    with pytest.raises(ValueError, match="already registered"):
        transports.register("gloo", InlineTransport)
    recv = BucketReceiver("gen-u")
    with pytest.raises(WeightSyncError, match="gen-u: unknown transport 'carrier_pigeon'"):
        recv.begin(1, 1, "carrier_pigeon")
    assert not recv.updating


def test_receiver_uses_a_transport_registered_at_run_time():
    """The receive side of a transport registered in this process only: begin names it, open_bucket is its."""
    named = _weights(9)
    lookup = dict(named)
    plan = plan_buckets(named, 4096)
    recv = BucketReceiver("gen-i")
    _register_inline()
    try:
        recv.begin(1, len(plan), "inline")
        for index, b in enumerate(plan):
            recv.receive(WeightBucket(1, index, len(plan), b.names), b.layout,
                         pack_bucket([lookup[n] for n in b.names], b.layout))
        staged = dict(recv.finish(1))
    finally:
        transports.unregister("inline")
    assert isinstance(recv.transport("inline"), InlineTransport)
    assert staged.keys() == lookup.keys() and all(torch.equal(staged[n], t) for n, t in named)
    with pytest.raises(WeightSyncError, match="unknown transport 'inline'"):  # unregistered: gone for new receivers
        BucketReceiver("gen-j").begin(1, 1, "inline")


# ------------------------------------------------------------------------------------------ real Ray


class TensorReceiver:
    """A receiver actor with the generator's weight-sync methods, holding plain tensors (no engine)."""

    def __init__(self, name: str, dtype: str | None = None):
        _register_inline()
        self.recv = BucketReceiver(name, dtype=dtype)
        self.weights: dict[str, torch.Tensor] = {}

    def weight_dtype(self):
        return self.recv.wire_dtype()

    def join_weight_group(self, host, port, rank, world_size, backend, timeout_s):
        self.recv.join_group(host, port, rank, world_size, backend, timeout_s)

    def begin_weight_update(self, version, num_buckets, transport, timeout_s=120.0):
        self.recv.begin(version, num_buckets, transport, timeout_s)

    def receive_bucket(self, bucket, layout, payload=None):
        self.recv.receive(bucket, layout, payload)
        return 0.0

    def finish_weight_update(self, version):
        staged = self.recv.finish(version)
        self.weights = {n: t.clone() for n, t in staged}
        self.recv.commit(version)
        return 0.0

    def state(self):
        return self.recv.version, self.weights


class Silent:
    """Never answers a weight-sync call (a hung generator)."""

    def __init__(self):
        self.never = threading.Event()

    def ready(self):
        return True

    def join_weight_group(self, *args, **kwargs):
        self.never.wait()

    def begin_weight_update(self, *args, **kwargs):
        self.never.wait()


class Sender:
    """What the learner's rank-0 process does: hold weights, own one sender per transport."""

    def __init__(self):
        _register_inline()
        self.senders = {}

    def sync_weights(self, version, receivers, *, transport, bucket_mb, timeout_s, seed=0, streamed=False,
                     misannounce=None):
        """``streamed``: announce the shapes (meta tensors) and hand over a one-pass generator, as the ZeRO-3
        learner does; ``misannounce``: a tensor name whose announced shape is wrong."""
        key = (transport, bucket_mb, timeout_s)
        if key not in self.senders:
            self.senders[key] = make_sender(WeightSyncConfig(transport=transport, bucket_mb=bucket_mb,
                                                             timeout_s=timeout_s))
        weights = _weights(seed)
        if not streamed:
            return self.senders[key].send(weights, version, receivers)
        shapes = [(n, torch.empty((t.numel() + 1,) if n == misannounce else t.shape, dtype=t.dtype, device="meta"))
                  for n, t in weights]
        return self.senders[key].send((w for w in weights), version, receivers, shapes=shapes)

    def inline_sent(self):
        return InlineTransport.sent


@pytest.fixture(scope="module")
def cluster():
    """Real Ray with two tensor receivers, one silent receiver and a sender, shared by the tests below."""
    ray = pytest.importorskip("ray")
    import sys

    # Ray workers cannot import a test module by name: ship this module's classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    actors = {
        "receivers": {f"r{i}": ray.remote(num_cpus=0.1)(TensorReceiver).remote(f"r{i}") for i in range(2)},
        "silent": ray.remote(num_cpus=0.1)(Silent).remote(),
        "bf16": ray.remote(num_cpus=0.1)(TensorReceiver).remote("b0", "bfloat16"),
        "sender": ray.remote(num_cpus=0.1)(Sender).remote(),
    }
    ray.get([h.state.remote() for h in actors["receivers"].values()] + [actors["silent"].ready.remote()])
    yield ray, actors
    ray.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "gloo", "inline"])
def test_transport_delivers_exact_weights_in_buckets(cluster, transport):
    """Every transport delivers the weights bit for bit in the planned buckets, versioned; ``inline`` is the one
    this file registers (the sender and the receivers find it through the registry, no other file knows it)."""
    ray, actors = cluster
    receivers, sender = actors["receivers"], actors["sender"]
    version = ray.get(receivers["r0"].state.remote())[0]
    for seed in (11, 12):  # a second send reuses the gloo group
        version += 1
        stats = ray.get(sender.sync_weights.remote(version, receivers, transport=transport, bucket_mb=8192 / 2**20,
                                                   timeout_s=30.0, seed=seed))
        expected = dict(_weights(seed))
        assert stats.buckets == len(plan_buckets(list(expected.items()), 8192)) > 3
        assert stats.bytes == sum(t.numel() * t.element_size() for t in expected.values())
        assert stats.transport == transport and stats.tensors == len(expected)
        assert stats.seconds >= stats.pause_s >= stats.transfer_s > 0
        for handle in receivers.values():
            got_version, got = ray.get(handle.state.remote())
            assert got_version == version
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[n], expected[n]) for n in expected)
    if transport == "inline":  # it was the registered class that carried every bucket of both sends
        assert ray.get(sender.inline_sent.remote()) == 2 * stats.buckets
    with pytest.raises(ray.exceptions.RayTaskError, match="refused"):  # not current + 1
        ray.get(sender.sync_weights.remote(version + 5, receivers, transport=transport, bucket_mb=1.0, timeout_s=30.0))
    assert ray.get(receivers["r0"].state.remote())[0] == version


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_streamed_send_delivers_the_same_bytes_holding_one_bucket(cluster, transport):
    """With the shapes announced (what rank 0 does under ZeRO-3) the weights are pulled bucket by bucket: the same
    buckets and bytes arrive, and the sender held at most the biggest bucket plus what came before its turn."""
    ray, actors = cluster
    receivers, sender = actors["receivers"], actors["sender"]
    version = ray.get(receivers["r0"].state.remote())[0] + 1
    # A sender of its own (timeout 29 s): the receivers hold one group, that of the last sender that formed one.
    stats = ray.get(sender.sync_weights.remote(version, receivers, transport=transport, bucket_mb=8192 / 2**20,
                                               timeout_s=29.0, seed=13, streamed=True))
    expected = dict(_weights(13))
    assert stats.buckets == len(plan_buckets(list(expected.items()), 8192)) > 3
    assert stats.bytes == stats.source_bytes == sum(t.numel() * t.element_size() for t in expected.values())
    # The 16 KiB "big" tensor is a bucket of its own; the bf16 bias arrived before it and waits for the bf16
    # bucket after the float32 ones. Everything else was let go bucket by bucket.
    assert stats.held_bytes == 4096 * 4 + 32 * 2 < stats.source_bytes / 2
    for handle in receivers.values():
        got_version, got = ray.get(handle.state.remote())
        assert got_version == version and got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    unstreamed = ray.get(sender.sync_weights.remote(version + 1, receivers, transport=transport,
                                                    bucket_mb=8192 / 2**20, timeout_s=29.0, seed=13))
    assert unstreamed.held_bytes == unstreamed.source_bytes and unstreamed.per_bucket_bytes == stats.per_bucket_bytes


def test_streamed_send_refuses_a_tensor_unlike_its_announcement(cluster):
    ray, actors = cluster
    receivers, sender = actors["receivers"], actors["sender"]
    version = ray.get(receivers["r0"].state.remote())[0]
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(sender.sync_weights.remote(version + 1, receivers, transport="object_store", bucket_mb=8192 / 2**20,
                                           timeout_s=30.0, streamed=True, misannounce="layer1.q.weight"))
    cause = info.value.cause
    assert isinstance(cause, WeightSyncError) and "\n" not in str(cause)
    said = "'layer1.q.weight' (32, 32) torch.float32 does not match the announced ((1025,), torch.float32)"
    assert said in str(cause), str(cause)
    assert all(ray.get(h.state.remote())[0] == version for h in receivers.values())  # nobody switched


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_silent_receiver_times_out_by_name(cluster, transport):
    ray, actors = cluster
    good = actors["receivers"]["r0"]
    version = ray.get(good.state.remote())[0]
    ray.get(actors["sender"].sync_weights.remote(version + 1, {"gen-good": good}, transport=transport,
                                                 bucket_mb=1.0, timeout_s=30.0))  # warm: group, imports
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(actors["sender"].sync_weights.remote(version + 2, {"gen-good": good, "gen-stuck": actors["silent"]},
                                                     transport=transport, bucket_mb=1.0, timeout_s=3.0), timeout=30)
    elapsed = time.monotonic() - start
    cause = info.value.cause
    assert isinstance(cause, WeightSyncTimeout)
    assert cause.receivers == ("gen-stuck",)
    assert "gen-stuck" in str(cause) and "3s" in str(cause)
    assert 3.0 <= elapsed < 3.0 + 10.0  # the deadline, not a hang (30 s); slack for a loaded 2-core machine
    assert ray.get(good.state.remote())[0] == version + 1  # the good one kept its last complete version


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_fp32_sender_to_bf16_receiver_sends_bf16_and_half_the_bytes(cluster, transport):
    ray, actors = cluster
    bf16 = {"gen-bf16": actors["bf16"]}
    version = ray.get(actors["bf16"].state.remote())[0] + 1
    stats = ray.get(actors["sender"].sync_weights.remote(version, bf16, transport=transport, bucket_mb=8192 / 2**20,
                                                         timeout_s=30.0, seed=21))
    sent = dict(_weights(21))
    got_version, got = ray.get(actors["bf16"].state.remote())
    assert got_version == version and got.keys() == sent.keys()
    for name, t in sent.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    floats = sum(t.numel() for t in sent.values() if t.is_floating_point())
    assert stats.bytes == 2 * floats + 8  # the int64 counter travels as it is
    assert stats.source_bytes == sum(t.numel() * t.element_size() for t in sent.values())
    fp32_bytes = sum(t.numel() * 4 for t in sent.values() if t.is_floating_point())
    assert stats.bytes - 8 == fp32_bytes // 2  # half the bytes of the fp32 tensors
    assert stats.wire_dtype == "bfloat16+int64"
    assert stats.buckets == len(plan_buckets(list(sent.items()), 8192, torch.bfloat16))


def test_receivers_that_hold_different_dtypes_are_refused_in_one_line(cluster):
    ray, actors = cluster
    mixed = {"gen-fp": actors["receivers"]["r0"], "gen-bf16": actors["bf16"]}
    version = ray.get(actors["bf16"].state.remote())[0] + 1
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(actors["sender"].sync_weights.remote(version, mixed, transport="object_store", bucket_mb=1.0,
                                                     timeout_s=30.0))
    cause = info.value.cause
    assert isinstance(cause, WeightSyncError) and "different dtypes" in str(cause) and "\n" not in str(cause)
    assert ray.get(actors["bf16"].state.remote())[0] == version - 1  # nothing started


# ------------------------------------------------------------------------------- GPU: cuda_ipc without Ray


def _ipc_receiver_process(inbox, outbox, dtype: str) -> None:
    """The generator's side in a process of its own: a streamed BucketReceiver on the GPU, an "engine" dict it
    loads each bucket into (a device-to-device copy), and a report of where the buckets lived."""
    import torch

    from dsmath.weight_receiver import BucketReceiver

    torch.cuda.set_device(0)
    recv = BucketReceiver("ipc-child", device="cuda", dtype=dtype)
    version, num_buckets = inbox.get()
    recv.begin(version, num_buckets, "cuda_ipc")
    engine, devices, max_held = {}, set(), 0
    for _ in range(num_buckets):
        record, layout, payload = inbox.get()
        tensors = recv.receive(record, layout, payload)
        devices.update(t.device.type for _, t in tensors)
        max_held = max(max_held, recv.held_buckets)
        for name, t in tensors:
            engine[name] = t.clone()  # the engine's load: device to device
        del tensors
        outbox.put(("bucket", record.bucket_index))  # the sender may free this bucket now
    assert recv.finish(version) == []
    recv.commit(version)
    outbox.put(("done", {n: t.cpu() for n, t in engine.items()}, sorted(devices), max_held, recv.max_held_buckets,
                recv.version, recv.wire_dtype()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_ipc_receive_between_two_processes_streams_on_the_device(dtype):
    """Sender (this process) packs each bucket on the GPU and sends only a CUDA IPC handle through a queue; the
    receiver process maps it, loads it device-to-device and acknowledges before the sender drops it. The weights
    arrive bit-exact in the receiver's dtype, every bucket the receiver saw was on the GPU (no host staging), and
    it never held more than one bucket."""
    import torch.multiprocessing as mp

    from dsmath.transports.cuda_ipc import cuda_ipc_payload
    from dsmath.weight_wire import wire_dtype

    target = getattr(torch, dtype)
    named = [(n, t.cuda()) for n, t in _weights(31)] + [
        ("wide.weight", torch.randn(512, 1024, device="cuda"))]  # 2 MiB of fp32: a bucket of its own
    lookup = dict(named)
    plan = plan_buckets(named, 16384, target)
    assert len(plan) > 3
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_receiver_process, args=(inbox, outbox, dtype))
    child.start()
    try:
        inbox.put((1, len(plan)))
        for index, b in enumerate(plan):
            flat = pack_bucket([lookup[n] for n in b.names], b.layout, "cuda")
            torch.cuda.synchronize()
            inbox.put((WeightBucket(1, index, len(plan), b.names), b.layout, cuda_ipc_payload(flat)))
            assert outbox.get(timeout=120) == ("bucket", index)
            del flat
        _, engine, devices, max_held, receiver_max, version, said = outbox.get(timeout=120)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert devices == ["cuda"] and max_held == 1 and receiver_max == 1
    assert version == 1 and said == dtype
    assert engine.keys() == lookup.keys()
    for name, t in named:
        want = t.to(wire_dtype(t.dtype, target)).cpu()
        assert engine[name].dtype == want.dtype and torch.equal(engine[name], want), name

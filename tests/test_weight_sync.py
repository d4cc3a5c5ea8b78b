"""Weight sync: bucketing (pure), the receiver state machine, and both CPU transports between real Ray actors
(tensor receivers without a vLLM engine; the engine path is in test_generator_ray.py), including deadlines."""

import threading
import time

import pytest
import torch

from dsmath.config import WeightSyncConfig
from dsmath.records import WeightBucket
from learner.weight_sync import (
    BucketReceiver,
    StaleWeightVersion,
    WeightSyncError,
    WeightSyncTimeout,
    make_sender,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)


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


def _plan_reference(named, bucket_bytes):
    """Plain-loop reference for plan_buckets: per dtype in first-seen order, greedy fill."""
    dtypes = []
    for _, t in named:
        if t.dtype not in dtypes:
            dtypes.append(t.dtype)
    out = []
    for dtype in dtypes:
        current, size = [], 0
        for name, t in named:
            if t.dtype != dtype:
                continue
            nbytes = t.numel() * t.element_size()
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


# ------------------------------------------------------------------------------------------ real Ray


class TensorReceiver:
    """A receiver actor with the generator's weight-sync methods, holding plain tensors (no engine)."""

    def __init__(self, name: str):
        self.recv = BucketReceiver(name)
        self.weights: dict[str, torch.Tensor] = {}

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
        self.senders = {}

    def sync_weights(self, version, receivers, *, transport, bucket_mb, timeout_s, seed=0):
        key = (transport, bucket_mb, timeout_s)
        if key not in self.senders:
            self.senders[key] = make_sender(WeightSyncConfig(transport=transport, bucket_mb=bucket_mb,
                                                             timeout_s=timeout_s))
        return self.senders[key].send(_weights(seed), version, receivers)


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
        "sender": ray.remote(num_cpus=0.1)(Sender).remote(),
    }
    ray.get([h.state.remote() for h in actors["receivers"].values()] + [actors["silent"].ready.remote()])
    yield ray, actors
    ray.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_transport_delivers_exact_weights_in_buckets(cluster, transport):
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
    with pytest.raises(ray.exceptions.RayTaskError, match="refused"):  # not current + 1
        ray.get(sender.sync_weights.remote(version + 5, receivers, transport=transport, bucket_mb=1.0, timeout_s=30.0))
    assert ray.get(receivers["r0"].state.remote())[0] == version


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
    assert 3.0 <= elapsed < 3.0 + 4.0  # the deadline, not a hang
    assert ray.get(good.state.remote())[0] == version + 1  # the good one kept its last complete version

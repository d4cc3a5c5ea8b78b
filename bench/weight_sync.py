"""Weight broadcast: dsmath's bucketed, versioned sync vs the raw link, measured in the same run.

A sender actor (what the learner's rank 0 runs: ``learner.weight_sync.WeightSender``) pushes a synthetic
state dict of ``--size-mb`` to ``--receivers`` receiver actors (``BucketReceiver``, what each generator runs,
minus the engine's in-place load) over each transport and bucket size. The peers, measured between the same
processes in the same run:

* ``raw gloo``: one ``broadcast`` of a flat tensor of the same bytes over the same gloo group — the link's
  bound for the collective transport (no bucketing, no versioning, no RPCs);
* ``raw object store``: one ``ray.put`` + every receiver ``ray.get``-ing it — the bound for that transport;
* ``memcpy``: one host copy of the same bytes — the machine's memory-bandwidth ceiling;
* ``device copy``: one device-to-device copy of the same bytes on the GPU (``torch.cuda`` events) — the ceiling a
  ``cuda_ipc``/``nccl`` sync on one GPU is measured against; skipped, with a note on the card, without a GPU.

The card reports, per transport and bucket size, the whole sync, the *pause* (first begin RPC until every
receiver switched version: generators refuse to sample in it) separately from the *transfer* (inside the
puts / collectives), bytes/s, and the ratio to the transport's raw bound. Last line: JSON.

    python bench/weight_sync.py [--size-mb 64] [--receivers 2] [--buckets-mb 4,16,64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_copy_bytes_per_s(nbytes: int, repeats: int) -> tuple[float | None, str]:
    """Bytes/s of one device-to-device copy of ``nbytes`` (median of ``repeats``, timed with CUDA events after a
    warm-up), or (None, why) without a GPU."""
    if not torch.cuda.is_available():
        return None, "skipped: no CUDA GPU visible to torch"
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return nbytes / statistics.median(times), torch.cuda.get_device_name()


def _ipc_receiver(inbox, outbox) -> None:
    """A generator's receiving side for the Ray-free cuda_ipc arm: a streamed BucketReceiver on GPU 0 loading each
    bucket into preallocated "engine" tensors (device to device), acknowledging each bucket."""
    from dsmath.weight_receiver import BucketReceiver

    torch.cuda.set_device(0)
    recv, engine = BucketReceiver("bench-ipc", device="cuda"), {}
    while (msg := inbox.get()) is not None:
        version, num_buckets = msg
        recv.begin(version, num_buckets, "cuda_ipc")
        for _ in range(num_buckets):
            record, layout, payload = inbox.get()
            for name, t in recv.receive(record, layout, payload):
                if name in engine:
                    engine[name].copy_(t)
                else:
                    engine[name] = t.clone()
            torch.cuda.synchronize()
            outbox.put(record.bucket_index)
        recv.finish(version)
        recv.commit(version)
        outbox.put(float(sum(t.double().sum() for t in engine.values())))


def cuda_ipc_arm(size_mb: float, buckets_mb: list[float], repeats: int) -> list[dict]:
    """The cuda_ipc sync between two processes on one GPU, without Ray (a spawned receiver, handles through a
    queue): what the transport costs on the device, comparable with the device copy. [] without a GPU."""
    if not torch.cuda.is_available():
        return []
    import torch.multiprocessing as mp

    from dsmath.records import WeightBucket
    from dsmath.transports.cuda_ipc import cuda_ipc_payload
    from dsmath.weight_wire import pack_bucket, plan_buckets

    weights = [(n, t.cuda()) for n, t in synthetic_weights(size_mb)]
    lookup, want = dict(weights), float(sum(t.double().sum() for _, t in weights))
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_receiver, args=(inbox, outbox), daemon=True)
    child.start()
    rows, version = [], 0
    try:
        for bucket_mb in buckets_mb:
            plan = plan_buckets(weights, int(bucket_mb * 2**20))
            times = []
            for _ in range(repeats + 1):  # the first round warms up the mapping and the engine tensors
                version += 1
                t0 = time.perf_counter()
                inbox.put((version, len(plan)))
                for index, b in enumerate(plan):
                    flat = pack_bucket([lookup[n] for n in b.names], b.layout, "cuda")
                    torch.cuda.synchronize()
                    inbox.put((WeightBucket(version, index, len(plan), b.names), b.layout, cuda_ipc_payload(flat)))
                    assert outbox.get(timeout=300) == index
                    del flat
                got = outbox.get(timeout=300)
                times.append(time.perf_counter() - t0)
                assert abs(got - want) < 1e-3 * abs(want) + 1e-3, (got, want)
            seconds = statistics.median(times[1:])
            rows.append({"transport": "cuda_ipc (no Ray)", "bucket_mb": bucket_mb, "buckets": len(plan),
                         "seconds": seconds, "pause_s": seconds, "transfer_s": float("nan"),
                         "bytes_per_s": nbytes / seconds})
    finally:
        inbox.put(None)
        child.join(timeout=60)
    return rows


def synthetic_weights(size_mb: float, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """A transformer-shaped state dict: a few big matrices and many small vectors, ``size_mb`` in total."""
    g = torch.Generator().manual_seed(seed)
    total = int(size_mb * 2**20 // 4)
    out, i = [], 0
    while total > 0:
        n = min(total, 1_048_576 if i % 4 else 4096)  # 4 MiB matrices, 16 KiB norms/biases
        out.append((f"layer{i // 4}.param{i % 4}", torch.randn(n, generator=g)))
        total -= n
        i += 1
    return out


class Receiver:
    """A generator's receiving side without the engine: BucketReceiver + the raw-broadcast peer."""

    def __init__(self, name: str):
        from dsmath.weight_receiver import BucketReceiver

        self.receiver = BucketReceiver(name)
        self.weights: dict[str, torch.Tensor] = {}

    def join_weight_group(self, host, port, rank, world_size, backend, timeout_s):
        self.receiver.join_group(host, port, rank, world_size, backend, timeout_s)

    def begin_weight_update(self, version, num_buckets, transport, timeout_s=120.0):
        self.receiver.begin(version, num_buckets, transport, timeout_s)

    def receive_bucket(self, bucket, layout, payload=None):
        self.receiver.receive(bucket, layout, payload)
        return 0.0

    def finish_weight_update(self, version):
        self.weights = dict(self.receiver.finish(version))
        self.receiver.commit(version)
        return 0.0

    def version(self) -> int:
        return self.receiver.version

    def checksum(self) -> float:
        return float(sum(t.double().sum() for t in self.weights.values()))

    def raw_broadcast(self, numel: int) -> float:
        from dsmath.transports.collective import broadcast_from_rank0

        buf = torch.empty(numel, dtype=torch.float32)
        t0 = time.perf_counter()
        broadcast_from_rank0(self.receiver.transport("gloo").group, buf, 120.0)
        return time.perf_counter() - t0

    def raw_get(self, ref_list) -> float:
        import ray

        t0 = time.perf_counter()
        ray.get(ref_list[0]).clone()
        return time.perf_counter() - t0


class Sender:
    def __init__(self, size_mb: float):
        self.weights = synthetic_weights(size_mb)
        self.senders = {}

    def checksum(self) -> float:
        return float(sum(t.double().sum() for _, t in self.weights))

    def sync(self, version, receivers, transport: str, bucket_mb: float) -> dict:
        from dsmath.config import WeightSyncConfig
        from learner.weight_sync import make_sender

        key = (transport, bucket_mb)
        if key not in self.senders:
            self.senders[key] = make_sender(WeightSyncConfig(transport=transport, bucket_mb=bucket_mb, timeout_s=300))
        return self.senders[key].send(self.weights, version, receivers).as_dict()

    def raw_broadcast(self, transport: str, bucket_mb: float) -> float:
        from dsmath.transports.collective import broadcast_from_rank0

        flat = torch.cat([t.reshape(-1) for _, t in self.weights])
        t0 = time.perf_counter()
        broadcast_from_rank0(self.senders[(transport, bucket_mb)].impl.group, flat, 120.0)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64.0, help="state-dict size (float32)")
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--buckets-mb", default="4,16,64", help="comma-separated bucket sizes")
    ap.add_argument("--transports", default="object_store,gloo",
                    help="Ray transports; empty: none (a GPU machine without Ray runs the device arms only)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    buckets = [float(b) for b in args.buckets_mb.split(",")]
    transports = [t for t in args.transports.split(",") if t]
    nbytes = int(args.size_mb * 2**20)
    load_before = os.getloadavg()
    flat = torch.randn(nbytes // 4)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        flat.clone()
    memcpy_bps = nbytes * args.repeats / (time.perf_counter() - t0)
    device_bps, device_note = device_copy_bytes_per_s(nbytes, args.repeats)
    rows, raw, ray_version = ray_arms(args, buckets, transports, flat) if transports else ([], {}, "not used")
    rows += cuda_ipc_arm(args.size_mb, buckets, args.repeats)  # GPU only: skipped (no rows) without one
    load_after = os.getloadavg()

    print(f"\nweight sync: {args.size_mb:.0f} MiB float32 state dict -> {args.receivers} receivers, "
          f"median of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray_version}; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"memcpy (host, one copy): {memcpy_bps / 2**30:.2f} GiB/s   raw bounds: "
          + ", ".join(f"{k} {v / 2**30:.2f} GiB/s" for k, v in raw.items()))
    print(f"device copy (GPU, one copy): " + (f"{device_bps / 2**30:.2f} GiB/s on {device_note}"
                                                if device_bps else device_note))
    print(f"{'transport':<18}{'bucket':>8}{'buckets':>8}{'sync s':>9}{'pause s':>9}{'transfer s':>11}"
          f"{'GiB/s':>8}{'vs raw':>8}{'vs dev':>8}")
    for r in rows:
        ratio = r["bytes_per_s"] / raw[r["transport"]] if r["transport"] in raw else float("nan")
        r["vs_raw"] = ratio
        r["vs_device_copy"] = r["bytes_per_s"] / device_bps if device_bps else None
        vs_dev = f"{r['vs_device_copy']:>7.1%}" if device_bps else f"{'n/a':>7}"
        print(f"{r['transport']:<18}{r['bucket_mb']:>6.0f}MB{r['buckets']:>8}{r['seconds']:>9.3f}{r['pause_s']:>9.3f}"
              f"{r['transfer_s']:>11.3f}{r['bytes_per_s'] / 2**30:>8.2f}{ratio:>7.0%} {vs_dev}")
    print(json.dumps({"bench": "weight_sync", "size_mb": args.size_mb, "receivers": args.receivers,
                      "memcpy_bytes_per_s": memcpy_bps, "raw_bytes_per_s": raw, "rows": rows,
                      "device_copy_bytes_per_s": device_bps, "device_copy_note": device_note,
                      "load_before": load_before[0], "load_after": load_after[0]}))
    return 0


def ray_arms(args, buckets: list[float], transports: list[str], flat: torch.Tensor) -> tuple[list, dict, str]:
    """The Ray transports (sender and receiver actors) and their raw bounds: (rows, raw bytes/s, ray version)."""
    import ray

    nbytes = flat.numel() * flat.element_size()
    ray.init(num_cpus=max(2, args.receivers + 1), num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(
                 os.path.abspath(__file__)))}})
    sender = ray.remote(num_cpus=0.1)(Sender).remote(args.size_mb)
    receivers = {f"gen-{i}": ray.remote(num_cpus=0.1)(Receiver).remote(f"gen-{i}") for i in range(args.receivers)}
    want = ray.get(sender.checksum.remote())

    version = 0
    rows = []
    raw = {}
    for transport in transports:
        for bucket_mb in buckets:
            version += 1  # warm-up: forms the gloo group, imports
            ray.get(sender.sync.remote(version, receivers, transport, bucket_mb))
            runs = []
            for _ in range(args.repeats):
                version += 1
                runs.append(ray.get(sender.sync.remote(version, receivers, transport, bucket_mb)))
            assert all(ray.get(h.version.remote()) == version for h in receivers.values())
            assert all(abs(ray.get(h.checksum.remote()) - want) < 1e-3 * abs(want) + 1e-3 for h in receivers.values())
            med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "pause_s", "transfer_s")}
            rows.append({"transport": transport, "bucket_mb": bucket_mb, "buckets": runs[0]["buckets"],
                         **med, "bytes_per_s": nbytes / med["seconds"]})
            if transport == "gloo" and "gloo" not in raw:
                times = []
                for _ in range(args.repeats):
                    refs = [h.raw_broadcast.remote(nbytes // 4) for h in receivers.values()]
                    times.append(ray.get(sender.raw_broadcast.remote(transport, bucket_mb)))
                    ray.get(refs)
                raw["gloo"] = nbytes / statistics.median(times)
        if transport == "object_store":
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ref = ray.put(flat)
                ray.get([h.raw_get.remote([ref]) for h in receivers.values()])
                times.append(time.perf_counter() - t0)
                del ref
            raw["object_store"] = nbytes / statistics.median(times)
    version_str = ray.__version__
    ray.shutdown()
    return rows, raw, version_str


if __name__ == "__main__":
    sys.exit(main())

"""Weight broadcast: dsmath's bucketed, versioned sync vs the raw link, measured in the same run.

A sender actor (what the learner's rank 0 runs: ``learner.weight_sync.WeightSender``) pushes a synthetic
state dict of ``--size-mb`` to ``--receivers`` receiver actors (``BucketReceiver``, what each generator runs,
minus the engine's in-place load) over each transport and bucket size. The peers, measured between the same
processes in the same run:

* ``raw gloo``: one ``broadcast`` of a flat tensor of the same bytes over the same gloo group — the link's
  bound for the collective transport (no bucketing, no versioning, no RPCs);
* ``raw object store``: one ``ray.put`` + every receiver ``ray.get``-ing it — the bound for that transport;
* ``memcpy``: one host copy of the same bytes — the machine's memory-bandwidth ceiling.

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
        from learner.weight_sync import BucketReceiver

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
        from learner.weight_sync import broadcast_from_rank0

        buf = torch.empty(numel, dtype=torch.float32)
        t0 = time.perf_counter()
        broadcast_from_rank0(self.receiver._group, buf, 120.0)
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
        from learner.weight_sync import broadcast_from_rank0

        flat = torch.cat([t.reshape(-1) for _, t in self.weights])
        t0 = time.perf_counter()
        broadcast_from_rank0(self.senders[(transport, bucket_mb)]._group, flat, 120.0)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64.0, help="state-dict size (float32)")
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--buckets-mb", default="4,16,64", help="comma-separated bucket sizes")
    ap.add_argument("--transports", default="object_store,gloo")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    buckets = [float(b) for b in args.buckets_mb.split(",")]
    transports = args.transports.split(",")
    ray.init(num_cpus=max(2, args.receivers + 1), num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(
                 os.path.abspath(__file__)))}})
    load_before = os.getloadavg()
    sender = ray.remote(num_cpus=0.1)(Sender).remote(args.size_mb)
    receivers = {f"gen-{i}": ray.remote(num_cpus=0.1)(Receiver).remote(f"gen-{i}") for i in range(args.receivers)}
    want = ray.get(sender.checksum.remote())
    nbytes = int(args.size_mb * 2**20)

    flat = torch.randn(nbytes // 4)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        flat.clone()
    memcpy_bps = nbytes * args.repeats / (time.perf_counter() - t0)

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
    load_after = os.getloadavg()

    print(f"\nweight sync: {args.size_mb:.0f} MiB float32 state dict -> {args.receivers} receivers, "
          f"median of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"memcpy (host, one copy): {memcpy_bps / 2**30:.2f} GiB/s   raw bounds: "
          + ", ".join(f"{k} {v / 2**30:.2f} GiB/s" for k, v in raw.items()))
    print(f"{'transport':<13}{'bucket':>8}{'buckets':>8}{'sync s':>9}{'pause s':>9}{'transfer s':>11}"
          f"{'GiB/s':>8}{'vs raw':>8}")
    for r in rows:
        ratio = r["bytes_per_s"] / raw[r["transport"]] if r["transport"] in raw else float("nan")
        r["vs_raw"] = ratio
        print(f"{r['transport']:<13}{r['bucket_mb']:>6.0f}MB{r['buckets']:>8}{r['seconds']:>9.3f}{r['pause_s']:>9.3f}"
              f"{r['transfer_s']:>11.3f}{r['bytes_per_s'] / 2**30:>8.2f}{ratio:>7.0%}")
    print(json.dumps({"bench": "weight_sync", "size_mb": args.size_mb, "receivers": args.receivers,
                      "memcpy_bytes_per_s": memcpy_bps, "raw_bytes_per_s": raw, "rows": rows,
                      "load_before": load_before[0], "load_after": load_after[0]}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

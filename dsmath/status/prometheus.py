"""Prometheus export of a run's status: the same figures as the gRPC snapshot, as gauges.

The collector reads the current snapshot at scrape time (no second copy of the state to keep in sync).
Every series carries a ``run`` label. Names (all gauges):

    dsmath_step, dsmath_total_steps, dsmath_eta_seconds, dsmath_started_at_seconds, dsmath_updated_at_seconds,
    dsmath_run_state{state}, dsmath_reward_mean, dsmath_accuracy, dsmath_tokens_per_second,
    dsmath_step_time_seconds{stage}, dsmath_generator_alive{generator}, dsmath_generator_weight_version{generator},
    dsmath_generator_requests{generator}, dsmath_generator_tokens{generator}, dsmath_queue_depth{queue},
    dsmath_queue_timeout_rate{queue}, dsmath_last_checkpoint_step, dsmath_last_eval_step,
    dsmath_last_eval_accuracy, dsmath_metric{name}
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dsmath.status.snapshot import STATES, RunSnapshot


class SnapshotCollector(Collector):
    """Turns the snapshot returned by ``get_snapshot()`` into gauge families on each scrape."""

    def __init__(self, get_snapshot: Callable[[], RunSnapshot]) -> None:
        self._get = get_snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._get()
        run = [s.run_name]

        def one(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["run"])
            g.add_metric(run, float(value))
            return g

        yield one("dsmath_step", "Current training step.", s.step)
        yield one("dsmath_total_steps", "Steps the run will take.", s.total_steps)
        yield one("dsmath_eta_seconds", "Estimated seconds left (-1 unknown).", s.eta_s)
        yield one("dsmath_started_at_seconds", "Run start, unix seconds.", s.started_at)
        yield one("dsmath_updated_at_seconds", "Last snapshot update, unix seconds.", s.updated_at)
        state = GaugeMetricFamily("dsmath_run_state", "1 for the run's current state.", labels=["run", "state"])
        for name in STATES:
            state.add_metric([s.run_name, name], 1.0 if s.state == name else 0.0)
        yield state
        if s.reward_trend:
            yield one("dsmath_reward_mean", "Mean reward of the last step.", s.reward_trend[-1])
        if s.accuracy_trend:
            yield one("dsmath_accuracy", "Training accuracy of the last step.", s.accuracy_trend[-1])
        yield one("dsmath_tokens_per_second", "Generated tokens per second.", s.tokens_per_s)

        split = GaugeMetricFamily("dsmath_step_time_seconds", "Seconds per stage in the last step.", labels=["run", "stage"])
        for stage, attr in (("generate", "generate_s"), ("reward", "reward_s"), ("train", "train_s"), ("sync", "sync_s")):
            split.add_metric([s.run_name, stage], getattr(s.time_split, attr))
        yield split

        gens = {
            "alive": GaugeMetricFamily("dsmath_generator_alive", "1 if the generator answers.", labels=["run", "generator"]),
            "weight_version": GaugeMetricFamily(
                "dsmath_generator_weight_version", "Policy version loaded.", labels=["run", "generator"]
            ),
            "requests": GaugeMetricFamily("dsmath_generator_requests", "Requests served.", labels=["run", "generator"]),
            "tokens": GaugeMetricFamily("dsmath_generator_tokens", "Tokens generated.", labels=["run", "generator"]),
        }
        for g in s.generators:
            for attr, fam in gens.items():
                fam.add_metric([s.run_name, str(g.id)], float(getattr(g, attr)))
        yield from gens.values()

        depth = GaugeMetricFamily("dsmath_queue_depth", "Items waiting.", labels=["run", "queue"])
        rate = GaugeMetricFamily("dsmath_queue_timeout_rate", "Fraction of recent items that timed out.", labels=["run", "queue"])
        for q in s.queues:
            depth.add_metric([s.run_name, q.name], float(q.depth))
            rate.add_metric([s.run_name, q.name], q.timeout_rate)
        yield depth
        yield rate

        if s.last_checkpoint is not None:
            yield one("dsmath_last_checkpoint_step", "Step of the last checkpoint.", s.last_checkpoint.step)
        if s.last_eval is not None:
            yield one("dsmath_last_eval_step", "Step of the last evaluation.", s.last_eval.step)
            yield one("dsmath_last_eval_accuracy", "Accuracy of the last evaluation.", s.last_eval.accuracy)
        if s.metrics:
            extra = GaugeMetricFamily("dsmath_metric", "Other scalars of the last step.", labels=["run", "name"])
            for name, value in s.metrics:
                extra.add_metric([s.run_name, name], value)
            yield extra


def start_exporter(get_snapshot: Callable[[], RunSnapshot], host: str, port: int) -> tuple[object, threading.Thread, int]:
    """Serve ``/metrics`` on ``host:port`` (0 = any free port) from a private registry.

    Returns (http server, its thread, the bound port). A private registry keeps the process-wide default
    one (and any other exporter in the process) out of it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread, int(server.server_port)

"""How a training run is watched: its status service, Prometheus exporter and Ray metrics, and how a client finds
them for a job submitted with ``ray job submit``.

The driver calls :func:`start_status` once (after Ray is connected) and then uses the returned
:class:`Observability` as it used the status server: ``update(snapshot)`` each step, ``stop()`` at the end.
Each ``update`` also sets the ``ray.util.metrics`` gauges (:class:`RayStepMetrics`), so the same figures appear in
Ray's own Prometheus/Grafana pipeline (the metrics agent's export port) with no extra configuration.

Where the service is (:class:`StatusEndpoint`) is printed, written to ``RUN_DIR/status_endpoint.json`` and, as one
``[dsmath] status endpoint: {json}`` line, lands in the Ray job's driver log. A submitted job's metadata cannot be
changed after submission, and Ray's internal KV is neither public nor reachable through the dashboard address;
the job's log is both, through the Jobs API (``JobSubmissionClient.get_job_logs``). :func:`find_job_endpoint` reads
it back, so ``dsmath status --job JOB_ID --address http://HEAD:8265`` needs no address copied by hand.

Guaranteed: a finished, failed or stopped job, an unknown job id and an unreachable dashboard are each one
:class:`UserError` line (:class:`JobNotRunning` for the first). Not guaranteed: that the endpoint's host is
reachable from the client's network (it is the driver node's Ray IP); the token of a generated-token run is in
``RUN_DIR/status_token`` on the driver's node, never in the log.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsmath.config import TrainConfig
from dsmath.errors import UserError
from dsmath.status.snapshot import METRIC_TIME_KEYS, RunSnapshot
from wiring.console import log

ENDPOINT_MARKER = "[dsmath] status endpoint: "
ENDPOINT_FILE = "status_endpoint.json"
_TIME_STAGE = {attr: key.split("/", 1)[1] for attr, key in METRIC_TIME_KEYS.items()}  # generate_s -> rollout
_RESTART_KEYS = {"faults/generator_restarts": "generator", "faults/reward_worker_restarts": "reward_worker"}


class JobNotRunning(UserError):
    """The submitted job has ended (succeeded, failed or stopped); ``state``: Ray's, lowercase."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class JobNotReady(UserError):
    """The submitted job has not put up its status server yet (still pending, or running but not yet past set-up):
    a later lookup may succeed (``dsmath status --job ... --wait S``)."""


@dataclass(frozen=True)
class StatusEndpoint:
    """Where a run's status can be read: gRPC ``address`` (``grpcs://`` with TLS), the generated token's file on the
    driver's node ("" without one), the Prometheus URL ("" when off), and the Ray job id ("" outside Ray jobs)."""

    address: str
    token_file: str = ""
    prometheus: str = ""
    run_dir: str = ""
    ray_job_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StatusEndpoint:
        data = json.loads(text)
        return cls(**{k: str(data[k]) for k in cls.__dataclass_fields__ if k in data})


class RayStepMetrics:
    """The step figures as ``ray.util.metrics`` gauges, all tagged ``run`` (names mirror the Prometheus exporter's):

    dsmath_step, dsmath_reward_mean, dsmath_accuracy, dsmath_kl, dsmath_tokens_per_second,
    dsmath_stage_seconds{stage}, dsmath_generator_weight_version{generator}, dsmath_generator_alive{generator},
    dsmath_queue_depth{queue}, dsmath_restarts{pool}.

    Needs a connected Ray (the driver has one). Ray's metrics agent exports them, as ``ray_dsmath_*``, on its metrics
    export port every few seconds (``metrics_report_interval_ms``); a figure the row lacks keeps its last value.
    """

    def __init__(self, run_name: str) -> None:
        from ray.util.metrics import Gauge

        self.run = run_name

        def gauge(name: str, doc: str, *tags: str) -> Any:
            return Gauge(name, description=doc, tag_keys=("run", *tags))

        self.step = gauge("dsmath_step", "Current training step.")
        self.reward = gauge("dsmath_reward_mean", "Mean reward of the last step.")
        self.accuracy = gauge("dsmath_accuracy", "Training accuracy of the last step.")
        self.kl = gauge("dsmath_kl", "KL to the reference policy in the last update.")
        self.tokens = gauge("dsmath_tokens_per_second", "Generated tokens per second.")
        self.stage = gauge("dsmath_stage_seconds", "Seconds per stage in the last step.", "stage")
        self.version = gauge("dsmath_generator_weight_version", "Policy version a generator holds.", "generator")
        self.alive = gauge("dsmath_generator_alive", "1 if the generator answered the last probe.", "generator")
        self.queue = gauge("dsmath_queue_depth", "Items waiting.", "queue")
        self.restarts = gauge("dsmath_restarts", "Actor restarts so far in the run.", "pool")

    def record(self, snap: RunSnapshot) -> None:
        """Set every gauge from one snapshot (the one the status server serves)."""
        run = {"run": self.run}
        metrics = dict(snap.metrics)
        self.step.set(snap.step, tags=run)
        if snap.reward_trend:
            self.reward.set(snap.reward_trend[-1], tags=run)
        if snap.accuracy_trend:
            self.accuracy.set(snap.accuracy_trend[-1], tags=run)
        kl = metrics.get("train/kl", metrics.get("kl"))
        if kl is not None:
            self.kl.set(kl, tags=run)
        self.tokens.set(snap.tokens_per_s, tags=run)
        stages = {stage: getattr(snap.time_split, attr) for attr, stage in _TIME_STAGE.items()}
        stages.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("time/")})
        for stage, seconds in stages.items():
            self.stage.set(seconds, tags={**run, "stage": stage})
        for g in snap.generators:
            self.version.set(g.weight_version, tags={**run, "generator": str(g.id)})
            self.alive.set(1.0 if g.alive else 0.0, tags={**run, "generator": str(g.id)})
        for q in snap.queues:
            self.queue.set(q.depth, tags={**run, "queue": q.name})
        for key, pool in _RESTART_KEYS.items():
            if key in metrics:
                self.restarts.set(metrics[key], tags={**run, "pool": pool})


class Observability:
    """The status server plus the Ray gauges behind one ``update``/``stop``; ``address`` is the server's."""

    def __init__(self, server: Any, ray_metrics: RayStepMetrics | None, endpoint: StatusEndpoint) -> None:
        self.server = server
        self.ray_metrics = ray_metrics
        self.endpoint = endpoint

    @property
    def address(self) -> str:
        return self.server.address

    def update(self, snapshot: dict | RunSnapshot) -> RunSnapshot:
        snap = self.server.update(snapshot)
        if self.ray_metrics is not None:
            self.ray_metrics.record(snap)
        return snap

    def stop(self) -> None:
        self.server.stop()


def start_status(cfg: TrainConfig, run_dir: Path, first: RunSnapshot) -> Observability:
    """Start the status service (and the exporter, and the Ray gauges) as ``cfg.status`` says, and publish where it
    is: printed, ``RUN_DIR/status_endpoint.json`` and the job's log. ``first`` (the run's name, its step and total)
    is served from the first call on: a client that reads ``status_address`` the moment it appears never sees an
    unnamed, zero-step run. Refuses (one line) a non-loopback bind with no token."""
    import ray

    from dsmath.status import StatusServer
    from dsmath.status.auth import server_token

    st = cfg.status
    token, token_file = server_token(st.token, st.host, run_dir)
    server = StatusServer(host=st.host, port=st.port, token=token, run_dir=run_dir,
                          prometheus_port=None if st.prometheus_port < 0 else st.prometheus_port,
                          prometheus_host=st.prometheus_host or None, tls_cert=st.tls_cert or None,
                          tls_key=st.tls_key or None, advertise_host=ray.util.get_node_ip_address(), initial=first)
    job_id = ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    endpoint = StatusEndpoint(address=server.address, token_file=str(token_file or ""),
                              prometheus=server.prometheus_address or "", run_dir=str(run_dir.resolve()),
                              ray_job_id=job_id)
    (run_dir / ENDPOINT_FILE).write_text(endpoint.to_json() + "\n")
    ray_metrics = RayStepMetrics(run_dir.name) if st.ray_metrics and ray.is_initialized() else None
    if ray_metrics is not None:
        ray_metrics.record(first)
    log(f"status: dsmath status {run_dir}   (gRPC on {server.address}"
        f"{', token in ' + str(token_file) if token_file else ', token required' if token else ''})")
    if endpoint.prometheus:
        log(f"prometheus: {endpoint.prometheus}")
    print(ENDPOINT_MARKER + endpoint.to_json(), flush=True)  # read back by find_job_endpoint
    return Observability(server, ray_metrics, endpoint)


def find_job_endpoint(job_id: str, dashboard: str) -> StatusEndpoint:
    """The status endpoint of Ray job ``job_id`` (submission id or job id) on the cluster whose dashboard/job server
    is ``dashboard`` (``http://HEAD:8265``), through the Ray Jobs API. One-line errors: dashboard unreachable, no
    such job, job ended (:class:`JobNotRunning`), job pending or running but no status line yet
    (:class:`JobNotReady`)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(dashboard)
    except Exception as exc:  # noqa: BLE001 - the SDK raises ConnectionError/RuntimeError/ValueError alike
        raise UserError(f"no Ray job server answers at {dashboard} ({_first_line(exc)})") from None
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"Ray job {job_id!r} not found at {dashboard} ({_first_line(exc)})") from None
    state = info.status.value.lower()
    if info.status != JobStatus.RUNNING and not info.status.is_terminal():
        raise JobNotReady(f"Ray job {job_id} is {state}: it has not started yet; retry in a few seconds (or --wait S)")
    if info.status != JobStatus.RUNNING:
        raise JobNotRunning(f"Ray job {job_id} is {state}: its status server is gone; `dsmath status RUN_DIR` on "
                            f"the driver's node shows the final figures", state)
    endpoint = None
    for line in client.get_job_logs(job_id).splitlines():
        if line.startswith(ENDPOINT_MARKER):
            endpoint = StatusEndpoint.from_json(line[len(ENDPOINT_MARKER):])  # the last one wins (a resumed run)
    if endpoint is None:
        raise JobNotReady(f"Ray job {job_id} is running but has not printed its status endpoint yet (still setting "
                          f"up, or not a `dsmath train` job); retry in a few seconds (or --wait S)")
    return endpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

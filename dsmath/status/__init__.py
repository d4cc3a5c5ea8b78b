"""Live status of a training run: snapshot schema, gRPC server/client, terminal rendering, Prometheus export.

Importing this package is cheap and loads neither gRPC nor prometheus_client; they load with
:class:`StatusServer` / :func:`fetch_snapshot` on first use.
"""

from __future__ import annotations

from typing import Any

from dsmath.status.snapshot import (
    Checkpoint,
    EvalResult,
    GeneratorHealth,
    QueueStats,
    RunSnapshot,
    SnapshotBuilder,
    TimeSplit,
    snapshot_from_run_dir,
)

__all__ = [
    "Checkpoint",
    "EvalResult",
    "GeneratorHealth",
    "QueueStats",
    "RunSnapshot",
    "SnapshotBuilder",
    "StatusServer",
    "TimeSplit",
    "fetch_snapshot",
    "load_status",
    "render",
    "snapshot_from_run_dir",
]


def __getattr__(name: str) -> Any:
    if name == "StatusServer":
        from dsmath.status.server import StatusServer

        return StatusServer
    if name in ("fetch_snapshot", "load_status"):
        from dsmath.status import client

        return getattr(client, name)
    if name == "render":
        from dsmath.status.view import render

        return render
    raise AttributeError(f"module 'dsmath.status' has no attribute {name!r}")

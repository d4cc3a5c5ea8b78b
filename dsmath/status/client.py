"""Reading a run's status: over gRPC from a live job, or from the files of a finished one."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from dsmath.errors import UserError
from dsmath.proto import status_pb2, status_pb2_grpc
from dsmath.status.snapshot import ADDRESS_FILE, RunSnapshot, snapshot_from_run_dir

TOKEN_ENV = "DSMATH_STATUS_TOKEN"


class StatusUnreachable(UserError):
    """Nobody answers at the address (job finished, crashed, or a firewall in the way)."""


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else env ``DSMATH_STATUS_TOKEN``, else none."""
    return token if token else (os.environ.get(TOKEN_ENV) or None)


def fetch_snapshot(address: str, token: str | None = None, timeout_s: float = 5.0) -> RunSnapshot:
    """One ``GetStatus`` call. Raises :class:`StatusUnreachable` when no server answers within
    ``timeout_s``, :class:`UserError` when the token is missing or wrong."""
    if ":" not in address:
        raise UserError(f"status address {address!r} must be HOST:PORT")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = status_pb2_grpc.StatusServiceStub(channel)
        try:
            msg = stub.GetStatus(status_pb2.GetStatusRequest(), metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                hint = "wrong token" if token else "the job requires a token"
                raise UserError(
                    f"status server at {address} rejected the request ({hint}); pass --token or set {TOKEN_ENV}"
                ) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StatusUnreachable(f"no status server answers at {address}") from None
            raise UserError(f"status server at {address}: {code.name if code else 'error'}: {exc.details()}") from None
    return RunSnapshot.from_proto(msg)


def read_address(run_dir: str | Path) -> str | None:
    """The live job's ``host:port`` from ``RUN_DIR/status_address``, or None when there is none."""
    path = Path(run_dir) / ADDRESS_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def load_status(run_dir: str | Path, token: str | None = None, timeout_s: float = 2.0) -> tuple[RunSnapshot, str]:
    """The run's snapshot and where it came from (``"live HOST:PORT"`` or ``"files RUN_DIR"``).

    Live when ``status_address`` exists and the server answers; otherwise rebuilt from ``status.json``
    and ``metrics.jsonl``. A wrong token is an error, never a silent fallback to stale files.
    """
    address = read_address(run_dir)
    if address:
        try:
            return fetch_snapshot(address, token, timeout_s), f"live {address}"
        except StatusUnreachable:
            snap = snapshot_from_run_dir(run_dir)
            return snap, f"files {run_dir} (status server {address} not answering)"
    return snapshot_from_run_dir(run_dir), f"files {run_dir}"

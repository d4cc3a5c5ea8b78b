"""Reading a run's status: over gRPC from a live job, or from the files of a finished one."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from dsmath.errors import UserError
from dsmath.proto import status_pb2, status_pb2_grpc
from dsmath.status.auth import read_run_token, split_address
from dsmath.status.snapshot import ADDRESS_FILE, RunSnapshot, snapshot_from_run_dir

TOKEN_ENV = "DSMATH_STATUS_TOKEN"


class StatusUnreachable(UserError):
    """Nobody answers at the address (job finished, crashed, or a firewall in the way)."""


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else env ``DSMATH_STATUS_TOKEN``, else none."""
    return token if token else (os.environ.get(TOKEN_ENV) or None)


def _rpc_error(address: str, token: str | None, exc: grpc.RpcError) -> UserError:
    """One line saying what went wrong with a ``GetStatus`` call and what to do about it."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    details = details.splitlines()[0][:200] if details else ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = "wrong token" if token else "the job requires a token"
        return UserError(f"status server at {address} rejected the request ({hint}); pass --token or set {TOKEN_ENV}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return UserError(f"status server at {address} refused access ({details}); check --token / {TOKEN_ENV}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return StatusUnreachable(f"no status server answers at {address} (the job may have ended, or HOST:PORT is "
                                 f"another service; check RUN_DIR/status_address, or read the run's files: "
                                 f"dsmath status RUN_DIR)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StatusUnreachable(f"status server at {address} did not answer in time (raise --timeout, or check "
                                 f"that HOST:PORT is the job's status server and not another service)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return UserError(f"status server at {address} is overloaded ({details}); retry in a few seconds")
    name = code.name if code else "error"
    return UserError(f"status server at {address} answered {name} ({details or 'no details'}); is HOST:PORT a "
                     f"dsmath status server?")


def _channel(target: str, tls: bool, tls_ca: str | None) -> grpc.Channel:
    """A plaintext channel, or a TLS one trusting ``tls_ca`` (PEM; default: the system's roots)."""
    if not tls and not tls_ca:
        return grpc.insecure_channel(target)
    try:
        roots = Path(tls_ca).read_bytes() if tls_ca else None
    except OSError as exc:
        raise UserError(f"--tls-ca: cannot read {tls_ca} ({exc.strerror})") from None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))


def fetch_snapshot(address: str, token: str | None = None, timeout_s: float = 5.0,
                   tls_ca: str | None = None) -> RunSnapshot:
    """One ``GetStatus`` call. Raises :class:`StatusUnreachable` when no server answers within
    ``timeout_s``, :class:`UserError` (one line saying what to do) for a bad address, a missing or wrong
    token, any other gRPC failure and an answer that is not a status snapshot. ``grpcs://HOST:PORT`` (or
    ``tls_ca``) dials TLS."""
    target, tls = split_address(address)
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in address):
        raise UserError(f"status address {address!r} must be HOST:PORT (e.g. 127.0.0.1:50051)")
    if timeout_s <= 0:
        raise UserError(f"--timeout must be > 0, got {timeout_s}")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        with _channel(target, tls, tls_ca) as channel:
            stub = status_pb2_grpc.StatusServiceStub(channel)
            msg = stub.GetStatus(status_pb2.GetStatusRequest(), metadata=metadata, timeout=timeout_s)
    except grpc.RpcError as exc:
        raise _rpc_error(address, token, exc) from None
    except ValueError as exc:  # e.g. a token that is not a valid header value
        raise UserError(f"status request to {address} could not be sent ({exc}); check --token") from None
    try:
        return RunSnapshot.from_proto(msg)
    except (TypeError, ValueError) as exc:
        raise UserError(f"status server at {address} sent a snapshot dsmath cannot read ({exc}); is it the same "
                        f"dsmath version?") from None


def read_address(run_dir: str | Path) -> str | None:
    """The live job's ``host:port`` from ``RUN_DIR/status_address``, or None when there is none.

    A damaged file (binary junk, a directory, not ``HOST:PORT``) is a one-line :class:`UserError` naming it."""
    from dsmath.userfiles import read_text

    path = Path(run_dir) / ADDRESS_FILE
    if not path.exists() and not path.is_symlink():
        return None
    text = read_text(path, "status address file").strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or "\n" in text or len(text) > 300:
        raise UserError(f"{path}: expected HOST:PORT, found {text[:60]!r}; delete the file if the job has ended")
    return text


def load_status(run_dir: str | Path, token: str | None = None, timeout_s: float = 2.0,
                tls_ca: str | None = None) -> tuple[RunSnapshot, str]:
    """The run's snapshot and where it came from (``"live HOST:PORT"`` or ``"files RUN_DIR"``).

    Live when ``status_address`` exists and the server answers; otherwise rebuilt from ``status.json``
    and ``metrics.jsonl``. Without ``token`` the run's generated ``RUN_DIR/status_token`` is used when this
    user can read it. A wrong token is an error, never a silent fallback to stale files.
    """
    address = read_address(run_dir)
    if address:
        try:
            return fetch_snapshot(address, token or read_run_token(run_dir), timeout_s, tls_ca), f"live {address}"
        except StatusUnreachable:
            snap = snapshot_from_run_dir(run_dir)
            return snap, f"files {run_dir} (status server {address} not answering)"
    return snapshot_from_run_dir(run_dir), f"files {run_dir}"


def latest_run_dir(runs_root: str | Path = "runs") -> Path:
    """The most recent run: ``RUNS_ROOT/latest`` when it exists (a symlink the driver maintains, or a folder),
    else the newest folder under ``RUNS_ROOT`` holding ``status.json`` or ``metrics.jsonl`` (by modification time).
    A one-line :class:`UserError` when there is none."""
    root = Path(runs_root)
    latest = root / "latest"
    if latest.is_dir():
        return latest
    candidates = [d for d in (root.iterdir() if root.is_dir() else ())
                  if d.is_dir() and ((d / "status.json").exists() or (d / "metrics.jsonl").exists())]
    if not candidates:
        raise UserError(f"no run under {root}/ (give RUN_DIR, --address HOST:PORT or --job JOB_ID --address URL)")

    def touched(d: Path) -> float:
        return max((d / f).stat().st_mtime for f in ("status.json", "metrics.jsonl") if (d / f).exists())

    return max(candidates, key=touched)


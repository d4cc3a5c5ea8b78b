"""The live status service a training job serves: gRPC ``StatusService`` plus optional Prometheus gauges.

Usage from the driver::

    server = StatusServer(port=cfg.status.port, run_dir=cfg.run_dir, prometheus_port=9400)
    for step in ...:
        server.update({"run_name": ..., "step": step, "total_steps": n, "reward_trend": [...], ...})
    server.update({..., "state": "finished"}); server.stop()

Guaranteed: ``update`` is thread-safe and cheap (a validated swap of one immutable snapshot; readers never
see a half-written one); with ``run_dir`` the server writes ``RUN_DIR/status_address`` once serving (after
``status.json`` of the ``initial`` snapshot, so a reader that finds the address is served that snapshot, never an
empty one), ``RUN_DIR/status.json`` atomically on every update, and removes ``status_address`` on ``stop``.
With a token (argument, else env ``DSMATH_STATUS_TOKEN``) every RPC must carry metadata
``authorization: Bearer <token>`` or is answered UNAUTHENTICATED. A host other than loopback without a token is
refused (:class:`UserError`): the figures would be open to anyone who reaches the port. With ``tls_cert`` and
``tls_key`` (PEM) the port speaks TLS and :attr:`StatusServer.address` reads ``grpcs://HOST:PORT``.
The Prometheus endpoint is never token-protected: bind it to 127.0.0.1 or a private network.
Not guaranteed: the figures' freshness; that is the driver's ``update`` cadence.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from dsmath.errors import UserError
from dsmath.proto import status_pb2_grpc
from dsmath.status.auth import TLS_SCHEME, is_loopback
from dsmath.status.snapshot import ADDRESS_FILE, STATUS_FILE, RunSnapshot

TOKEN_ENV = "DSMATH_STATUS_TOKEN"


class _Servicer(status_pb2_grpc.StatusServiceServicer):
    def __init__(self, owner: StatusServer) -> None:
        self._owner = owner

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC name)
        return self._owner.snapshot.to_proto()


class _BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose ``authorization`` metadata is not ``Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def reject(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong status token")

        self._reject = grpc.unary_unary_rpc_method_handler(reject)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if isinstance(got, str):
            got = got.encode()
        if hmac.compare_digest(got, self._expected):
            return continuation(handler_call_details)
        return self._reject


def _advertised_host(host: str, advertise: str | None = None) -> str:
    # A wildcard bind is not an address a client can dial; advertise ``advertise`` (e.g. the Ray node's IP),
    # else this machine's name, instead.
    if host in ("0.0.0.0", "::", "[::]", ""):
        return advertise or socket.getfqdn()
    return host


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old or the new file, never a torn one


class StatusServer:
    """gRPC status service for one run; see the module docstring for guarantees."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        run_dir: str | Path | None = None,
        prometheus_port: int | None = None,
        prometheus_host: str | None = None,
        initial: dict[str, Any] | RunSnapshot | None = None,
        max_workers: int = 4,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self.host = host
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        if not self.token and not is_loopback(host):
            raise UserError(f"status server: binding {host} without a token would let anyone who reaches the port "
                            f"read the run; set a token (status.token=auto) or bind 127.0.0.1")
        self.tls = bool(tls_cert and tls_key)
        self._advertise = advertise_host
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._lock = threading.Lock()
        self._snapshot = RunSnapshot()
        self._stopped = False
        if initial is not None:
            self._snapshot = initial if isinstance(initial, RunSnapshot) else RunSnapshot.from_dict(initial)

        interceptors = [_BearerTokenInterceptor(self.token)] if self.token else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dsmath-status"),
            interceptors=interceptors,
        )
        status_pb2_grpc.add_StatusServiceServicer_to_server(_Servicer(self), self._server)
        bind = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            if self.tls:
                pair = (Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())  # type: ignore[arg-type]
                self.port = self._server.add_secure_port(bind, grpc.ssl_server_credentials([pair]))
            else:
                self.port = self._server.add_insecure_port(bind)
        except OSError as exc:
            raise UserError(f"status server: cannot read the TLS key/certificate ({exc})") from None
        except RuntimeError as exc:
            raise UserError(f"status server: cannot listen on {bind} ({exc}); pick another status.port") from None
        if self.port == 0:
            raise UserError(f"status server: cannot listen on {bind}; pick another status.port")
        self._server.start()

        self.prometheus_port: int | None = None
        self._prom_host = prometheus_host or host
        self._prom_server = None
        self._prom_thread = None
        if prometheus_port is not None:
            from dsmath.status.prometheus import start_exporter

            self._prom_server, self._prom_thread, self.prometheus_port = start_exporter(
                lambda: self.snapshot, prometheus_host or host, prometheus_port
            )

        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if initial is not None:
                _atomic_write(self.run_dir / STATUS_FILE, self._snapshot.to_json() + "\n")
            _atomic_write(self.run_dir / ADDRESS_FILE, self.address + "\n")

    @property
    def address(self) -> str:
        """``host:port`` a client on this network can dial (``grpcs://host:port`` with TLS)."""
        host = _advertised_host(self.host, self._advertise)
        return f"{TLS_SCHEME if self.tls else ''}{host}:{self.port}"

    @property
    def prometheus_address(self) -> str | None:
        """``http://host:port/metrics`` of the exporter, or None without one."""
        if self.prometheus_port is None:
            return None
        host = _advertised_host(self._prom_host, self._advertise)
        return f"http://{host}:{self.prometheus_port}/metrics"

    @property
    def snapshot(self) -> RunSnapshot:
        with self._lock:
            return self._snapshot

    def update(self, snapshot: dict[str, Any] | RunSnapshot) -> RunSnapshot:
        """Replace the served snapshot (validated; ``ValueError`` names a bad key). Returns what is served."""
        snap = snapshot if isinstance(snapshot, RunSnapshot) else RunSnapshot.from_dict(snapshot)
        with self._lock:
            self._snapshot = snap
            if self.run_dir is not None and not self._stopped:
                _atomic_write(self.run_dir / STATUS_FILE, snap.to_json() + "\n")
        return snap

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving (idempotent); removes ``status_address`` so readers fall back to the files."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.run_dir is not None:
            try:
                (self.run_dir / ADDRESS_FILE).unlink()
            except FileNotFoundError:
                pass
        self._server.stop(grace_s).wait()
        if self._prom_server is not None:
            self._prom_server.shutdown()
            self._prom_server.server_close()
            if self._prom_thread is not None:
                self._prom_thread.join(timeout=5)

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

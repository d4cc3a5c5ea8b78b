"""The sandbox as a gRPC service (``dsmath sandbox serve``) and its client.

Server: bearer-token auth on every call (``authorization: Bearer <token>``; otherwise UNAUTHENTICATED),
optional TLS, ``workers`` programs at a time, at most ``max_queue`` more admitted calls waiting; a call
beyond that is answered RESOURCE_EXHAUSTED at once (never queued without bound, never left hanging).
Client: :class:`SandboxClient` has the pool's ``run(...) -> ExecResult`` signature, so reward code takes
either a local :class:`SandboxPool` or a remote service.
"""

from __future__ import annotations

import hmac
import os
import threading
from concurrent import futures

import grpc

from dsmath.errors import UserError
from dsmath.proto import sandbox_pb2, sandbox_pb2_grpc
from dsmath.sandbox.pool import SandboxError, SandboxPool
from dsmath.sandbox.result import ExecResult

TOKEN_ENV = "DSMATH_SANDBOX_TOKEN"
MAX_CODE_BYTES = 1024 * 1024


class SandboxBusy(SandboxError):
    """The service's queue is full (RESOURCE_EXHAUSTED): retry later or elsewhere."""


class SandboxAuthError(SandboxError):
    """The service rejected the token (UNAUTHENTICATED)."""


class _BearerAuth(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else value.decode(errors="replace")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


class SandboxServicer(sandbox_pb2_grpc.SandboxServicer):
    """Runs requests on a SandboxPool with admission control (workers + max_queue calls at most)."""

    def __init__(self, pool: SandboxPool, max_queue: int) -> None:
        self.pool = pool
        self.max_queue = max_queue
        self._capacity = pool.size + max_queue
        self._lock = threading.Lock()
        self._admitted = 0
        self.rejected = 0

    def Run(self, request, context):  # noqa: N802 - gRPC naming
        with self._lock:
            full = self._admitted >= self._capacity
            if full:
                self.rejected += 1
            else:
                self._admitted += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"sandbox queue full ({self.pool.size} running, {self.max_queue} waiting)")
        try:
            if len(request.code.encode()) > MAX_CODE_BYTES:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"code is over {MAX_CODE_BYTES} bytes")
            try:
                result = self.pool.run(
                    request.code,
                    timeout_s=request.timeout_s or None,
                    memory_mb=int(request.memory_mb) or None,
                    max_output_bytes=int(request.max_output_bytes) or None,
                )
            except UserError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except SandboxError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return _to_proto(result)
        finally:
            with self._lock:
                self._admitted -= 1

    def Health(self, request, context):  # noqa: N802
        stats = self.pool.stats()
        with self._lock:
            queued = max(0, self._admitted - stats["busy"])
            rejected = self.rejected
        return sandbox_pb2.HealthResponse(
            workers=self.pool.size, busy=stats["busy"], queued=queued, max_queue=self.max_queue,
            runs=stats["runs"], timeouts=stats["timeouts"], rejected=rejected, namespaces=self.pool.namespaces)


def _to_proto(r: ExecResult) -> sandbox_pb2.RunResponse:
    return sandbox_pb2.RunResponse(
        stdout=r.stdout, stderr=r.stderr, has_exit_code=r.exit_code is not None, exit_code=r.exit_code or 0,
        timed_out=r.timed_out, memory_exceeded=r.memory_exceeded, output_truncated=r.output_truncated,
        signal=int(r.signal or 0), wall_s=r.wall_s, cpu_s=r.cpu_s)


def _from_proto(p: sandbox_pb2.RunResponse) -> ExecResult:
    return ExecResult(
        stdout=p.stdout, stderr=p.stderr, exit_code=p.exit_code if p.has_exit_code else None, timed_out=p.timed_out,
        memory_exceeded=p.memory_exceeded, output_truncated=p.output_truncated, signal=p.signal or None,
        wall_s=p.wall_s, cpu_s=p.cpu_s)


class SandboxServer:
    """A running sandbox service; ``port`` is the bound port (useful with port=0)."""

    def __init__(self, server: grpc.Server, port: int, pool: SandboxPool, servicer: SandboxServicer,
                 owns_pool: bool) -> None:
        self.server, self.port, self.pool, self.servicer = server, port, pool, servicer
        self._owns_pool = owns_pool

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        if self._owns_pool:
            self.pool.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(*, host: str = "127.0.0.1", port: int = 50052, token: str | None = None, workers: int = 2,
          max_queue: int = 16, tls_cert: str | None = None, tls_key: str | None = None,
          pool: SandboxPool | None = None) -> SandboxServer:
    """Start the service (non-blocking). A token is required: ``token`` or $DSMATH_SANDBOX_TOKEN."""
    token = token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise UserError(f"a token is required: pass --token or set {TOKEN_ENV}")
    if max_queue < 0 or workers < 1:
        raise UserError(f"need workers >= 1 and max_queue >= 0, got {workers} and {max_queue}")
    if bool(tls_cert) != bool(tls_key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    owns_pool = pool is None
    pool = pool or SandboxPool(size=workers)
    servicer = SandboxServicer(pool, max_queue)
    # Threads beyond the admitted capacity exist only to answer RESOURCE_EXHAUSTED promptly; past them
    # gRPC itself rejects (maximum_concurrent_rpcs), so no call waits unboundedly for a thread.
    threads = pool.size + max_queue + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sandbox-rpc"),
        interceptors=[_BearerAuth(token)], maximum_concurrent_rpcs=threads,
        options=[("grpc.max_receive_message_length", MAX_CODE_BYTES + 4096)])
    sandbox_pb2_grpc.add_SandboxServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    try:
        if tls_cert:
            try:
                with open(tls_cert, "rb") as f:
                    cert = f.read()
                with open(tls_key, "rb") as f:
                    key = f.read()
            except OSError as exc:
                raise UserError(f"cannot read TLS file: {exc}") from exc
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        bound = 0
        reason = str(exc)
    else:
        reason = "port in use or bad address"
    if not bound:
        if owns_pool:
            pool.close()
        raise UserError(f"cannot listen on {address}: {reason}")
    server.start()
    return SandboxServer(server, bound, pool, servicer, owns_pool)


class SandboxClient:
    """Remote twin of SandboxPool: ``run(code, timeout_s=, memory_mb=, max_output_bytes=) -> ExecResult``.

    Raises SandboxBusy when the service's queue is full, SandboxAuthError on a bad token, SandboxError
    for other service failures. Thread-safe (one gRPC channel).
    """

    def __init__(self, address: str, token: str | None = None, *, root_certificates: bytes | None = None,
                 tls: bool = False, rpc_margin_s: float = 30.0) -> None:
        self.address = address
        token = token or os.environ.get(TOKEN_ENV, "")
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._margin = rpc_margin_s
        if tls or root_certificates:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = sandbox_pb2_grpc.SandboxStub(self._channel)

    def run(self, code: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
            max_output_bytes: int = 64 * 1024) -> ExecResult:
        if len(code.encode()) > MAX_CODE_BYTES:
            raise UserError(f"code is over {MAX_CODE_BYTES} bytes")
        request = sandbox_pb2.RunRequest(code=code, timeout_s=timeout_s, memory_mb=memory_mb,
                                         max_output_bytes=max_output_bytes)
        try:
            reply = self._stub.Run(request, metadata=self._metadata, timeout=timeout_s + self._margin)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        return _from_proto(reply)

    def health(self) -> sandbox_pb2.HealthResponse:
        try:
            return self._stub.Health(sandbox_pb2.HealthRequest(), metadata=self._metadata, timeout=self._margin)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SandboxClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _translate(exc: grpc.RpcError) -> Exception:
    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        return UserError(f"request too large: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return SandboxBusy(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SandboxAuthError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UserError(details)
    return SandboxError(f"{code.name}: {details}")

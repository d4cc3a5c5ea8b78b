"""The sandbox as a gRPC service (``dsmath sandbox serve``) and its client.

Server: bearer-token auth on every call (``authorization: Bearer <token>``; otherwise UNAUTHENTICATED); the
token must be at least 16 characters with no whitespace (refused at start-up otherwise); optional TLS;
``workers`` programs at a time, at most ``max_queue`` more admitted calls waiting; a call beyond that is
answered RESOURCE_EXHAUSTED at once (never queued without bound, never left hanging).

The server decides its limits: ``ServerLimits`` holds maxima for time, memory and output; a request may ask
for less (0 = the server's default) but never more (a larger value is clamped, not obeyed). A call whose
client cancels has its program killed within ~50 ms (counted as cancelled); a call whose deadline passes has it
killed at the deadline (the run's time limit is the call's time left; counted as a timeout). Every rejection the service makes is counted in ``Health.rejected`` (bad token, full queue,
undecodable or oversized request, bad limits); messages over ``MAX_MESSAGE_BYTES`` are refused by gRPC
itself before any handler sees them and are the one kind not counted. ``SandboxServer.drain`` (SIGTERM in
the CLI) stops admitting calls and lets the admitted ones finish.
Client: :class:`SandboxClient` has the pool's ``run(...) -> ExecResult`` signature, so reward code takes
either a local :class:`SandboxPool` or a remote service.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from dsmath.errors import UserError
from dsmath.proto import sandbox_pb2, sandbox_pb2_grpc
from dsmath.sandbox.pool import SandboxCancelled, SandboxError, SandboxPool
from dsmath.sandbox.result import ExecResult

TOKEN_ENV = "DSMATH_SANDBOX_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_CODE_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * MAX_CODE_BYTES  # gRPC's own cap; between MAX_CODE_BYTES and this, we refuse (counted)
CLIENT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
_SERVICE = "dsmath.sandbox.v1.Sandbox"


class SandboxBusy(SandboxError):
    """The service's queue is full (RESOURCE_EXHAUSTED): retry later or elsewhere."""


class SandboxAuthError(SandboxError):
    """The service rejected the token (UNAUTHENTICATED)."""


@dataclass(frozen=True)
class ServerLimits:
    """Server-side maxima a request can lower but not raise. Output is per stream (stdout, stderr)."""

    max_timeout_s: float = 30.0
    max_memory_mb: int = 1024
    max_output_bytes: int = 1024 * 1024

    def validated(self) -> "ServerLimits":
        if not (0 < self.max_timeout_s <= 3600):
            raise UserError(f"server max_timeout_s must be in (0, 3600], got {self.max_timeout_s}")
        if not (0 < self.max_memory_mb <= 1024 * 1024):
            raise UserError(f"server max_memory_mb must be in (0, 1 TiB], got {self.max_memory_mb}")
        if not (0 < self.max_output_bytes <= 8 * 1024 * 1024):
            raise UserError(f"server max_output_bytes must be in (0, 8 MiB], got {self.max_output_bytes}")
        return self


def check_token(token: str) -> str:
    """The token if strong enough to guard a code-execution service, else a one-line UserError."""
    if not token:
        raise UserError(f"a token is required: pass --token or set {TOKEN_ENV}")
    if any(ch.isspace() for ch in token) or len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"the sandbox token must be at least {MIN_TOKEN_CHARS} characters with no whitespace "
                        f"(got {len(token)} characters); e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


class _Counters:
    """Thread-safe counters of what the service refused or abandoned."""

    KINDS = ("unauthenticated", "busy", "invalid", "draining")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {k: 0 for k in self.KINDS + ("cancelled", "failed")}

    def add(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.counts)
        out["rejected"] = sum(out[k] for k in self.KINDS)
        return out


class _BearerAuth(grpc.ServerInterceptor):
    def __init__(self, token: str, counters: _Counters) -> None:
        self._expected = f"Bearer {token}".encode()
        self._counters = counters

        def deny(_request, context):
            counters.add("unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        # Raw bytes in: an unauthenticated caller's payload is never even parsed.
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else value.decode(errors="replace")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


class SandboxServicer:
    """Runs requests on a SandboxPool with admission control (workers + max_queue calls at most), clamped
    to ``limits``; ``counters`` says what was refused, cancelled or failed."""

    def __init__(self, pool: SandboxPool, max_queue: int, limits: ServerLimits | None = None,
                 counters: _Counters | None = None) -> None:
        self.pool = pool
        self.max_queue = max_queue
        self.limits = (limits or ServerLimits()).validated()
        self.counters = counters or _Counters()
        self._capacity = pool.size + max_queue
        self._lock = threading.Lock()
        self._admitted = 0
        self.draining = False

    @property
    def rejected(self) -> int:
        return self.counters.snapshot()["rejected"]

    def admitted(self) -> int:
        with self._lock:
            return self._admitted

    def _reject(self, context, kind: str, code: grpc.StatusCode, message: str):
        self.counters.add(kind)
        context.abort(code, message)

    def clamp(self, request: sandbox_pb2.RunRequest) -> tuple[float, int, int]:
        """(timeout_s, memory_mb, max_output_bytes) for a request: its values, or the server's defaults for
        0, never above the server's maxima. Negative or non-finite values are the client's error."""
        lim, base = self.limits, self.pool.limits
        t, m, o = request.timeout_s, int(request.memory_mb), int(request.max_output_bytes)
        if not (t >= 0) or m < 0 or o < 0:  # `not (t >= 0)` also catches NaN
            bad = "timeout_s" if not (t >= 0) else ("memory_mb" if m < 0 else "max_output_bytes")
            raise UserError(f"sandbox {bad} must be positive (0 = the server's default)")
        return (min(t or base.timeout_s, lim.max_timeout_s), min(m or base.memory_mb, lim.max_memory_mb),
                min(o or base.max_output_bytes, lim.max_output_bytes))

    def Run(self, raw: bytes, context):  # noqa: N802 - gRPC naming
        with self._lock:
            kind = "draining" if self.draining else ("busy" if self._admitted >= self._capacity else "")
            if not kind:
                self._admitted += 1
        if kind == "draining":
            self._reject(context, kind, grpc.StatusCode.UNAVAILABLE, "sandbox service is shutting down")
        if kind == "busy":
            self._reject(context, kind, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"sandbox queue full ({self.pool.size} running, {self.max_queue} waiting)")
        try:
            return self._run_admitted(raw, context)
        finally:
            with self._lock:
                self._admitted -= 1

    def _run_admitted(self, raw: bytes, context) -> sandbox_pb2.RunResponse:
        if len(raw) > MAX_CODE_BYTES + 4096:
            self._reject(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT,
                         f"request of {len(raw)} bytes is over the {MAX_CODE_BYTES}-byte code limit")
        try:
            request = sandbox_pb2.RunRequest.FromString(raw)
            timeout_s, memory_mb, max_output = self.clamp(request)
        except (DecodeError, UserError) as exc:
            self._reject(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT,
                         str(exc) if isinstance(exc, UserError) else "request is not a RunRequest")
        if len(request.code.encode()) > MAX_CODE_BYTES:
            self._reject(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT, f"code is over {MAX_CODE_BYTES} bytes")
        left = context.time_remaining()
        if left is not None:  # the run gets no longer than the call: its own timer kills it at the deadline
            timeout_s = max(0.001, min(timeout_s, left))
        cancel = threading.Event()
        if not context.add_callback(lambda: _on_call_end(context, cancel)):
            cancel.set()
        try:
            result = self.pool.run(request.code, timeout_s=timeout_s, memory_mb=memory_mb,
                                   max_output_bytes=max_output, cancel=cancel)
        except SandboxCancelled:
            self.counters.add("cancelled")
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled; its program was killed")
        except UserError as exc:
            self._reject(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SandboxError as exc:
            self.counters.add("failed")
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return _to_proto(result)

    def Health(self, request, context):  # noqa: N802
        stats = self.pool.stats()
        counts = self.counters.snapshot()
        queued = max(0, self.admitted() - stats["busy"])
        return sandbox_pb2.HealthResponse(
            workers=self.pool.size, busy=stats["busy"], queued=queued, max_queue=self.max_queue,
            runs=stats["runs"], timeouts=stats["timeouts"], rejected=counts["rejected"], namespaces=self.pool.namespaces)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers; Run takes raw bytes so that undecodable requests reach us (and are counted)."""
        return grpc.method_handlers_generic_handler(_SERVICE, {
            "Run": grpc.unary_unary_rpc_method_handler(
                self.Run, request_deserializer=None, response_serializer=sandbox_pb2.RunResponse.SerializeToString),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.Health, request_deserializer=sandbox_pb2.HealthRequest.FromString,
                response_serializer=sandbox_pb2.HealthResponse.SerializeToString),
        })


def _on_call_end(context, cancel: threading.Event) -> None:
    """The call ended (answered, cancelled or expired): kill its program unless the deadline ended it.

    An expired call's program is killed by its own timer, set to the same deadline, and counted as a timeout
    rather than a cancellation; within 50 ms of the deadline the two cannot be told apart and the timer decides.
    """
    left = context.time_remaining()
    if left is None or left > 0.05:
        cancel.set()


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

    def drain(self, grace_s: float | None = None) -> None:
        """Graceful stop: new calls are refused (UNAVAILABLE, counted) while admitted ones finish, for at
        most ``grace_s`` (default: the longest run the server allows, plus 5 s); then stop."""
        grace = self.servicer.limits.max_timeout_s + 5.0 if grace_s is None else grace_s
        with self.servicer._lock:
            self.servicer.draining = True
        end = time.monotonic() + grace
        while self.servicer.admitted() and time.monotonic() < end:
            time.sleep(0.05)
        self.stop(0)

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        if self._owns_pool:
            self.pool.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(*, host: str = "127.0.0.1", port: int = 50052, token: str | None = None, workers: int = 2,
          max_queue: int = 16, tls_cert: str | None = None, tls_key: str | None = None,
          pool: SandboxPool | None = None, limits: ServerLimits | None = None) -> SandboxServer:
    """Start the service (non-blocking). A strong token is required: ``token`` or $DSMATH_SANDBOX_TOKEN."""
    token = check_token(token or os.environ.get(TOKEN_ENV, ""))
    limits = (limits or ServerLimits()).validated()
    if max_queue < 0 or workers < 1:
        raise UserError(f"need workers >= 1 and max_queue >= 0, got {workers} and {max_queue}")
    if bool(tls_cert) != bool(tls_key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    owns_pool = pool is None
    pool = pool or SandboxPool(size=workers)
    counters = _Counters()
    servicer = SandboxServicer(pool, max_queue, limits, counters)
    # Threads beyond the admitted capacity exist only to answer rejections promptly; past them gRPC itself
    # rejects (maximum_concurrent_rpcs), so no call waits unboundedly for a thread.
    threads = pool.size + max_queue + 16
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sandbox-rpc"),
        interceptors=[_BearerAuth(token, counters)], maximum_concurrent_rpcs=threads,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", 2 * limits.max_output_bytes + 65536)])
    server.add_generic_rpc_handlers((servicer.handler(),))
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
        options = [("grpc.max_receive_message_length", CLIENT_MAX_RECEIVE_BYTES)]
        if tls or root_certificates:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
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
            raise _translate(exc, request.ByteSize()) from None
        return _from_proto(reply)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the service to accept connections (a server still starting is not an
        error); raises SandboxError when nothing answers by then."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise SandboxError(f"no sandbox service answered at {self.address} within {timeout_s:g} s") from None

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


def _translate(exc: grpc.RpcError, sent_bytes: int = 0) -> Exception:
    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        if sent_bytes > MAX_MESSAGE_BYTES:
            return UserError(f"request too large: {details}")
        return SandboxError(f"the sandbox's response is larger than this client accepts: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return SandboxBusy(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SandboxAuthError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UserError(details)
    return SandboxError(f"{code.name}: {details}")

"""The sandbox gRPC service on 127.0.0.1: auth, concurrency, backpressure, malformed input, TLS."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dsmath.errors import UserError
from dsmath.proto import sandbox_pb2
from dsmath.sandbox import SandboxPool
from dsmath.sandbox.pool import SandboxError
from dsmath.sandbox.service import SandboxAuthError, SandboxBusy, SandboxClient, serve

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(size=2) as p:
        yield p


@pytest.fixture
def server(pool):
    srv = serve(host="127.0.0.1", port=0, token=TOKEN, max_queue=16, pool=pool)
    yield srv
    srv.stop(0)


def _wait_until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_run_matches_the_local_result(server):
    with SandboxClient(f"127.0.0.1:{server.port}", TOKEN) as client:
        r = client.run("import sympy\nprint(sympy.Rational(1, 3) + sympy.Rational(1, 6))")
        assert (r.stdout, r.exit_code, r.signal, r.timed_out) == ("1/2\n", 0, None, False)
        t = client.run("while True: pass", timeout_s=0.5)
        assert t.timed_out and t.exit_code is None and t.signal == 9
        e = client.run("raise SystemExit(4)")
        assert e.exit_code == 4 and e.signal is None
        h = client.health()
        assert h.workers == 2 and h.namespaces and h.runs >= 3 and h.timeouts >= 1


def test_missing_or_wrong_token_is_unauthenticated(server):
    address = f"127.0.0.1:{server.port}"
    for token in ("", "wrong", TOKEN + "x", TOKEN[:-1]):
        with SandboxClient(address, token) as client, pytest.raises(SandboxAuthError):
            client.run("print(1)")
    with grpc.insecure_channel(address) as channel:  # no metadata at all
        call = channel.unary_unary("/dsmath.sandbox.v1.Sandbox/Health",
                                   request_serializer=sandbox_pb2.HealthRequest.SerializeToString,
                                   response_deserializer=sandbox_pb2.HealthResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(sandbox_pb2.HealthRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.pool.stats()["runs"] >= 0 and SandboxClient(address, TOKEN).run("print(1)").stdout == "1\n"


def test_many_concurrent_calls(server):
    with SandboxClient(f"127.0.0.1:{server.port}", TOKEN) as client:
        with ThreadPoolExecutor(max_workers=12) as ex:
            results = list(ex.map(lambda i: client.run(f"print({i} * 3)"), range(24)))
    assert [r.stdout for r in results] == [f"{i * 3}\n" for i in range(24)]


def test_full_queue_is_answered_at_once(pool):
    srv = serve(host="127.0.0.1", port=0, token=TOKEN, max_queue=1, pool=pool)  # 2 running + 1 waiting
    try:
        client = SandboxClient(f"127.0.0.1:{srv.port}", TOKEN)
        slow = "import time\ntime.sleep(4)\nprint('slept')"
        with ThreadPoolExecutor(max_workers=3) as ex:
            held = [ex.submit(client.run, slow) for _ in range(3)]
            _wait_until(lambda: (h := client.health()).busy == 2 and h.queued == 1)
            t = time.monotonic()
            with pytest.raises(SandboxBusy):
                client.run("print(1)")
            assert time.monotonic() - t < 2.5  # refused at once, not after a held run's 4 s
            assert client.health().rejected == 1
            assert [f.result().stdout for f in held] == ["slept\n"] * 3
        assert client.run("print(2)").stdout == "2\n"  # capacity is back
        client.close()
    finally:
        srv.stop(0)


def test_malformed_requests_do_not_harm_the_server(server):
    address = f"127.0.0.1:{server.port}"
    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary("/dsmath.sandbox.v1.Sandbox/Run")  # bytes in, bytes out
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", b"\x0a\x02\xc3\x28"):  # junk, bad length, bad UTF-8
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, metadata=md, timeout=5)
            assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\x80\x80\x90\x01" + b"x" * (2 * 2**20), metadata=md, timeout=5)  # 2 MiB: over the cap
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # refused by us, so counted
        unknown = channel.unary_unary("/dsmath.sandbox.v1.Sandbox/Nope")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", metadata=md, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with SandboxClient(address, TOKEN) as client:
        with pytest.raises(UserError, match="timeout_s"):
            client.run("print(1)", timeout_s=-1)
        with pytest.raises(UserError, match="memory_mb"):
            client.run("print(1)", memory_mb=-3)
        with pytest.raises(UserError, match="over"):
            client.run("x = 1\n" * 400_000)  # 2.4 MB of code
        assert client.run("print('still here')").stdout == "still here\n"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_tls(pool, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    srv = serve(host="127.0.0.1", port=0, token=TOKEN, pool=pool, tls_cert=str(cert), tls_key=str(key))
    try:
        with SandboxClient(f"localhost:{srv.port}", TOKEN, root_certificates=cert.read_bytes()) as client:
            assert client.run("print(7)").stdout == "7\n"
        with SandboxClient(f"localhost:{srv.port}", TOKEN, rpc_margin_s=2) as plain:  # plaintext to a TLS port
            with pytest.raises(Exception):
                plain.run("print(7)", timeout_s=1)
    finally:
        srv.stop(0)


def test_serve_refuses_without_a_token(monkeypatch, pool):
    monkeypatch.delenv("DSMATH_SANDBOX_TOKEN", raising=False)
    with pytest.raises(UserError, match="token is required"):
        serve(port=0, pool=pool)


def test_cli_serve_end_to_end(monkeypatch):
    import os
    import re
    import signal
    import sys

    env = dict(os.environ, DSMATH_SANDBOX_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "wiring.cli", "sandbox", "serve", "--port", "0", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving on 127\.0\.0\.1:(\d+) .*full isolation", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        monkeypatch.setenv("DSMATH_SANDBOX_TOKEN", TOKEN)
        with SandboxClient(f"127.0.0.1:{match.group(1)}") as client:  # token from the environment
            assert client.run("print(sum(range(10)))").stdout == "45\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "wiring.cli", "sandbox", "serve", "--port", "0"],
                         capture_output=True, text=True, env={k: v for k, v in env.items() if k != "DSMATH_SANDBOX_TOKEN"})
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "token is required" in bad.stderr


def _sandbox_procs(pool) -> list[int]:
    from tests.test_sandbox import _procs_of

    return _procs_of(pool.sandbox_uids)


def test_the_server_clamps_what_a_client_asks_for(pool):
    from dsmath.sandbox.service import ServerLimits

    srv = serve(host="127.0.0.1", port=0, token=TOKEN, pool=pool,
                limits=ServerLimits(max_timeout_s=1.0, max_memory_mb=128, max_output_bytes=1000))
    try:
        with SandboxClient(f"127.0.0.1:{srv.port}", TOKEN) as client:
            big = client.run("print('x' * 5_000_000)", max_output_bytes=100 * 2**20)  # asks for 100 MB
            assert big.output_truncated and len(big.stdout) == 1000
            slow = client.run("while True: pass", timeout_s=600)  # asks for 10 minutes
            assert slow.timed_out and slow.wall_s < 2.0
            mem = client.run("x = bytearray(400 * 2**20)", memory_mb=100_000)  # asks for 100 GB
            assert mem.memory_exceeded and mem.exit_code == 1
            small = client.run("print('y' * 50)", max_output_bytes=10)  # lowering is obeyed
            assert small.stdout == "y" * 10 and small.output_truncated
    finally:
        srv.stop(0)


def test_cancelled_and_expired_calls_have_their_program_killed(server):
    from dsmath.proto import sandbox_pb2_grpc

    md = (("authorization", f"Bearer {TOKEN}"),)
    sleeper = sandbox_pb2.RunRequest(code="import time\nprint('started', flush=True)\ntime.sleep(60)", timeout_s=30)
    before = server.pool.stats()["cancelled"]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = sandbox_pb2_grpc.SandboxStub(channel)
        call = stub.Run.future(sleeper, metadata=md)
        _wait_until(lambda: server.pool.stats()["busy"] == 1 and _sandbox_procs(server.pool))
        call.cancel()
        # Killed on the cancel, well before its own 30 s limit (typically within 0.1 s; the bound leaves room for a
        # loaded machine).
        _wait_until(lambda: not _sandbox_procs(server.pool), timeout_s=10.0)
        timeouts = server.pool.stats()["timeouts"]
        with pytest.raises(grpc.RpcError) as info:  # the client's own deadline passes: the run gets no longer
            stub.Run(sleeper, metadata=md, timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_until(lambda: not _sandbox_procs(server.pool), timeout_s=10.0)  # not its 30 s: the call's 1 s deadline
        _wait_until(lambda: server.pool.stats()["timeouts"] == timeouts + 1)  # killed at the call's deadline
    _wait_until(lambda: server.pool.stats()["cancelled"] == before + 1)
    assert server.servicer.counters.snapshot()["cancelled"] == 1


def test_every_rejection_is_counted(pool):
    srv = serve(host="127.0.0.1", port=0, token=TOKEN, max_queue=0, pool=pool)
    address = f"127.0.0.1:{srv.port}"
    md = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with SandboxClient(address, "x" * 20) as bad, pytest.raises(SandboxAuthError):
            bad.run("print(1)")  # 1: wrong token
        with grpc.insecure_channel(address) as channel:
            raw = channel.unary_unary(f"/{'dsmath.sandbox.v1.Sandbox'}/Run")
            for payload in (b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x0a\x80\x80\x90\x01" + b"x" * (2 * 2**20)):
                with pytest.raises(grpc.RpcError):
                    raw(payload, metadata=md, timeout=5)  # 2, 3, 4: junk, bad UTF-8, oversized
            with pytest.raises(grpc.RpcError):
                raw(b"", timeout=5)  # 5: no token at all
        client = SandboxClient(address, TOKEN)
        with pytest.raises(UserError):
            client.run("print(1)", timeout_s=-1)  # 6: bad limits
        with ThreadPoolExecutor(max_workers=2) as ex:  # both slots busy, no queue
            held = [ex.submit(client.run, "import time\ntime.sleep(1.0)") for _ in range(2)]
            _wait_until(lambda: client.health().busy == 2)
            with pytest.raises(SandboxBusy):
                client.run("print(1)")  # 7: queue full
            [f.result() for f in held]
        counts = srv.servicer.counters.snapshot()
        assert client.health().rejected == 7 == counts["rejected"]
        assert (counts["unauthenticated"], counts["invalid"], counts["busy"]) == (2, 4, 1)
        client.close()
    finally:
        srv.stop(0)


@pytest.mark.parametrize("token", ["short-token", " " * 20, "a-long-enough-token with-space", "\t" + "y" * 20])
def test_weak_tokens_are_refused_at_start_up(pool, token):
    with pytest.raises(UserError, match="at least 16 characters with no whitespace") as info:
        serve(port=0, pool=pool, token=token)
    assert "\n" not in str(info.value)


def test_drain_lets_admitted_calls_finish_and_refuses_new_ones(pool):
    srv = serve(host="127.0.0.1", port=0, token=TOKEN, pool=pool)
    client = SandboxClient(f"127.0.0.1:{srv.port}", TOKEN)
    with ThreadPoolExecutor(max_workers=2) as ex:
        running = ex.submit(client.run, "import time\ntime.sleep(1.0)\nprint('finished')")
        _wait_until(lambda: srv.servicer.admitted() == 1)
        drained = ex.submit(srv.drain)
        _wait_until(lambda: srv.servicer.draining)
        with pytest.raises(SandboxError):
            client.run("print(1)")  # refused while draining
        assert running.result().stdout == "finished\n"
        drained.result(timeout=10)
    assert srv.servicer.counters.snapshot()["draining"] == 1
    client.close()

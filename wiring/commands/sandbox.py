"""``dsmath sandbox``: serve the PoT sandbox over gRPC, or run one program in it."""

from __future__ import annotations

import argparse
import sys

HELP = "the program-of-thought sandbox: serve it over gRPC, or run one program"
DESCRIPTION = """The sandbox that runs model-written Python for PoT rewards and tool-integrated generation.

Each program runs in a fresh process forked from a template with sympy and numpy imported: own PID,
mount and network namespaces, an unprivileged uid, read-only filesystem except a tmpfs scratch dir,
rlimits, and a wall-clock deadline that kills everything it started.

examples:
  DSMATH_SANDBOX_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') dsmath sandbox serve --port 50052 --workers 4 --max-queue 32
  dsmath sandbox serve --tls-cert server.crt --tls-key server.key
  echo 'import sympy; print(sympy.factor("x**2-1"))' | dsmath sandbox run -
  dsmath sandbox run prog.py --timeout 2

Reward workers (PoT) and generators (rollout.mode=tool) use it with reward.sandbox_address=HOST:PORT
(token from DSMATH_SANDBOX_TOKEN, at least 16 characters, no whitespace). The server's --max-* flags cap
what a request may ask for. SIGTERM drains: admitted calls finish, new ones are refused, then the server
exits.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    s = sub.add_parser("serve", help="serve the sandbox over gRPC")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=50052)
    s.add_argument("--token", help="bearer token clients must send (prefer $DSMATH_SANDBOX_TOKEN: argv is public)")
    s.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key serves TLS")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--workers", type=int, default=2, help="programs run at once (default 2)")
    s.add_argument("--max-queue", type=int, default=16, help="admitted calls waiting beyond the workers; "
                   "more are answered RESOURCE_EXHAUSTED at once (default 16)")
    s.add_argument("--max-timeout", type=float, default=30.0,
                   help="longest run a request may ask for, seconds; larger requests are clamped (default 30)")
    s.add_argument("--max-memory-mb", type=int, default=1024,
                   help="most memory a request may ask for; larger requests are clamped (default 1024)")
    s.add_argument("--max-output-bytes", type=int, default=1024 * 1024,
                   help="most output per stream a request may ask for; larger requests are clamped (default 1 MiB)")
    r = sub.add_parser("run", help="run one program (file or - for stdin) and print what it did")
    r.add_argument("file", help="Python file, or - for stdin")
    r.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds (default 5)")
    r.add_argument("--memory-mb", type=int, default=512, help="address space on top of the interpreter (default 512)")
    r.add_argument("--address", help="use a remote service HOST:PORT instead of a local pool "
                                     "(token from $DSMATH_SANDBOX_TOKEN)")
    r.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="with --address: seconds to wait for the service to accept connections (default 10)")


def run(args: argparse.Namespace) -> int:
    from dsmath.errors import UserError

    if args.action == "serve":
        import signal
        import threading

        from dsmath.sandbox.service import ServerLimits, serve

        limits = ServerLimits(args.max_timeout, args.max_memory_mb, args.max_output_bytes)
        server = serve(host=args.host, port=args.port, token=args.token, workers=args.workers,
                       max_queue=args.max_queue, tls_cert=args.tls_cert, tls_key=args.tls_key, limits=limits)

        def drain(signum, _frame) -> None:  # admitted calls finish; new ones are refused; then exit
            print(f"dsmath sandbox: signal {signum}: draining", file=sys.stderr, flush=True)
            threading.Thread(target=server.drain, name="sandbox-drain", daemon=True).start()

        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, drain)
        mode = "full isolation (namespaces)" if server.pool.namespaces else \
            f"FALLBACK isolation ({server.pool.isolation_note})"
        print(f"dsmath sandbox: serving on {args.host}:{server.port} ({'TLS' if args.tls_cert else 'plaintext'}), "
              f"{args.workers} workers, queue {args.max_queue}, {mode}", flush=True)
        try:
            server.wait()
        finally:
            server.stop()
        return 0
    if args.action == "run":
        try:
            code = sys.stdin.read() if args.file == "-" else open(args.file).read()
        except OSError as exc:
            raise UserError(f"cannot read {args.file}: {exc.strerror}") from exc
        if args.address:
            result = _run_remote(args, code)
        else:
            from dsmath.sandbox import SandboxPool

            with SandboxPool(size=1) as runner:
                result = runner.run(code, timeout_s=args.timeout, memory_mb=args.memory_mb)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        print(f"[sandbox] exit_code={result.exit_code} signal={result.signal} timed_out={result.timed_out} "
              f"memory_exceeded={result.memory_exceeded} truncated={result.output_truncated} "
              f"wall={result.wall_s:.3f}s cpu={result.cpu_s:.3f}s", file=sys.stderr)
        return 0 if result.ok else 1
    raise UserError("say what to do: dsmath sandbox serve | dsmath sandbox run FILE")


def _run_remote(args, code: str):
    """One run on the service at ``args.address``; its failures are one-line user errors that say what to do."""
    from dsmath.errors import UserError
    from dsmath.sandbox.pool import SandboxError
    from dsmath.sandbox.service import SandboxAuthError, SandboxBusy, SandboxClient

    client = SandboxClient(args.address)
    try:
        client.wait_ready(args.connect_timeout)
        return client.run(code, timeout_s=args.timeout, memory_mb=args.memory_mb)
    except SandboxAuthError:
        raise UserError(f"{args.address}: the sandbox service rejected the token: set DSMATH_SANDBOX_TOKEN to the "
                        "token it was started with") from None
    except SandboxBusy:
        raise UserError(f"{args.address}: the sandbox service is busy (queue full): retry, or start it with more "
                        "--workers / --max-queue") from None
    except SandboxError as exc:
        raise UserError(f"{args.address}: {exc} (is `dsmath sandbox serve` running there?)") from None
    finally:
        client.close()

"""A pool of fork-server templates that runs untrusted Python, one fresh process per program.

Each pool slot is a template interpreter (``forkserver.py``) started with a scrubbed environment and
sympy/numpy already imported; a run forks a fresh child from it, so a short program costs milliseconds
instead of a fresh interpreter's ~1 s of imports, and no process that ran untrusted code is ever reused.
The caller's process never executes the program: it only sends the source over a Unix socket and reads
stdout/stderr from pipes it created itself.
"""

from __future__ import annotations

import atexit
import os
import selectors
import signal as _signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dsmath.errors import UserError
from dsmath.sandbox import forkserver
from dsmath.sandbox.result import ExecResult

_FORKSERVER_PATH = Path(forkserver.__file__).resolve()
_TEMPLATE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
                 "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


class SandboxError(RuntimeError):
    """The sandbox machinery itself failed (not the program): a template died or broke its protocol.

    An infrastructure failure, never a verdict on the program: reward code must not score it as wrong."""


class SandboxCancelled(SandboxError):
    """The caller cancelled the run (``cancel`` was set): the program was killed, there is no result."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``memory_mb`` is address space on top of the preloaded interpreter's baseline."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    max_procs: int = 32
    max_open_files: int = 64
    max_file_mb: int = 16
    scratch_mb: int = 64

    def validated(self) -> "Limits":
        if not (0 < self.timeout_s <= 3600):
            raise UserError(f"sandbox timeout_s must be in (0, 3600], got {self.timeout_s}")
        for name in ("memory_mb", "max_output_bytes", "max_procs", "max_open_files", "max_file_mb", "scratch_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"sandbox {name} must be a positive integer, got {value!r}")
        if self.max_open_files < 8:
            raise UserError("sandbox max_open_files must be at least 8 (the interpreter needs a few)")
        if self.memory_mb > 1024 * 1024:
            raise UserError(f"sandbox memory_mb={self.memory_mb} is more than 1 TiB")
        return self


class _Worker:
    """One template process and the caller's end of its control socket."""

    def __init__(self, isolation: str, preload: tuple[str, ...]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(_FORKSERVER_PATH), str(theirs.fileno()), isolation, ",".join(preload)],
                pass_fds=[theirs.fileno()], env=dict(_TEMPLATE_ENV), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, cwd="/", close_fds=True,
            )
        finally:
            theirs.close()
        self.sock = ours
        self.info: dict = {}

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        self.sock.settimeout(timeout_s)
        try:
            msg, _ = forkserver.recv_msg(self.sock)
        except (OSError, ValueError) as exc:
            raise SandboxError(f"sandbox template did not start: {exc}") from exc
        finally:
            self.sock.settimeout(None)
        if not msg or not msg.get("ready"):
            raise SandboxError(f"sandbox template exited during start-up (exit code {self.proc.poll()})")
        self.info = msg
        return msg

    def alive(self) -> bool:
        """False once the template has exited (its control socket then reads EOF)."""
        try:
            self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()  # EOF: the template finishes its current run (if any) and exits
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SandboxPool:
    """Runs untrusted Python programs, up to ``size`` at a time; thread-safe.

    Guarantees, in namespace mode (``self.namespaces``; the default where the machine allows ``unshare``):
    the program runs as an unprivileged uid in its own PID, mount, network, IPC and UTS namespaces and
    session; the filesystem is read-only except a fresh tmpfs scratch dir (its cwd, gone after the run);
    the network namespace has only a down loopback; rlimits cap CPU time, address space, processes, open
    files and file size; at the deadline the whole PID namespace is SIGKILLed, daemons included. In
    fallback mode (no namespaces) see ``dsmath/sandbox/README.md`` for what is weaker.

    Not guaranteed: protection against kernel exploits; secrecy of world-readable files.
    """

    def __init__(self, size: int = 2, *, limits: Limits | None = None, isolation: str = "auto",
                 preload: tuple[str, ...] = ("sympy", "numpy")) -> None:
        if size < 1:
            raise UserError(f"sandbox pool size must be >= 1, got {size}")
        if isolation not in ("auto", "namespaces", "process"):
            raise UserError(f"sandbox isolation must be auto, namespaces or process, got {isolation!r}")
        self.limits = (limits or Limits()).validated()
        self.size = size
        self._isolation = isolation
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self._free: list[_Worker] = []
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._waiting = 0
        self._busy = 0
        self._stats = {"runs": 0, "timeouts": 0, "memory_exceeded": 0, "truncated": 0, "respawns": 0,
                       "errors": 0, "worker_deaths": 0, "cancelled": 0}
        workers = [_Worker(isolation, self._preload) for _ in range(size)]
        try:
            for w in workers:
                w.wait_ready()
        except BaseException:
            for w in workers:
                w.proc.kill()
                w.close()
            raise
        info = workers[0].info
        self.namespaces: bool = bool(info["namespaces"])
        self.net_isolated: bool = bool(info["net_isolated"])
        self.isolation_note: str = info.get("note", "")
        self.preloaded: list[str] = list(info.get("preloaded", []))
        if isolation == "namespaces" and not self.namespaces:
            for w in workers:
                w.close()
            raise UserError(f"sandbox namespaces are not available here: {self.isolation_note}")
        self._free = workers
        self._all = list(workers)

    # ------------------------------------------------------------------ public API ----

    @property
    def sandbox_uids(self) -> list[int]:
        """The uids programs run as (one per template); empty when not started as root."""
        with self._lock:
            return [w.info["uid"] for w in self._all if w.info.get("uid") is not None]

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all]

    def stats(self) -> dict:
        """Counters since start: runs, timeouts, memory_exceeded, truncated, respawns, errors,
        worker_deaths (templates found dead: each death once), cancelled; plus the
        current queue depth (callers waiting for a free slot) and busy slots."""
        with self._lock:
            return dict(self._stats, queue_depth=self._waiting, busy=self._busy, size=self.size)

    def run(self, code: str, *, timeout_s: float | None = None, memory_mb: int | None = None,
            max_output_bytes: int | None = None, acquire_timeout_s: float | None = None,
            cancel: threading.Event | None = None) -> ExecResult:
        """Run ``code`` in a fresh sandboxed process and return what it did.

        Blocks while all slots are busy (at most ``acquire_timeout_s`` when given: then raises
        TimeoutError). When ``cancel`` is set during the run, the program is killed within ~50 ms and
        SandboxCancelled is raised. A template that dies under a run (killed from outside, OOM) is counted
        in ``stats()["worker_deaths"]`` and the run is retried once on a fresh template (the program has no
        effects outside its run, so a retry is safe). Raises SandboxError only when the sandbox machinery
        fails twice; every program behaviour, hostile or not, is reported in the ExecResult.
        """
        if not isinstance(code, str):
            raise UserError(f"sandbox code must be a str, got {type(code).__name__}")
        limits = Limits(
            timeout_s=self.limits.timeout_s if timeout_s is None else float(timeout_s),
            memory_mb=self.limits.memory_mb if memory_mb is None else memory_mb,
            max_output_bytes=self.limits.max_output_bytes if max_output_bytes is None else max_output_bytes,
            max_procs=self.limits.max_procs, max_open_files=self.limits.max_open_files,
            max_file_mb=self.limits.max_file_mb, scratch_mb=self.limits.scratch_mb,
        ).validated()
        for attempt in range(2):
            worker = self._acquire(acquire_timeout_s, cancel)
            if worker.proc.poll() is not None:  # died while idle (killed from outside): replace before use
                self._replace(worker, died=True)
                worker = self._acquire(acquire_timeout_s, cancel)
            try:
                result = self._run_on(worker, code, limits, cancel)
            except SandboxCancelled:
                self._release(worker)
                with self._lock:
                    self._stats["cancelled"] += 1
                raise
            except SandboxError:
                died = worker.proc.poll() is not None or not worker.alive()
                self._replace(worker, died=died)
                with self._lock:
                    self._stats["errors"] += 1
                if attempt == 0 and not (cancel is not None and cancel.is_set()):
                    continue
                raise
            except BaseException:
                self._replace(worker)
                with self._lock:
                    self._stats["errors"] += 1
                raise
            else:
                self._release(worker)
                break
        with self._lock:
            self._stats["runs"] += 1
            self._stats["timeouts"] += result.timed_out
            self._stats["memory_exceeded"] += result.memory_exceeded
            self._stats["truncated"] += result.output_truncated
        return result

    def run_many(self, codes: list[str], **kwargs) -> list[ExecResult]:
        """Run several programs, up to ``size`` at a time; results in input order."""
        if not codes:
            return []
        with ThreadPoolExecutor(max_workers=min(self.size, len(codes))) as ex:
            return list(ex.map(lambda c: self.run(c, **kwargs), codes))

    def close(self) -> None:
        """Stop the templates; runs in progress finish first (their templates stop after). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            idle, self._free = list(self._free), []
        for w in idle:  # busy ones are closed by _release/_replace when their run ends
            w.close()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals ----

    def _acquire(self, timeout_s: float | None, cancel: threading.Event | None = None) -> _Worker:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._waiting += 1
            try:
                while not self._free and not self._closed:
                    if cancel is not None and cancel.is_set():
                        self._stats["cancelled"] += 1
                        raise SandboxCancelled("cancelled while waiting for a sandbox slot")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("no free sandbox slot")
                    self._cond.wait(left if cancel is None else min(0.05, left or 0.05))
                if self._closed:
                    raise SandboxError("sandbox pool is closed")
                self._busy += 1
                return self._free.pop()
            finally:
                self._waiting -= 1

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            self._busy -= 1
            if self._closed:
                worker.close()
                return
            self._free.append(worker)
            self._cond.notify()

    def _replace(self, worker: _Worker, *, died: bool = False) -> None:
        if died:
            with self._lock:
                self._stats["worker_deaths"] += 1
        worker.proc.kill()
        worker.close()
        fresh = None
        try:
            fresh = _Worker(self._isolation, self._preload)
            fresh.wait_ready()
        except BaseException:
            fresh = None
        with self._cond:
            self._busy -= 1
            self._all.remove(worker)
            self._stats["respawns"] += 1
            if fresh is not None:
                if self._closed:
                    fresh.close()
                else:
                    self._all.append(fresh)
                    self._free.append(fresh)
                    self._cond.notify()

    def _run_on(self, worker: _Worker, code: str, limits: Limits, cancel: threading.Event | None = None) -> ExecResult:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            request = {"code": code, "timeout_s": limits.timeout_s, "limits": {
                "memory_mb": limits.memory_mb, "max_procs": limits.max_procs,
                "max_open_files": limits.max_open_files, "max_file_mb": limits.max_file_mb,
                "scratch_mb": limits.scratch_mb}}
            forkserver.send_msg(worker.sock, request, fds=[out_w, err_w])
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            raise SandboxError(f"sandbox template is gone: {exc}") from exc
        finally:
            os.close(out_w)
            os.close(err_w)
        out = _Output(limits.max_output_bytes, out_r, err_r)
        report: dict | None = None
        header_and_body = bytearray()
        sel = selectors.DefaultSelector()
        for fd in (out_r, err_r):
            sel.register(fd, selectors.EVENT_READ)
        sel.register(worker.sock, selectors.EVENT_READ)
        guard = time.monotonic() + limits.timeout_s + 60.0
        cancel_sent = False
        try:
            while report is None:
                left = guard - time.monotonic()
                if left <= 0:
                    raise SandboxError("sandbox template did not answer in time")
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    try:
                        forkserver.send_msg(worker.sock, {"cancel": True})
                    except OSError as exc:
                        raise SandboxError(f"sandbox template is gone: {exc}") from exc
                    cancel_sent = True
                for key, _ in sel.select(left if cancel is None else min(left, 0.05)):
                    if key.fileobj is worker.sock:
                        chunk = worker.sock.recv(65536)
                        if not chunk:
                            raise SandboxError("sandbox template died during a run")
                        header_and_body += chunk
                        report = _parse_report(header_and_body)
                    elif not out.read(key.fd):
                        sel.unregister(key.fd)
            # The report comes after the run's whole process tree is gone (namespace mode): what is in the
            # pipes now is all there will be. Take it without waiting for EOF, so a writer that somehow
            # survived (fallback mode) can neither add late output nor hold the call open.
            for key in list(sel.get_map().values()):
                if key.fileobj is not worker.sock:
                    out.drain(key.fd)
        finally:
            out.close()
            sel.close()
        if "error" in report:
            raise SandboxError(f"sandbox supervisor failed: {report['error'].strip().splitlines()[-1]}")
        if report.get("cancelled"):
            raise SandboxCancelled("the run was cancelled; its program was killed")
        return _to_result(report, out.bytes(out_r), out.bytes(err_r), out.truncated)


class _Output:
    """The run's stdout/stderr pipes as the pool reads them: at most ``cap`` bytes kept per stream; past it
    the pool closes its end, so a program that prints forever gets EPIPE at once."""

    def __init__(self, cap: int, *fds: int) -> None:
        self.cap = cap
        self.bufs = {fd: bytearray() for fd in fds}
        self.open = set(fds)
        self.truncated = False

    def read(self, fd: int) -> bool:
        """Read what is there; False once the stream is finished (EOF or over the cap, then closed)."""
        chunk = os.read(fd, 65536)
        buf = self.bufs[fd]
        buf += chunk
        if len(buf) > self.cap:
            del buf[self.cap:]
            self.truncated = True
            chunk = b""
        if not chunk:
            self.open.discard(fd)
            os.close(fd)
            return False
        return True

    def drain(self, fd: int) -> None:
        """Take what is buffered in ``fd`` now, without waiting for more, and close it."""
        if fd not in self.open:
            return
        os.set_blocking(fd, False)
        try:
            while self.read(fd):
                pass
        except BlockingIOError:
            self.open.discard(fd)
            os.close(fd)

    def bytes(self, fd: int) -> bytes:
        return bytes(self.bufs[fd])

    def close(self) -> None:
        for fd in list(self.open):
            self.open.discard(fd)
            os.close(fd)


def _parse_report(buf: bytearray) -> dict | None:
    size = forkserver.HEADER.size
    if len(buf) < size:
        return None
    (n,) = forkserver.HEADER.unpack(bytes(buf[:size]))
    if len(buf) < size + n:
        return None
    import json

    return json.loads(bytes(buf[size:size + n]))


def _to_result(report: dict, out: bytes, err: bytes, truncated: bool) -> ExecResult:
    status = report.get("status")
    timed_out = bool(report.get("timed_out"))
    exit_code: int | None = None
    sig: int | None = None
    if status is None:
        sig = _signal.SIGKILL  # killed at the deadline before PID 1 could report
    elif os.WIFEXITED(status):
        exit_code = os.WEXITSTATUS(status)
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    if sig == _signal.SIGXCPU:
        timed_out = True
    stderr = err.decode("utf-8", errors="replace")
    last_line = stderr.rstrip().rsplit("\n", 1)[-1] if stderr.strip() else ""
    exc_name = last_line.split(":", 1)[0].strip()
    died_of_memory_error = exc_name.endswith("MemoryError") and " " not in exc_name  # numpy's subclasses too
    memory_exceeded = (exit_code not in (0, None) and died_of_memory_error) or (
        sig == _signal.SIGKILL and not timed_out)
    return ExecResult(stdout=out.decode("utf-8", errors="replace"), stderr=stderr, exit_code=exit_code,
                      timed_out=timed_out, memory_exceeded=memory_exceeded, output_truncated=truncated,
                      signal=sig, wall_s=float(report.get("wall_s", 0.0)), cpu_s=float(report.get("cpu_s", 0.0)))


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool behind :func:`run`, created on first use (size 2) and closed at exit."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = SandboxPool(size=int(os.environ.get("DSMATH_SANDBOX_WORKERS", "2")))
            atexit.register(_default_pool.close)
        return _default_pool


def run(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 64 * 1024) -> ExecResult:
    """Run ``code`` in the default pool (see :class:`SandboxPool`)."""
    return default_pool().run(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)

"""The sandbox fork server: a clean template process that forks one fresh child per program.

Run as its own interpreter (``python -I _template.py CONTROL_FD``) by :class:`dsmath.sandbox.SandboxPool`,
with a scrubbed environment; it imports only the standard library plus the preloaded modules (sympy,
numpy) so that a forked child starts with them already imported. This file must not import ``dsmath``:
the template's memory is what every untrusted child inherits.

Process tree for one run (namespace mode, the default where ``unshare`` works, e.g. as root)::

    pool (caller)  ── control socket ──  T  template, never runs user code. Private mount namespace with
                                         │  every mount read-only, a private network namespace (only a
                                         │  down loopback), private IPC/UTS. Owns the wall-clock deadline.
                                         └─ B  PID 1 of a fresh PID namespace, own mount namespace: a fresh
                                              │  tmpfs scratch dir (gone with the namespace), its own /proc;
                                              │  reaps, reports C's wait status on a private pipe
                                              └─ C  the program: own session, rlimits, scrubbed env, an
                                                   unprivileged uid, stdin /dev/null, stdout/stderr = the
                                                   pool's own pipes; every other descriptor closed

When B exits (C finished, or T SIGKILLed B at the deadline) the kernel SIGKILLs every process left in the
PID namespace, so daemons (double fork + setsid) cannot outlive the run, and T's waitpid(B) returns only
once they are gone. C's status travels C -> wait4 in B -> private pipe -> T -> control socket; the
program holds none of those descriptors, so it cannot forge a result. Fallback mode (no namespaces) is
described in ``dsmath/sandbox/README.md``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(None, use_errno=True)
_HEADER = struct.Struct("!I")
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


# ---------------------------------------------------------------- framing (shared with the pool) ----

def send_msg(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    body = json.dumps(obj).encode()
    header = _HEADER.pack(len(body))
    if fds:
        socket.send_fds(sock, [header], fds)
        sock.sendall(body)
    else:
        sock.sendall(header + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One framed message (and any descriptors sent with its header); (None, []) at EOF."""
    fds: list[int] = []
    if max_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, max_fds)
        if not data:
            return None, fds
        rest = _recv_exact(sock, _HEADER.size - len(data)) if len(data) < _HEADER.size else b""
        if rest is None:
            return None, fds
        header = data + rest
    else:
        header = _recv_exact(sock, _HEADER.size)
        if header is None:
            return None, []
    (size,) = _HEADER.unpack(header)
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"message of {size} bytes is over the limit")
    body = _recv_exact(sock, size)
    if body is None:
        return None, fds
    return json.loads(body), fds


# ------------------------------------------------------------------------------ capabilities ----

def probe_namespaces() -> str:
    """'' if a child can unshare PID + mount namespaces and remount read-only here, else why not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        msg = b""
        try:
            os.close(r)
            _unshare(CLONE_NEWPID | CLONE_NEWNS)
            _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
            _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            inner = os.fork()  # PID 1 of the new namespace must be creatable
            if inner == 0:
                os._exit(0 if os.getpid() == 1 else 3)
            _, st = os.waitpid(inner, 0)
            if os.waitstatus_to_exitcode(st) != 0:
                msg = b"child was not PID 1 in the new namespace"
        except BaseException as exc:  # noqa: BLE001 - any failure means "fall back"
            msg = repr(exc).encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode(errors="replace")


# --------------------------------------------------------------------------------- the child ----

def _child_main(req: dict, out_w: int, err_w: int, workdir: str, uid: int | None, block_sockets: bool = False) -> None:
    """C: becomes the program. Never returns."""
    code = 70
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.chdir(workdir)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        limits = req["limits"]
        cpu = max(1, math.ceil(float(req["timeout_s"]))) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_procs"], limits["max_procs"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
        fsize = limits["max_file_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                           "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                           "PYTHONHASHSEED": "0"})
        sys.argv = ["<sandbox>"]
        sys.path[:] = [p for p in sys.path if p not in ("", ".")]
        try:
            sys.stdout.reconfigure(line_buffering=True)  # partial output survives a timeout
        except Exception:  # noqa: BLE001
            pass
        import types

        if block_sockets:
            # Fallback only (no network namespace): refuse socket creation from Python. Best effort: code
            # that reaches libc directly (ctypes) is not stopped by this.
            def _no_sockets(event: str, _args: tuple) -> None:
                if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto"):
                    raise PermissionError("network access is disabled in the sandbox")

            sys.addaudithook(_no_sockets)
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        source = req["code"]
        extra = limits["memory_mb"] * 1024 * 1024
        # The address-space cap is the program's budget on top of what the preloaded interpreter maps.
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + extra,) * 2)
        code = 1
        try:
            exec(compile(source, "<sandbox>", "exec"), main.__dict__)  # noqa: S102 - isolated child
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code & 0xFF
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException as exc:  # noqa: BLE001
            # Show the program's frames only, not this file's.
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            traceback.print_exception(type(exc), exc, tb)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
    except BaseException:  # noqa: BLE001 - a failure while setting up must never run the program
        try:
            os.write(2, b"sandbox setup failed: " + traceback.format_exc().encode()[-2000:])
        except OSError:
            pass
    os._exit(code)


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------- supervisors ----

def _readonly_mounts(skip: tuple[str, ...] = ()) -> None:
    """Make every mount of the calling process's (private) mount namespace read-only."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    points = sorted({r[4].encode().decode("unicode_escape") for r in rows}, key=len)
    for point in points:
        if point in skip:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None)
        except OSError:
            if point == "/":
                raise  # without a read-only root the isolation promise does not hold


def _blocking_ancestor(path: str) -> str | None:
    """The outermost directory on ``path`` that others may not traverse (e.g. /root, 0700), or None."""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            if not os.stat(prefix).st_mode & 0o001:
                return prefix
        except OSError:
            return None
    return None


def _expose_private_paths(paths: list[str]) -> list[str]:
    """Let the unprivileged uid read ``paths`` (e.g. a Python under /root) without opening their parent:
    the blocking parent is covered with an empty read-only tmpfs and only ``paths`` are bind-mounted back.
    Everything else under that parent (keys, tokens) becomes invisible. Returns the parents covered."""
    plan: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(set(paths), key=len):
        if not os.path.isdir(path):
            continue
        parent = _blocking_ancestor(path)
        if parent is None or any(path.startswith(p + "/") for p, _ in plan.get(parent, [])):
            continue
        plan.setdefault(parent, []).append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    for parent, entries in plan.items():
        _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for path, fd in entries:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None)
            os.close(fd)
        _mount(None, parent, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    return sorted(plan)


SCRATCH = "/tmp/scratch"  # inside the template's own mount namespace; the host never sees it


def _init_main(req: dict, out_w: int, err_w: int, uid: int | None, status_w: int) -> None:
    """B: PID 1 of the run's PID namespace; gives the run its own mount namespace. Never returns."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # PID 1 ignores handler-less signals from inside
        _unshare(CLONE_NEWNS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        opts = f"size={int(req['limits']['scratch_mb'])}m,mode=0700,uid={uid or 0},gid={uid or 0}"
        _mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, opts)
        _mount(None, "/tmp", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        try:  # POSIX semaphores / shared memory (multiprocessing) need a writable /dev/shm: a private one
            _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, opts.replace("mode=0700", "mode=1777"))
        except OSError:
            pass
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)  # this namespace's pids only
        child = os.fork()
        if child == 0:
            os.close(status_w)
            _child_main(req, out_w, err_w, SCRATCH, uid)
        os.close(out_w)
        os.close(err_w)
        while True:
            try:
                pid, status, usage = os.wait4(-1, 0)
            except InterruptedError:
                continue
            if pid == child:
                break
        report = {"status": status, "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}
        os.write(status_w, json.dumps(report).encode())
    except BaseException:  # noqa: BLE001 - no report: the template says the run failed
        pass
    os._exit(0)  # PID 1 exits -> the kernel SIGKILLs everything left in the namespace


def _kill_uid(uid: int) -> int:
    """SIGKILL every process running as ``uid`` (fallback mode's sweep); returns how many were signalled."""
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                        break  # already dead, waiting to be reaped
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(name), signal.SIGKILL)
                            killed += 1
                        break
        except (OSError, ValueError):
            continue
    return killed


def _wait_deadline(pid: int, deadline: float) -> bool:
    """Wait for ``pid`` to exit until ``deadline`` (monotonic); True if it did."""
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bool(select.select([pidfd], [], [], 0)[0])
            if select.select([pidfd], [], [], left)[0]:
                return True
    finally:
        os.close(pidfd)


class Template:
    """T: the template's state and request loop. Never runs user code."""

    def __init__(self, sock: socket.socket, isolation: str) -> None:
        self.sock = sock
        self.uid: int | None = None
        self.namespaces = False
        self.net_isolated = False
        self.note = ""
        if os.geteuid() == 0:
            # A uid no other live template uses (pids are unique), so RLIMIT_NPROC counts this run only.
            self.uid = 100000 + os.getpid()
        if isolation != "process":
            self.note = probe_namespaces()
            if not self.note:
                try:
                    self._enter_namespaces()
                    self.namespaces = True
                except OSError as exc:
                    self.note = f"namespace set-up failed: {exc}"
        if not self.namespaces:
            self.root = tempfile.mkdtemp(prefix=f"dsmath-sandbox-{os.getpid()}-")
            os.chmod(self.root, 0o711)

    def _enter_namespaces(self) -> None:
        """Give the template private mount/net/IPC/UTS namespaces: all mounts read-only, a root-only tmpfs
        on /tmp holding the scratch mount point, a network with only a down loopback. Per run, the child
        then only needs a new PID + mount namespace and one tmpfs (fast)."""
        self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
        _unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        self.net_isolated = True
        _readonly_mounts()
        needed = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
        needed += [p for p in sys.path if p and os.path.isdir(p)]
        self.covered = _expose_private_paths(needed)
        # The empty tmpfs over /tmp hides the host's temp files; an interpreter or venv that itself lives under
        # /tmp (a CI checkout, say) is bind-mounted back, read-only, through a directory fd opened beforehand.
        under_tmp = sorted({os.path.realpath(p) for p in needed if os.path.realpath(p).startswith("/tmp/")})
        roots = [p for p in under_tmp if not any(p != q and p.startswith(q + "/") for q in under_tmp)]
        held = [(p, os.open(p, os.O_RDONLY | os.O_DIRECTORY)) for p in roots]
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path, fd in held:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
            os.close(fd)
        os.mkdir(SCRATCH, 0o755)

    def serve(self) -> None:
        try:
            while True:
                req, fds = recv_msg(self.sock, max_fds=2)
                if req is None:
                    for fd in fds:
                        os.close(fd)
                    return
                if len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    send_msg(self.sock, {"error": "request without output pipes"})
                    continue
                try:
                    result = self.run_ns(req, *fds) if self.namespaces else self.run_plain(req, *fds)
                except Exception:  # noqa: BLE001 - report, keep serving
                    result = {"error": traceback.format_exc()[-2000:]}
                send_msg(self.sock, result)
        finally:
            if not self.namespaces:
                shutil.rmtree(self.root, ignore_errors=True)

    def run_ns(self, req: dict, out_w: int, err_w: int) -> dict:
        status_r, status_w = os.pipe()
        try:
            _unshare(CLONE_NEWPID)  # only our next child moves: it becomes PID 1 of a fresh namespace
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                os.close(status_r)
                self.sock.close()
                _init_main(req, out_w, err_w, self.uid, status_w)
        finally:
            _check(_libc.setns(self.pidns_fd, CLONE_NEWPID), "setns")  # back, so the next unshare works
            os.close(status_w)
            os.close(out_w)
            os.close(err_w)
        timed_out = not _wait_deadline(pid, start + float(req["timeout_s"]))
        if timed_out:
            os.kill(pid, signal.SIGKILL)  # PID 1 dies -> the kernel kills the whole namespace
        os.waitpid(pid, 0)  # returns only once every process of the namespace is gone
        wall = time.monotonic() - start
        raw = b""
        while chunk := os.read(status_r, 65536):
            raw += chunk
        os.close(status_r)
        result = {"timed_out": timed_out, "wall_s": wall, "status": None}
        if raw:
            result.update(json.loads(raw))
        elif not timed_out:
            result["error"] = "sandbox init exited without a report"
        return result

    def run_plain(self, req: dict, out_w: int, err_w: int) -> dict:
        """Fallback without namespaces: own session, rlimits, uid drop when root; kill by group and uid."""
        workdir = tempfile.mkdtemp(dir=self.root)
        if self.uid is not None:
            os.chown(workdir, self.uid, self.uid)
        os.chmod(workdir, 0o700)
        try:
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                self.sock.close()
                _child_main(req, out_w, err_w, workdir, self.uid, block_sockets=True)
        finally:
            os.close(out_w)
            os.close(err_w)
        timed_out = not _wait_deadline(pid, start + float(req["timeout_s"]))
        for target in ("group", "uid"):
            if target == "group":
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            elif self.uid is not None:
                while _kill_uid(self.uid):
                    time.sleep(0.005)  # let the killed ones die before sweeping again
        _, status, usage = os.wait4(pid, 0)
        wall = time.monotonic() - start
        shutil.rmtree(workdir, ignore_errors=True)
        return {"timed_out": timed_out, "wall_s": wall, "status": None if timed_out else status,
                "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}


def main() -> None:
    fd = int(sys.argv[1])
    isolation = sys.argv[2] if len(sys.argv) > 2 else "auto"
    preload = [m for m in (sys.argv[3].split(",") if len(sys.argv) > 3 else []) if m]
    sock = socket.socket(fileno=fd)
    loaded = []
    for name in preload:
        try:
            __import__(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001 - a missing optional module only costs speed
            pass
    if "sympy" in loaded:
        import sympy

        sympy.sympify("x + 1")  # warm the parser caches a short program will hit
    template = Template(sock, isolation)
    # Move every object made so far out of the collector's reach: a child's GC pass would otherwise touch
    # (and so copy-on-write duplicate) the whole preloaded heap.
    gc.collect()
    gc.freeze()
    send_msg(sock, {"ready": True, "pid": os.getpid(), "uid": template.uid, "namespaces": template.namespaces,
                    "net_isolated": template.net_isolated, "note": template.note, "preloaded": loaded})
    template.serve()


if __name__ == "__main__":
    main()

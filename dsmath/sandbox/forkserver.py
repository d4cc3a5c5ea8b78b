"""The sandbox fork server: a clean template process that forks one fresh child per program.

Run as its own interpreter (``python -I forkserver.py CONTROL_FD``) by :class:`dsmath.sandbox.SandboxPool`,
with a scrubbed environment; it imports only the standard library plus the preloaded modules (sympy,
numpy) so that a forked child starts with them already imported. This file must not import ``dsmath``:
the template's memory is what every untrusted child inherits.

Process tree for one run (namespace mode, the default where ``unshare`` works, e.g. as root)::

    pool (caller)  ── control socket ──  T  template, never runs user code. Private mount, network (only a
                                         │  down loopback), IPC and UTS (host name "sandbox") namespaces; its
                                         │  root is the minimal filesystem view (``filesystem_view``: a tmpfs
                                         │  with read-only binds of the interpreter, its packages and shared
                                         │  libraries, three devices and a synthetic /etc; nothing else of the
                                         │  host), built once at start-up. Owns the wall-clock deadline and
                                         │  listens for the pool's cancel (or its death) during a run.
                                         └─ B  PID 1 of a fresh PID namespace, own mount namespace: a fresh
                                              │  tmpfs /tmp and /dev/shm, its own /proc; dies with T
                                              │  (PR_SET_PDEATHSIG); reaps, reports C's status on a private pipe
                                              └─ C  the program: own session, rlimits, scrubbed env, an
                                                   unprivileged uid, stdin /dev/null, stdout/stderr = the
                                                   pool's own pipes; every other descriptor closed; ends like
                                                   an interpreter (waits for non-daemon threads, runs atexit)

When B exits (C finished, or T SIGKILLed B at the deadline, or T died) the kernel SIGKILLs every process left
in the PID namespace, so daemons (double fork + setsid) cannot outlive the run, and T's waitpid(B) returns
only once they are gone. C's status travels C -> wait4 in B -> private pipe -> T -> control socket; the
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
import types

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
PR_SET_DUMPABLE = 4
PR_SET_PDEATHSIG = 1
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # syscall numbers (glibc has no wrapper)
SANDBOX_HOSTNAME = b"sandbox"

_libc = ctypes.CDLL(None, use_errno=True)
HEADER = struct.Struct("!I")
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
    header = HEADER.pack(len(body))
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
        data, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, max_fds)
        if not data:
            return None, fds
        rest = _recv_exact(sock, HEADER.size - len(data)) if len(data) < HEADER.size else b""
        if rest is None:
            return None, fds
        header = data + rest
    else:
        header = _recv_exact(sock, HEADER.size)
        if header is None:
            return None, []
    (size,) = HEADER.unpack(header)
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
    """C: becomes the program. Never returns.

    The steps run in this order, each relying on the ones before it: descriptors and session, limits (no new
    privileges first), the uid drop (then not dumpable), the interpreter's state, and the address-space cap last,
    just before the program. A failure anywhere in set-up exits 70 without running the program; once the program
    has started, the exit code is the program's (1 for an uncaught exception)."""
    code = 70
    try:
        _take_stdio_and_session(out_w, err_w, workdir)
        _apply_rlimits(req)
        _drop_privileges(uid)
        _scrub_interpreter(workdir)
        if block_sockets:
            _forbid_sockets()
        main = _fresh_main_module()
        source = req["code"]
        # The address-space cap is the program's budget on top of what the preloaded interpreter maps.
        extra = req["limits"]["memory_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + extra,) * 2)
        code = 1
        code = _run_program(source, main)
        code = _interpreter_exit(code)
        _flush_std_streams()
    except BaseException:  # noqa: BLE001 - a failure while setting up must never run the program
        try:
            os.write(2, b"sandbox setup failed: " + traceback.format_exc().encode()[-2000:])
        except OSError:
            pass
    os._exit(code)


def _take_stdio_and_session(out_w: int, err_w: int, workdir: str) -> None:
    """Own session; stdin /dev/null, stdout/stderr the pool's pipes, every other descriptor closed; cwd
    ``workdir``; default signal dispositions (SIGINT raises KeyboardInterrupt, like an interpreter)."""
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


def _apply_rlimits(req: dict) -> None:
    """No new privileges, then the run's rlimits: CPU seconds (timeout + 1), processes, open files, file size,
    no core dumps. The address-space cap comes later (it is measured against the finished interpreter)."""
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    limits = req["limits"]
    cpu = max(1, math.ceil(float(req["timeout_s"]))) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_procs"], limits["max_procs"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
    fsize = limits["max_file_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _drop_privileges(uid: int | None) -> None:
    """Become ``uid`` (no supplementary groups) when one is given (the template runs as root), then mark the
    process not dumpable."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _scrub_interpreter(workdir: str) -> None:
    """A fixed, minimal environment (HOME and TMPDIR = ``workdir``), argv ``["<sandbox>"]``, no cwd entry on
    sys.path, and a line-buffered stdout."""
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


def _forbid_sockets() -> None:
    """Fallback only (no network namespace): refuse socket creation from Python. Best effort: code that reaches
    libc directly (ctypes) is not stopped by this."""
    def _no_sockets(event: str, _args: tuple) -> None:
        if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto"):
            raise PermissionError("network access is disabled in the sandbox")

    sys.addaudithook(_no_sockets)


def _fresh_main_module() -> types.ModuleType:
    """An empty ``__main__`` module (builtins only), installed in sys.modules, for the program to run in."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    return main


def _run_program(source: str, main: types.ModuleType) -> int:
    """Run ``source`` in ``main``; its exit code as ``python prog.py`` would give it before interpreter exit
    (SystemExit honoured; an uncaught exception prints the program's traceback and gives 1)."""
    try:
        exec(compile(source, "<sandbox>", "exec"), main.__dict__)  # noqa: S102 - isolated child
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001
        # Show the program's frames only, not this file's.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        traceback.print_exception(type(exc), exc, tb)
        return 1


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass


def _interpreter_exit(code: int) -> int:
    """What ``python prog.py`` does once the main module is done: wait for every non-daemon thread (a thread
    that never ends keeps the run going until its deadline, a timeout), then run atexit handlers."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined] - the interpreter's own exit step
    except BaseException:  # noqa: BLE001 - e.g. KeyboardInterrupt while joining: like the interpreter, go on
        code = code or 1
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    return code


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------- supervisors ----

# ------------------------------------------------------------------------ the program's filesystem ----
#
# THE ONE PLACE that decides what a sandboxed program can see (namespace mode). The template builds this view
# once, at start-up, as a fresh tmpfs root and pivots into it; every run then adds only its own /tmp, /dev/shm
# and /proc. Nothing of the host appears unless an entry below puts it there.

VIEW_WHY = {
    "stdlib": "the standard library the interpreter imports from (incl. lib-dynload extension modules): read-only bind",
    "site-packages": "installed third-party packages (sympy, numpy, ...): the site-packages directories only, never "
                     "the virtual environment, repository or home directory around them: read-only bind",
    "interpreter": "the interpreter binary, its libpython, and the venv's bin/python link + pyvenv.cfg, so a program "
                   "can start a sub-interpreter (subprocess, multiprocessing spawn): read-only bind",
    "shared-library": "a file the preloaded interpreter has mapped (shared libraries, locale data) or one that an "
                      "extension module of the stdlib / preloaded packages needs (DT_NEEDED closure): read-only "
                      "bind of that one file, plus the symlinks on its path",
    "device": "/dev/null, /dev/zero, /dev/urandom: read-only bind of the host's device nodes (writes to /dev/null "
              "still work)",
    "dev-link": "/dev/fd, /dev/stdin, /dev/stdout, /dev/stderr: symlinks into the run's own /proc/self",
    "etc": "synthetic /etc: passwd and group with the sandbox user only, nsswitch.conf saying 'files'; no host "
           "name, no hosts, no resolver, no ld.so.cache",
    "tmp": "per run: a fresh tmpfs of scratch_mb (cwd, HOME, TMPDIR), gone with the run",
    "shm": "per run: a fresh tmpfs at /dev/shm (POSIX semaphores, multiprocessing), gone with the run",
    "proc": "per run: procfs of the run's own PID namespace (only its own processes)",
}
PER_RUN = ("/tmp", "/dev/shm", "/proc")  # mount points in the view; mounted fresh by each run's init
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
DEV_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
             "/dev/stderr": "/proc/self/fd/2"}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
             "/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/lib", "/usr/local/lib")


def _python_dirs() -> list[tuple[str, str]]:
    """(path, kind) of the directories of the interpreter's own import path: the stdlib and site-packages."""
    import sysconfig

    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    out = [(stdlib, "stdlib")]
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        if real == stdlib or real.startswith(stdlib + "/"):
            continue
        if os.path.basename(real) in ("site-packages", "dist-packages"):
            out.append((real, "site-packages"))
    return out


def _elf_needs(path: str) -> tuple[list[str], list[str]]:
    """(DT_NEEDED names, RPATH/RUNPATH entries) of a 64-bit ELF file; ([], []) for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return [], []
            e = "<" if head[5] == 1 else ">"
            shoff = struct.unpack(e + "Q", head[0x28:0x30])[0]
            shentsize, shnum = struct.unpack(e + "HH", head[0x3A:0x3E])
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack(e + "IIQQQQIIQQ", table[i * shentsize:i * shentsize + 64]) for i in range(shnum)]
            dyn = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
            if dyn is None:
                return [], []
            f.seek(dyn[4])
            raw = f.read(dyn[5])
            strtab = sections[dyn[6]]
            f.seek(strtab[4])
            strings = f.read(strtab[5])
    except (OSError, struct.error, IndexError):
        return [], []
    needed, paths = [], []
    for i in range(0, len(raw) - 15, 16):
        tag, val = struct.unpack(e + "qQ", raw[i:i + 16])
        if tag == 0:
            break
        if tag in (1, 15, 29):  # DT_NEEDED, DT_RPATH, DT_RUNPATH
            text = strings[val:strings.index(b"\0", val)].decode(errors="replace")
            (needed if tag == 1 else paths).append(text)
    return needed, paths


def _elf_interp(path: str) -> str | None:
    """The program interpreter (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2) of a 64-bit ELF executable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return None
            e = "<" if head[5] == 1 else ">"
            phoff = struct.unpack(e + "Q", head[0x20:0x28])[0]
            phentsize, phnum = struct.unpack(e + "HH", head[0x36:0x3A])
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack(e + "IIQQQQ", table[i * phentsize:i * phentsize + 40])
                if p_type == 3:  # PT_INTERP
                    f.seek(p_offset)
                    return f.read(p_filesz).rstrip(b"\0").decode()
    except (OSError, struct.error):
        return None
    return None


def _library_closure(roots: list[str]) -> set[str]:
    """Every file the dynamic loader would open for ``roots`` (lexical paths, symlinks kept), roots included."""
    found: set[str] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        needed, runpaths = _elf_needs(path)
        origin = os.path.dirname(os.path.realpath(path))
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for rp in runpaths for d in rp.split(":")]
        for name in needed:
            for d in ([""] if "/" in name else dirs + list(_LIB_DIRS)):
                candidate = os.path.join(d, name) if d else name
                if os.path.isfile(candidate):
                    todo.append(candidate)
                    break
    return found


def _mapped_files() -> list[str]:
    """Regular files mapped into this process (shared libraries, locale data)."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].rstrip().endswith("(deleted)"):
                path = parts[5].rstrip("\n")
                if os.path.isfile(path):
                    out.add(path)
    return sorted(out)


def filesystem_view(uid: int, preloaded: list[str]) -> list[tuple[str, str, str]]:
    """What the program will see, as (path, kind, source); see VIEW_WHY[kind] for why each is there.

    kind "stdlib" / "site-packages" / "interpreter" / "shared-library" / "device": ``source`` is the host path,
    bound read-only at ``path``; "dev-link": a symlink to ``source``; "etc": a synthetic file whose text is
    ``source``; "tmp" / "shm" / "proc": mounted fresh per run."""
    dirs = _python_dirs()
    under = lambda p: any(p == d or p.startswith(d + "/") for d, _ in dirs)  # noqa: E731
    view = [(d, kind, d) for d, kind in dirs]
    exe = sys.executable
    interp = [exe, os.path.realpath(exe)]
    venv_cfg = os.path.join(sys.prefix, "pyvenv.cfg")
    if sys.prefix != sys.base_prefix and os.path.isfile(venv_cfg):
        interp.append(venv_cfg)
    roots = _mapped_files()
    ext_dirs = [os.path.join(d, "lib-dynload") for d, kind in dirs if kind == "stdlib"]
    for name in preloaded:
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            pkg = os.path.dirname(os.path.realpath(path))
            ext_dirs += [pkg, pkg + ".libs", os.path.join(os.path.dirname(pkg), name + ".libs")]
    for d in ext_dirs:
        for base, _, names in os.walk(d) if os.path.isdir(d) else ():
            roots += [os.path.join(base, n) for n in names if ".so" in n]
    loader = _elf_interp(os.path.realpath(exe))
    roots += [loader] if loader and os.path.exists(loader) else []
    libs = sorted(p for p in _library_closure(roots + interp) if not under(os.path.realpath(p)))
    view += [(p, "interpreter", p) for p in interp if not under(os.path.realpath(p))]
    view += [(p, "shared-library", p) for p in libs if p not in interp]
    view += [(d, "device", d) for d in DEVICES]
    view += [(link, "dev-link", target) for link, target in DEV_LINKS.items()]
    view += [("/etc/passwd", "etc", f"sandbox:x:{uid}:{uid}:sandbox:/tmp:/nonexistent\n"),
             ("/etc/group", "etc", f"sandbox:x:{uid}:\n"),
             ("/etc/nsswitch.conf", "etc", "passwd: files\ngroup: files\nhosts: files\n"),
             ("/tmp", "tmp", ""), ("/dev/shm", "shm", ""), ("/proc", "proc", "")]
    return view


def _path_plan(path: str) -> tuple[list[tuple[str, str]], str]:
    """(the symlinks met while resolving ``path``, as (link path, target text); the resolved real path)."""
    links: list[tuple[str, str]] = []
    pending = [p for p in path.split("/") if p]
    cur = "/"
    for _ in range(256):
        if not pending:
            return links, cur
        name = pending.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            links.append((nxt, target))
            pending = [p for p in target.split("/") if p] + pending
            if target.startswith("/"):
                cur = "/"
        else:
            cur = nxt
    raise OSError(f"too many symlinks resolving {path}")


NEW_ROOT = "/tmp"  # where the view is assembled, in the template's private mount namespace, before pivot_root
_BIND_KINDS = ("stdlib", "site-packages", "interpreter", "shared-library", "device")


def build_root(view: list[tuple[str, str, str]]) -> dict:
    """Assemble ``view`` on a fresh tmpfs and pivot into it (this process's private mount namespace only).

    Every host source is opened (O_PATH) before the tmpfs covers anything, so a source under NEW_ROOT (a CI
    checkout in /tmp) still binds. Afterwards the old root is detached: nothing outside the view is reachable
    by any path, from the template or from anything it forks. Returns what of the view lies under /tmp
    (``{"links": [(link, target)], "binds": [(path, is_dir)]}``): each run mounts a fresh /tmp over it and
    puts those back on top (:func:`_restore_tmp_entries`)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    binds = []
    for path, kind, src in view:
        if kind in _BIND_KINDS:
            links, real = _path_plan(path)
            binds.append((links, real, kind, os.open(src, os.O_PATH | os.O_CLOEXEC)))
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    new = lambda p: NEW_ROOT + p  # noqa: E731
    binds.sort(key=lambda b: (b[2] not in ("stdlib", "site-packages"), b[1]))  # directories before files
    for links, real, kind, fd in binds:
        for link, target in links:
            os.makedirs(os.path.dirname(new(link)), exist_ok=True)
            if not os.path.lexists(new(link)):
                os.symlink(target, new(link))
        os.makedirs(os.path.dirname(new(real)), exist_ok=True)
        is_dir = kind in ("stdlib", "site-packages")
        if is_dir:
            os.makedirs(new(real), exist_ok=True)
        elif not os.path.lexists(new(real)):
            open(new(real), "w").close()
        _mount(f"/proc/self/fd/{fd}", new(real), None, MS_BIND, None)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if kind == "device" else MS_NODEV)
        _mount(None, new(real), None, flags, None)
        os.close(fd)
    for path, kind, src in view:
        if kind == "dev-link":
            os.makedirs(os.path.dirname(new(path)), exist_ok=True)
            os.symlink(src, new(path))
        elif kind == "etc":
            os.makedirs(os.path.dirname(new(path)), mode=0o755, exist_ok=True)
            with open(new(path), "w") as f:
                f.write(src)
            os.chmod(new(path), 0o644)
        elif kind in ("tmp", "shm", "proc"):
            os.makedirs(new(path), mode=0o755, exist_ok=True)
    in_tmp = lambda p: p == "/tmp" or p.startswith("/tmp/")  # noqa: E731
    tmp_keep = {"links": sorted({(link, target) for links, _, _, _ in binds for link, target in links if in_tmp(link)}),
                "binds": [(real, kind in ("stdlib", "site-packages")) for _, real, kind, _ in binds if in_tmp(real)]}
    _mount(None, NEW_ROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chdir(NEW_ROOT)
    _check(_libc.syscall(ctypes.c_long(_PIVOT_ROOT[os.uname().machine]), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", ctypes.c_int(2)), "detach the old root")  # MNT_DETACH
    os.chdir("/")
    return tmp_keep


def _restore_tmp_entries(tmp_keep: dict, fds: list[int]) -> None:
    """Inside a run, after its fresh /tmp is mounted: the view's entries under /tmp (e.g. the site-packages of a
    virtualenv checked out under /tmp) bound back read-only, from ``fds`` opened (O_PATH) before the tmpfs
    covered them. Needs this namespace's /proc (the binds go through /proc/self/fd)."""
    for link, target in tmp_keep["links"]:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(target, link)
    for (path, is_dir), fd in zip(tmp_keep["binds"], fds):
        os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
        if not is_dir and not os.path.lexists(path):
            open(path, "w").close()
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND, None)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(fd)




def _init_main(req: dict, out_w: int, err_w: int, uid: int | None, status_w: int, lifeline: int,
               tmp_keep: dict | None = None) -> None:
    """B: PID 1 of the run's PID namespace; gives the run its own mount namespace. Never returns.

    B dies with its template (PR_SET_PDEATHSIG=SIGKILL; ``lifeline`` is a pidfd of the template, checked once
    after arming, for a template that died before that), and when B dies the kernel kills the whole PID
    namespace: no run outlives its template, whatever killed it."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if select.select([lifeline], [], [], 0)[0]:
            os._exit(0)  # the template is already gone
        os.close(lifeline)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # PID 1 ignores handler-less signals from inside
        _unshare(CLONE_NEWNS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        owner = f"uid={uid or 0},gid={uid or 0}"
        size = f"size={int(req['limits']['scratch_mb'])}m"
        tmp_keep = tmp_keep or {"links": [], "binds": []}
        kept = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path, _ in tmp_keep["binds"]]  # before /tmp is covered
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=0700,{owner}")
        # POSIX semaphores / shared memory (multiprocessing) need a writable /dev/shm: a private one
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777,{owner}")
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)  # this namespace's pids only
        _restore_tmp_entries(tmp_keep, kept)
        scratch = "/tmp"
        if tmp_keep["binds"]:  # /tmp also holds the view's entries: the run's cwd/HOME/TMPDIR is an empty subfolder
            scratch = "/tmp/.run"
            os.mkdir(scratch, 0o700)
            os.chown(scratch, uid or 0, uid or 0)
        child = os.fork()
        if child == 0:
            os.close(status_w)
            _child_main(req, out_w, err_w, scratch, uid)
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


class Template:
    """T: the template's state and request loop. Never runs user code."""

    def __init__(self, sock: socket.socket, isolation: str, preloaded: list[str] | None = None) -> None:
        self.sock = sock
        self.uid: int | None = None
        self.namespaces = False
        self.net_isolated = False
        self.note = ""
        self.view: list[tuple[str, str, str]] = []
        if os.geteuid() == 0:
            # A uid no other live template uses (pids are unique), so RLIMIT_NPROC counts this run only.
            self.uid = 100000 + os.getpid()
        if isolation != "process":
            self.note = probe_namespaces()
            if not self.note:
                try:
                    self._enter_namespaces(preloaded or [])
                    self.namespaces = True
                except OSError as exc:
                    # Half-built namespaces are unusable (the root may already be covered): refuse to serve
                    # rather than run programs with less isolation than reported.
                    raise SystemExit(f"sandbox namespace set-up failed: {exc}") from exc
        if not self.namespaces:
            self.root = tempfile.mkdtemp(prefix=f"dsmath-sandbox-{os.getpid()}-")
            os.chmod(self.root, 0o711)

    def _enter_namespaces(self, preloaded: list[str]) -> None:
        """Private mount/net/IPC/UTS namespaces for the template, then the minimal filesystem view (built
        once here, per slot: see ``filesystem_view``). Per run, the child only needs a new PID + mount
        namespace and its three per-run mounts (fast)."""
        self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.lifeline = os.pidfd_open(os.getpid())  # inherited by each run's init: "is my template alive?"
        self.view = filesystem_view(self.uid if self.uid is not None else os.getuid(), preloaded)
        _unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        self.net_isolated = True
        _check(_libc.sethostname(SANDBOX_HOSTNAME, ctypes.c_size_t(len(SANDBOX_HOSTNAME))), "sethostname")
        self.tmp_keep = build_root(self.view)

    def serve(self) -> None:
        try:
            while True:
                req, fds = recv_msg(self.sock, max_fds=2)
                if req is None:
                    for fd in fds:
                        os.close(fd)
                    return
                if req.get("cancel"):
                    continue  # a cancel that crossed the end of its run: nothing left to cancel
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
                if result.get("pool_gone"):
                    return
        finally:
            if not self.namespaces:
                shutil.rmtree(self.root, ignore_errors=True)

    def _watch(self, pid: int, deadline: float) -> str:
        """Wait for ``pid`` until ``deadline``, listening to the pool meanwhile: "exited", "timeout",
        "cancelled" (the pool asked) or "pool_gone" (the control socket closed: nobody wants the result)."""
        pidfd = os.pidfd_open(pid)
        try:
            while True:
                left = deadline - time.monotonic()
                ready = select.select([pidfd, self.sock], [], [], max(0.0, left))[0]
                if pidfd in ready:
                    return "exited"
                if self.sock in ready:
                    try:
                        msg, fds = recv_msg(self.sock, max_fds=2)
                    except (OSError, ValueError):
                        msg, fds = None, []
                    for fd in fds:
                        os.close(fd)
                    if msg is None:
                        return "pool_gone"
                    if msg.get("cancel"):
                        return "cancelled"
                    continue
                if left <= 0:
                    return "timeout"
        finally:
            os.close(pidfd)

    def run_ns(self, req: dict, out_w: int, err_w: int) -> dict:
        status_r, status_w = os.pipe()
        try:
            _unshare(CLONE_NEWPID)  # only our next child moves: it becomes PID 1 of a fresh namespace
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                os.close(status_r)
                self.sock.close()
                _init_main(req, out_w, err_w, self.uid, status_w, self.lifeline, self.tmp_keep)
        finally:
            _check(_libc.setns(self.pidns_fd, CLONE_NEWPID), "setns")  # back, so the next unshare works
            os.close(status_w)
            os.close(out_w)
            os.close(err_w)
        how = self._watch(pid, start + float(req["timeout_s"]))
        if how != "exited":
            os.kill(pid, signal.SIGKILL)  # PID 1 dies -> the kernel kills the whole namespace
        os.waitpid(pid, 0)  # returns only once every process of the namespace is gone
        wall = time.monotonic() - start
        raw = b""
        while chunk := os.read(status_r, 65536):
            raw += chunk
        os.close(status_r)
        result = {"timed_out": how == "timeout", "cancelled": how == "cancelled", "pool_gone": how == "pool_gone",
                  "wall_s": wall, "status": None}
        if raw and how == "exited":
            result.update(json.loads(raw))
        elif how == "exited":
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
        how = self._watch(pid, start + float(req["timeout_s"]))
        timed_out = how == "timeout"
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
        return {"timed_out": timed_out, "cancelled": how == "cancelled", "pool_gone": how == "pool_gone",
                "wall_s": wall, "status": status if how == "exited" else None,
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
    template = Template(sock, isolation, loaded)
    # Move every object made so far out of the collector's reach: a child's GC pass would otherwise touch
    # (and so copy-on-write duplicate) the whole preloaded heap.
    gc.collect()
    gc.freeze()
    send_msg(sock, {"ready": True, "pid": os.getpid(), "uid": template.uid, "namespaces": template.namespaces,
                    "net_isolated": template.net_isolated, "note": template.note, "preloaded": loaded})
    template.serve()


if __name__ == "__main__":
    main()

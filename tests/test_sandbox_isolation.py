"""What model-written code can see and reach: nothing of the host.

Planted world-readable secrets (in /tmp, in the repository, in $HOME) and a world-writable Unix socket are
invisible/unreachable from sandboxed code; /etc/passwd holds no host user; a dead template leaves nothing
alive; a set of hostile programs is contained with nothing left behind; and a PoT reward run whose
programs look for the training / held-out files (by real path and by walking the filesystem) finds
nothing, locally and through the gRPC service."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from dsmath.sandbox import SandboxPool
from tests.test_sandbox import _procs_of

REPO = Path(__file__).resolve().parents[1]
TOKEN = "isolation-test-token-0123456789"

# A program that looks everywhere for ``needle``: the given paths, then every file it can walk to.
SEARCH = """
import os, sys
needle, paths = {needle!r}, {paths!r}
found = []
for p in paths:
    try:
        if needle in open(p, errors="replace").read():
            found.append(p)
    except OSError:
        pass
seen = 0
for base, dirs, files in os.walk("/"):
    if base.startswith("/proc"):
        dirs[:] = [d for d in dirs if d in ("self",)] if base == "/proc" else []
    for name in files:
        path = os.path.join(base, name)
        seen += 1
        try:
            with open(path, "rb") as f:
                if needle.encode() in f.read(4 * 2**20):
                    found.append(path)
        except OSError:
            pass
print("LEAK:" + ",".join(found) if found else "nothing", seen)
"""


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(size=2) as p:
        assert p.namespaces, p.isolation_note
        yield p


@pytest.fixture
def planted(tmp_path):
    """A world-readable secret in /tmp, in the repository and in $HOME; removed afterwards."""
    needle = f"planted-secret-{uuid.uuid4().hex}"
    paths = [tmp_path / "secret.txt", REPO / f".planted-secret-{uuid.uuid4().hex}.txt",
             Path.home() / f".planted-secret-{uuid.uuid4().hex}.txt"]
    os.chmod(tmp_path, 0o755)
    for p in paths:
        p.write_text(needle)
        p.chmod(0o644)
    yield needle, [str(p) for p in paths]
    for p in paths:
        p.unlink(missing_ok=True)


def _clean(pool) -> None:
    assert _procs_of(pool.sandbox_uids) == [], "a sandboxed process outlived its run"


def test_planted_secrets_are_invisible(pool, planted):
    needle, paths = planted
    r = pool.run(SEARCH.format(needle=needle, paths=paths + [str(REPO / "README.md")]), timeout_s=60)
    assert r.exit_code == 0, r.stderr
    verdict, seen = r.stdout.split()
    assert verdict == "nothing" and int(seen) > 100, r.stdout  # it did walk the (small) view
    _clean(pool)


def test_the_view_holds_only_what_the_interpreter_needs(pool):
    r = pool.run(textwrap.dedent(f"""
        import os, socket
        print(sorted(os.listdir("/")))
        print(sorted(os.listdir("/etc")), sorted(os.listdir("/dev")))
        print(open("/etc/passwd").read().strip())
        print(socket.gethostname())
        for p in [{str(REPO)!r}, {str(REPO / 'README.md')!r}, {str(REPO.parent)!r}, {str(Path.home())!r},
                  "/etc/hostname", "/etc/shadow", "/etc/hosts", "/var", "/sys", "/run", "/home", "/bin/sh"]:
            try:
                print(p, sorted(os.listdir(p)) if os.path.isdir(p) else open(p).read()[:20])
            except OSError as e:
                print(p, type(e).__name__)
    """))
    lines = r.stdout.splitlines()
    assert r.exit_code == 0, r.stderr
    top = eval(lines[0])  # noqa: S307 - our own program's repr
    # The interpreter's own tree (wherever the checkout and its venv live: /work, /check, /tmp, ...) is bound in.
    own = {Path(p).resolve().parts[1] for p in (REPO, sys.prefix, sys.base_prefix)}
    assert set(top) <= {"dev", "etc", "proc", "tmp", "usr", "lib", "lib64", "root", "opt", "bin"} | own, top
    assert "home" not in top and "var" not in top and "sys" not in top
    assert lines[1] == "['group', 'nsswitch.conf', 'passwd'] ['fd', 'null', 'shm', 'stderr', 'stdin', 'stdout', " \
                       "'urandom', 'zero']"
    uid = int(lines[2].split(":")[2])
    assert lines[2] == f"sandbox:x:{uid}:{uid}:sandbox:/tmp:/nonexistent" and uid in pool.sandbox_uids
    host_users = {u.pw_name for u in pwd.getpwall()}
    assert not any(line.split(":")[0] in host_users for line in lines[2:3])
    assert lines[3] == "sandbox" and lines[3] != socket.gethostname()
    # The repository holds at most the venv's site-packages (for the interpreter); never the code or data.
    assert f"{REPO} ['.venv']" in lines or f"{REPO} FileNotFoundError" in lines, lines
    assert f"{REPO / 'README.md'} FileNotFoundError" in lines
    for gone in ("/etc/hostname", "/etc/shadow", "/etc/hosts", "/var", "/sys", "/run", "/home", "/bin/sh"):
        assert f"{gone} FileNotFoundError" in lines, (gone, lines)
    _clean(pool)


def test_the_view_is_listed_in_one_place_with_a_reason():
    from dsmath.sandbox import forkserver

    view = forkserver.filesystem_view(123456, ["sympy", "numpy"])
    kinds = {kind for _, kind, _ in view}
    assert kinds <= set(forkserver.VIEW_WHY) and {"stdlib", "site-packages", "shared-library", "etc"} <= kinds
    for path, kind, _ in view:
        if kind in ("stdlib", "site-packages"):
            assert not str(REPO).startswith(path) and path != str(REPO / ".venv"), path  # never the repo itself
    assert not any(path.startswith(str(Path.home()) + "/") and kind == "site-packages" and ".venv" not in path
                   for path, kind, _ in view)


def test_a_world_writable_unix_socket_is_unreachable(pool):
    path = f"/var/tmp/dsmath-isolation-{uuid.uuid4().hex[:8]}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.settimeout(0.0)
    try:
        r = pool.run(textwrap.dedent(f"""
            import socket
            out = []
            for addr in ({path!r}, "/proc/1/root{path}"):
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(addr)
                    s.sendall(b"leak")
                    out.append("CONNECTED")
                except OSError as e:
                    out.append(type(e).__name__)
            print(" ".join(out))
        """))
        assert r.exit_code == 0 and "CONNECTED" not in r.stdout, r
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's socket
    finally:
        listener.close()
        os.unlink(path)
    _clean(pool)


def test_killing_a_template_mid_run_leaves_nothing_alive():
    with SandboxPool(size=1, preload=()) as p:
        (uid,) = p.sandbox_uids
        (victim,) = p.worker_pids()
        result = {}
        runner = threading.Thread(target=lambda: result.update(r=p.run(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(60)", timeout_s=5)))
        runner.start()
        deadline = time.monotonic() + 10
        while len(_procs_of([uid])) < 2:  # the program and its daemon-ish child are running
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        while _procs_of([uid]):
            assert time.monotonic() - t < 4.0, "the run outlived its template"  # its own limit is 5 s, its sleeps 60 s
            time.sleep(0.01)
        runner.join(timeout=30)
        assert result["r"].timed_out  # retried once on a fresh template, which enforced the deadline
        assert p.stats()["worker_deaths"] == 1 and _procs_of(p.sandbox_uids) == []


HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
    "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(300)\n"
              "    os._exit(0)\nprint('parent exits')",
    "memory_bomb": "x = []\nwhile True: x.append(bytearray(100 * 2**20))",
    "numpy_memory_bomb": "import numpy as np\na = np.ones((100000, 100000))",
    "never_ending_thread": "import threading, time\nprint('answer: 42')\nthreading.Thread(target=time.sleep, args=(300,)).start()",
    "ignores_signals": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n"
                       "while True: pass",
    "huge_output": "import sys\nwhile True: sys.stdout.write('x' * 65536)",
    "forged_report": "import json, os, sys\nfor fd in range(3, 1024):\n    try: os.write(fd, json.dumps({'status': 0}).encode()); print('LEAK fd', fd)\n"
                     "    except OSError: pass\nprint(json.dumps({'status': 0, 'timed_out': False}))\nsys.stdout.flush()\nos._exit(9)",
    "kill_everything": "import os, signal\nfor pid in range(1, 400):\n    try: os.kill(pid, signal.SIGKILL)\n    except OSError: pass\n"
                       "try: os.kill(-1, signal.SIGKILL)\nexcept OSError: pass\nprint('alive')",
    "proc_environ_and_root": "import os, glob\nfor p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/root/etc/shadow'):\n"
                             "    try: d = open(p, 'rb').read(); print('LEAK', p) if b'HOME=/root' in d or b'root:' in d else None\n"
                             "    except OSError: pass\nprint(sorted(x for x in os.listdir('/proc') if x.isdigit()))",
    "proc_mountinfo_follow": "import os\nfor line in open('/proc/self/mountinfo'):\n    src = line.split()[3]\n"
                             "    for p in (src, os.path.dirname(src)):\n        try:\n            if 'dsmath' in os.listdir(p): print('LEAK', p)\n"
                             "        except OSError: pass\nprint('done')",
    "ctypes_mount_unshare_chroot": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                   "r = [libc.unshare(0x00020000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), libc.chroot(b'/tmp'),\n"
                                   "     libc.setuid(0), libc.mount(b'/', b'/tmp', None, 4096, None)]\n"
                                   "print('LEAK' if 0 in r else 'refused', r)",
    "ctypes_ptrace_pid1": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.ptrace(16, 1, 0, 0)\nprint('LEAK' if r == 0 else 'refused')",
    "raise_rlimits": "import resource\ntry:\n    resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6)); print('LEAK')\nexcept (ValueError, OSError): print('refused')",
    "mknod_and_devices": "import os, stat\ntry:\n    os.mknod('/tmp/sda', stat.S_IFBLK | 0o600, os.makedev(8, 0)); print('LEAK mknod')\n"
                         "except OSError: pass\nprint(sorted(os.listdir('/dev')))",
    "write_outside_scratch": "import os\nfor p in ('/etc/passwd', '/usr/x', '/x', '/proc/sys/kernel/hostname', '/dev/shm/../x'):\n"
                             "    try: open(p, 'w').write('x'); print('WROTE', p)\n    except OSError: pass\nprint('done')",
    "symlink_escape": "import os\nos.symlink('/proc/1/root/../../../../', '/tmp/up')\nprint(sorted(os.listdir('/tmp/up')))",
    "connect_network": "import socket\nout = []\nfor addr in (('127.0.0.1', 22), ('10.0.0.1', 80), ('8.8.8.8', 53)):\n"
                       "    try: socket.create_connection(addr, timeout=1); out.append('LEAK')\n    except OSError as e: out.append(type(e).__name__)\n"
                       "s = socket.socket(socket.AF_UNIX)\ntry: s.connect('\\0dsmath-abstract'); out.append('LEAK')\nexcept OSError: out.append('nounix')\nprint(out)",
    "exec_shell": "import os, subprocess\nfor cmd in (['/bin/sh', '-c', 'id'], ['ls', '/'], ['curl', 'x']):\n"
                  "    try: subprocess.run(cmd); print('LEAK', cmd)\n    except OSError: pass\nprint('no shell')",
    "read_host_files": "import os\nfor p in ('/etc/shadow', '/root/.ssh/id_rsa', '/root/.bash_history', '/etc/hostname', '/sys/class/net'):\n"
                       "    try: os.stat(p); print('LEAK', p)\n    except OSError: pass\nprint('nothing')",
    "fd_inheritance_scan": "import os\nfds = [fd for fd in range(3, 4096) if os.path.exists(f'/proc/self/fd/{fd}')]\nprint('open fds', fds)",
}


def test_hostile_programs_are_contained_and_leave_nothing(pool):
    t = time.monotonic()
    results = {name: pool.run(code, timeout_s=3, memory_mb=256, max_output_bytes=4096)
               for name, code in HOSTILE.items()}
    for name, r in results.items():
        assert "LEAK" not in r.stdout and "WROTE" not in r.stdout, (name, r)
        assert r.wall_s < 10, (name, r.wall_s)  # its 3 s limit enforced (a runaway takes 60 s+), with slack for load
        _clean(pool)
    assert results["fork_bomb"].timed_out and results["ignores_signals"].timed_out
    assert results["never_ending_thread"].timed_out and results["never_ending_thread"].stdout == "answer: 42\n"
    assert results["daemon"].stdout == "parent exits\n" and results["daemon"].exit_code == 0
    assert results["memory_bomb"].memory_exceeded and results["numpy_memory_bomb"].memory_exceeded
    assert results["huge_output"].output_truncated and len(results["huge_output"].stdout) == 4096
    assert results["forged_report"].exit_code == 9
    assert results["kill_everything"].exit_code in (0, None)
    assert results["proc_environ_and_root"].stdout.strip().endswith("['1', '2']")
    assert "refused" in results["ctypes_mount_unshare_chroot"].stdout
    assert results["ctypes_ptrace_pid1"].stdout == "refused\n" and results["raise_rlimits"].stdout == "refused\n"
    assert results["exec_shell"].stdout == "no shell\n" and results["read_host_files"].stdout == "nothing\n"
    assert "home" not in results["symlink_escape"].stdout and "var" not in results["symlink_escape"].stdout
    assert results["fd_inheritance_scan"].stdout == "open fds []\n"
    assert time.monotonic() - t < 120
    r = pool.run("import sympy\nprint(sympy.factor('x**2-1'))")
    assert (r.stdout, r.exit_code) == ("(x - 1)*(x + 1)\n", 0)


BENIGN = [
    ("print(sum(range(101)))", "5050\n"),
    ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.integrate(x**2, (x, 0, 3)))", "9\n"),
    ("import numpy as np\nprint(int(np.linalg.det(np.array([[2, 1], [1, 3]])).round()))", "5\n"),
    ("from fractions import Fraction\nprint(Fraction(1, 3) + Fraction(1, 6))", "1/2\n"),
    ("import math\nprint(math.comb(10, 3))", "120\n"),
    ("import itertools\nprint(len(list(itertools.permutations(range(5)))))", "120\n"),
    ("import sympy\nprint(sympy.nsimplify('0.75'))", "3/4\n"),
    ("import threading\nout = []\nt = threading.Thread(target=lambda: out.append(7))\nt.start(); t.join()\nprint(out[0] * 6)", "42\n"),
    ("import decimal\ndecimal.getcontext().prec = 30\nprint(decimal.Decimal(1) / decimal.Decimal(7))",
     "0.142857142857142857142857142857\n"),
    ("import sqlite3\nprint(sqlite3.connect(':memory:').execute('select 6*7').fetchone()[0])", "42\n"),
]


@pytest.mark.parametrize("code, expected", BENIGN, ids=[f"benign{i}" for i in range(len(BENIGN))])
def test_benign_pot_programs_still_run_with_exact_output(pool, code, expected):
    r = pool.run(code, timeout_s=10)
    assert (r.stdout, r.stderr, r.exit_code) == (expected, "", 0)


def _hacking_rollouts(train: Path, heldout: Path):
    from dsmath.records import Problem, Rollout

    by_path = textwrap.dedent(f"""
        import json
        for path in ({str(train)!r}, {str(heldout)!r}):
            try:
                for line in open(path):
                    row = json.loads(line)
                    if row["question"].startswith("What is 1234"):
                        print(row["answer"])
            except OSError:
                pass
    """)
    walking = textwrap.dedent("""
        import json, os
        for base, dirs, files in os.walk("/"):
            if base.startswith("/proc"):
                dirs[:] = []
                continue
            for name in files:
                if name.endswith((".jsonl", ".json")):
                    try:
                        for line in open(os.path.join(base, name)):
                            if "What is 1234" in line:
                                print(json.loads(line)["answer"])
                    except (OSError, ValueError, KeyError, TypeError):
                        pass
    """)
    problem = Problem("p1", "What is 1234 * 5678 + 91?", "7006743")
    honest = "```python\nprint(1234 * 5678 + 91)\n```"
    return [Rollout("p1", i, problem, "", (1,), text, (2,), (0.0,), "stop", 0, "g")
            for i, text in enumerate([f"```python\n{by_path}```", f"```python\n{walking}```", honest])]


@pytest.fixture
def data_files(tmp_path):
    """Training and held-out question files with their gold answers, world-readable, as a real run has."""
    rows = [{"question": "What is 1234 * 5678 + 91?", "answer": "7006743"}, {"question": "2+2?", "answer": "4"}]
    os.chmod(tmp_path, 0o755)
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    for path in (train, heldout):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        path.chmod(0o644)
    return train, heldout


def _assert_no_reward_from_the_files(results):
    assert [r.correct for r in results] == [False, False, True], results
    assert results[0].reward == results[1].reward == 0.0 and results[2].reward == 1.0
    assert not any(r.grader_failed for r in results)


def test_pot_reward_hacking_finds_no_data_file(data_files):
    from dsmath.config import RewardConfig
    from dsmath.rewards.sandbox import SandboxReward

    worker = SandboxReward(RewardConfig(timeout_s=30.0))
    try:
        _assert_no_reward_from_the_files(worker.score(_hacking_rollouts(*data_files)))
    finally:
        worker.close()


def test_pot_reward_hacking_finds_no_data_file_through_grpc(data_files, monkeypatch):
    from dsmath.config import RewardConfig
    from dsmath.rewards.sandbox import SandboxReward
    from dsmath.sandbox.service import serve

    srv = serve(host="127.0.0.1", port=0, token=TOKEN, workers=1)
    monkeypatch.setenv("DSMATH_SANDBOX_TOKEN", TOKEN)
    worker = SandboxReward(RewardConfig(timeout_s=30.0, sandbox_address=f"127.0.0.1:{srv.port}"))
    try:
        _assert_no_reward_from_the_files(worker.score(_hacking_rollouts(*data_files)))
        assert srv.pool.stats()["runs"] == 3
    finally:
        worker.close()
        srv.stop(0)

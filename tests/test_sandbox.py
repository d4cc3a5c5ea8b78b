"""Hostile programs against the real sandbox. After each: nothing of it left running or written on the host,
and the same pool keeps serving."""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import time
import uuid

import pytest

from dsmath.errors import UserError
from dsmath.sandbox import SandboxPool


def _procs_of(uids: list[int]) -> list[int]:
    """Live (non-zombie) host processes running as any of ``uids``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields["State"].split()[0] not in ("Z", "X") and int(fields["Uid"].split()[0]) in uids:
            found.append(int(name))
    return found


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool(size=2)
    yield p
    p.close()


def _clean_and_serving(pool: SandboxPool) -> None:
    assert _procs_of(pool.sandbox_uids) == [], "a sandboxed process outlived its run"
    r = pool.run("print(6 * 7)", timeout_s=5)
    assert (r.stdout, r.exit_code) == ("42\n", 0)


def run(pool: SandboxPool, code: str, **kw):
    return pool.run(textwrap.dedent(code), **kw)


def test_isolation_is_full_here(pool):
    # This machine runs us as root in a container where unshare works: the strong mode must be on.
    assert pool.namespaces and pool.net_isolated, pool.isolation_note
    assert pool.preloaded == ["sympy", "numpy"]
    assert len(pool.sandbox_uids) == 2 and all(uid >= 100000 for uid in pool.sandbox_uids)


def test_ordinary_programs(pool):
    r = run(pool, "import sympy\nx = sympy.Symbol('x')\nprint(sympy.solve(x**2 - 4, x))")
    assert (r.stdout, r.stderr, r.exit_code, r.signal, r.timed_out) == ("[-2, 2]\n", "", 0, None, False)
    assert r.ok and 0 < r.wall_s < 5
    assert run(pool, "raise SystemExit(3)").exit_code == 3
    bad = run(pool, "def f(:\n  pass")
    assert bad.exit_code == 1 and "SyntaxError" in bad.stderr and "forkserver" not in bad.stderr
    err = run(pool, "1/0")
    assert err.exit_code == 1 and err.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    ident = run(pool, "import os; print(os.getuid(), os.getpid(), os.getcwd())").stdout.split()
    # cwd: the run's fresh scratch — /tmp itself, or an empty /tmp/.run when the view also holds entries under /tmp
    # (a virtualenv checked out under /tmp, as a CI clone may be)
    assert int(ident[0]) in pool.sandbox_uids and ident[1] == "2" and ident[2] in ("/tmp", "/tmp/.run")


def test_infinite_loop_is_killed_at_the_deadline(pool):
    t = time.monotonic()
    r = run(pool, "while True: pass", timeout_s=1.0)
    assert r.timed_out and r.signal == signal.SIGKILL and r.exit_code is None and not r.ok
    assert 1.0 <= r.wall_s < 4.0 and time.monotonic() - t < 8
    _clean_and_serving(pool)


def test_cpu_burnt_inside_one_c_call(pool):
    r = run(pool, "x = 10**10**8\nprint('finished')", timeout_s=1.0)
    assert r.timed_out and r.stdout == "" and r.wall_s < 2.5
    _clean_and_serving(pool)


@pytest.mark.parametrize("bomb", [
    "x = bytearray(8 * 2**30)",
    "chunks = []\nwhile True: chunks.append(bytearray(50 * 2**20))",
    "import numpy as np\na = np.ones((60000, 60000))",
])
def test_memory_bombs(pool, bomb):
    r = run(pool, bomb, timeout_s=5, memory_mb=256)
    assert r.memory_exceeded and not r.timed_out and r.exit_code != 0, r
    _clean_and_serving(pool)


def test_fork_bomb_is_bounded_and_reaped(pool):
    r = run(pool, """
        import os, time
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
        print(n)
    """, timeout_s=5)
    assert r.exit_code == 0 and 1 <= int(r.stdout) < pool.limits.max_procs, r
    _clean_and_serving(pool)


def test_unbounded_fork_bomb_ends_at_deadline(pool):
    r = run(pool, "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", timeout_s=1.5)
    assert r.timed_out
    _clean_and_serving(pool)


def test_program_ignoring_sigterm_and_sigint(pool):
    r = run(pool, """
        import signal, time
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        while True:
            time.sleep(0.01)
    """, timeout_s=1.0)
    assert r.timed_out and r.signal == signal.SIGKILL
    _clean_and_serving(pool)


def test_double_forked_daemon_does_not_outlive_the_run(pool):
    t = time.monotonic()
    r = run(pool, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)  # the daemon, still holding our stdout
            os._exit(0)
        time.sleep(0.2)
        print("parent done")
    """, timeout_s=10)
    assert r.exit_code == 0 and r.stdout == "parent done\n" and not r.timed_out
    assert time.monotonic() - t < 5  # did not wait for the daemon
    _clean_and_serving(pool)


def test_host_files_and_caller_environment_stay_secret(pool, tmp_path, monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("DSMATH_TEST_SECRET", secret)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    r = run(pool, f"""
        import os, glob
        out = [repr(dict(os.environ))]
        for path in ["/etc/shadow", {str(secret_file)!r}, "/proc/1/environ"] + glob.glob("/proc/*/environ"):
            try:
                out.append(path + ":" + open(path, "rb").read().decode(errors="replace"))
            except OSError as e:
                out.append(path + ":" + type(e).__name__)
        out.append("pids:" + ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())))
        print("\\n".join(out))
    """)
    assert r.exit_code == 0, r.stderr
    assert secret not in r.stdout and "DSMATH_TEST_SECRET" not in r.stdout
    assert "/etc/shadow:FileNotFoundError" in r.stdout  # not in the sandbox's synthetic /etc at all
    # The test's tmp dir is hidden (the template's /tmp is its own) or, if visible, unreadable.
    assert any(f"{secret_file}:{err}" in r.stdout for err in ("FileNotFoundError", "PermissionError")), r.stdout
    assert "pids:1,2\n" in r.stdout + "\n"  # only its own PID namespace is visible
    _clean_and_serving(pool)


def test_no_writes_outside_scratch(pool):
    name = f"dsmath-sbx-escape-{uuid.uuid4().hex}"
    targets = [f"/var/tmp/{name}", f"/usr/lib/{name}", f"{os.getcwd()}/{name}", f"/{name}", f"/etc/{name}",
               f"/dev/{name}"]
    r = run(pool, f"""
        import os
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("x")
                print("WROTE", path)
            except OSError as e:
                print("refused", type(e).__name__)
        with open("mine.txt", "w") as f:
            f.write("scratch is writable")
        print(open("mine.txt").read())
        open("/tmp/{name}", "w").write("the run's own /tmp is its scratch")
    """)
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == len(targets), r.stdout
    assert "scratch is writable" in r.stdout and r.exit_code == 0, r.stderr
    for path in targets + [f"/tmp/{name}"]:
        assert not os.path.exists(path)
    # A fresh scratch per run: the next program does not see the previous one's file.
    assert run(pool, "import os; print(os.listdir('.'))").stdout == "[]\n"
    _clean_and_serving(pool)


def test_scratch_is_size_capped(pool):
    r = run(pool, "with open('big', 'wb') as f:\n    f.write(b'x' * (200 * 2**20))")
    assert r.exit_code == 1 and ("No space left" in r.stderr or "File too large" in r.stderr), r.stderr
    _clean_and_serving(pool)


def test_no_network_even_to_loopback(pool):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.0)
    port = listener.getsockname()[1]
    try:
        r = run(pool, f"""
            import socket
            results = []
            for attempt in ("tcp", "udp"):
                try:
                    if attempt == "tcp":
                        s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
                        s.sendall(b"leak")
                    else:
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"leak", ("127.0.0.1", {port}))
                    results.append(attempt + ":connected")
                except OSError as e:
                    results.append(attempt + ":" + type(e).__name__)
            print(" ".join(results))
        """)
        assert "connected" not in r.stdout and r.stdout.startswith("tcp:"), r
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's loopback
    finally:
        listener.close()
    _clean_and_serving(pool)


def test_huge_output_is_cut_at_the_cap_without_deadlock(pool):
    r = run(pool, "import sys\nwhile True:\n    print('x' * 1000)\n    sys.stderr.write('e' * 1000)",
            timeout_s=10, max_output_bytes=10_000)
    assert r.output_truncated and len(r.stdout) == 10_000 and len(r.stderr) <= 10_000
    assert not r.timed_out and r.wall_s < 5  # EPIPE ends it long before the deadline
    big = run(pool, "print('y' * 3_000_000)", max_output_bytes=100)
    assert big.output_truncated and big.stdout == "y" * 100
    _clean_and_serving(pool)


@pytest.mark.parametrize("crash, sig", [
    ("import os; os.abort()", signal.SIGABRT),
    ("import ctypes; ctypes.string_at(0)", signal.SIGSEGV),
    ("import faulthandler; faulthandler._read_null()", signal.SIGSEGV),
])
def test_interpreter_crashes(pool, crash, sig):
    r = run(pool, crash)
    assert r.signal == sig and r.exit_code is None and not r.timed_out and not r.ok, r
    _clean_and_serving(pool)


def test_result_cannot_be_forged_from_inside(pool):
    r = run(pool, """
        import json, os, signal, sys
        fake = json.dumps({"status": 0, "timed_out": False}).encode()
        wrote = 0
        for fd in range(3, 256):
            try:
                os.write(fd, fake)
                wrote += 1
            except OSError:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            try:
                os.kill(1, sig)  # PID 1 is the sandbox's init, which reports our status
            except OSError:
                pass
        print("wrote", wrote)
        sys.stdout.flush()
        os._exit(7)
    """)
    assert r.stdout == "wrote 0\n" and r.exit_code == 7
    _clean_and_serving(pool)


def test_run_many_and_stats():
    with SandboxPool(size=2) as p:
        codes = [f"print({i} ** 2)" for i in range(6)] + ["while True: pass"]
        results = p.run_many(codes, timeout_s=1.0)
        assert [r.stdout for r in results[:6]] == [f"{i * i}\n" for i in range(6)]
        assert results[6].timed_out
        stats = p.stats()
        assert stats["runs"] == 7 and stats["timeouts"] == 1 and stats["queue_depth"] == 0
        assert stats["busy"] == 0 and stats["respawns"] == 0 and stats["errors"] == 0


def test_bad_limits_are_user_errors(pool):
    with pytest.raises(UserError, match="timeout_s"):
        pool.run("print(1)", timeout_s=0)
    with pytest.raises(UserError, match="memory_mb"):
        pool.run("print(1)", memory_mb=-5)
    with pytest.raises(UserError, match="str"):
        pool.run(b"print(1)")  # type: ignore[arg-type]


def test_module_level_run_uses_a_lazy_default_pool():
    import dsmath.sandbox.pool as pool_mod

    r = pool_mod.run("import numpy as np; print(int(np.arange(5).sum()))", timeout_s=5)
    assert r.stdout == "10\n" and pool_mod._default_pool is not None


def test_fallback_mode_still_kills_daemons_and_blocks_sockets():
    # The mode used where namespaces are unavailable, forced here: session + uid sweep + audit hook.
    with SandboxPool(size=1, isolation="process", preload=()) as p:
        assert not p.namespaces
        r = p.run(textwrap.dedent("""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(120)
                os._exit(0)
            time.sleep(0.2)
            import socket
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))
            except PermissionError as e:
                print("blocked:", e)
        """), timeout_s=10)
        assert r.exit_code == 0 and r.stdout.startswith("blocked:"), r
        assert _procs_of(p.sandbox_uids) == []
        t = p.run("while True: pass", timeout_s=0.5)
        assert t.timed_out and _procs_of(p.sandbox_uids) == []


def test_a_template_killed_from_outside_is_replaced():
    with SandboxPool(size=1, preload=()) as p:
        victim = p.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        p._all[0].proc.wait(timeout=10)  # reaped by the pool's Popen, so poll() sees it dead
        r = p.run("print('fresh')")
        assert r.stdout == "fresh\n" and p.worker_pids() != [victim] and p.stats()["respawns"] == 1


def test_runner_for_picks_local_or_remote():
    from dsmath.sandbox import runner_for
    from dsmath.sandbox.pool import default_pool
    from dsmath.sandbox.service import SandboxClient

    assert runner_for("") is default_pool()
    client = runner_for("127.0.0.1:1", token="t")
    assert isinstance(client, SandboxClient)
    client.close()


def test_ordinary_process_features_still_work(pool):
    name = f"dsmath-shm-{uuid.uuid4().hex}"
    r = run(pool, f"""
        import multiprocessing as mp, os, subprocess, sys
        def square(x):
            return x * x
        open("/dev/null", "w").write("x")
        print(subprocess.run([sys.executable, "-c", "print('hi')"], capture_output=True, text=True).stdout.strip())
        with mp.Pool(2) as workers:
            print(workers.map(square, range(4)))
        open("/dev/shm/{name}", "w").write("1")
        print(os.listdir("/dev/shm"))
    """, timeout_s=10)
    assert r.stdout == f"hi\n[0, 1, 4, 9]\n['{name}']\n", r.stderr
    assert not os.path.exists(f"/dev/shm/{name}")  # a private /dev/shm, gone with the run
    _clean_and_serving(pool)


def test_queue_depth_is_reported_while_callers_wait():
    import threading

    with SandboxPool(size=1, preload=()) as p:
        results = []
        threads = [threading.Thread(target=lambda: results.append(p.run("import time; time.sleep(0.5); print(1)")))
                   for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while p.stats()["queue_depth"] != 2:  # one running, two waiting for the only slot
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert p.stats()["busy"] == 1
        for t in threads:
            t.join()
        assert [r.stdout for r in results] == ["1\n"] * 3 and p.stats()["queue_depth"] == 0

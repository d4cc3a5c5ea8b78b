"""Quiet by default, and a local Ray cluster ends with the command that started it.

Two real ``dsmath train`` runs of the tiny loop (real Ray, vLLM, DeepSpeed) as subprocesses:

- quiet (the default), to its end: the terminal holds dsmath's lines and its progress bar, no vLLM or Ray line; the
  libraries' lines are in ``RUN_DIR/logs/`` (Ray's in ``driver.log``, vLLM's in the generator's ``worker-PID.log``);
  every process the run started (Ray's GCS, raylet, agents, actors; recorded while it ran) is gone after it ends;
- ``--verbose``, SIGKILLed once vLLM's INFO lines are on the terminal: they are (the flag brings them back), and
  every process it started — Ray's agents included, which outlive a killed driver on their own — is gone soon after.

Processes are recorded as the driver's descendants (pid and start time) while it runs: other tests' Ray clusters on
this machine are never looked at, let alone signalled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tiny_loop import TINY_LOOP

DSMATH = Path(sys.executable).parent / "dsmath"
REPO = Path(__file__).resolve().parents[1]
# library lines as they reach a terminal: a log level word, or Ray's "(Actor pid=N)" prefix for a worker's output
LIBRARY_LINE = re.compile(r"\b(INFO|WARNING|DEBUG)\b|\(\w+ pid=\d+\)")
VLLM_INFO = re.compile(r"\(Generator pid=\d+\).* INFO .*\[[\w.]+\.py:\d+\]")
GONE_WITHIN_S = 30.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MASTER_ADDR", "MASTER_PORT", "RANK",
                                                             "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "DSMATH_OVERRIDES": ""}


class Driver:
    """``dsmath ARGS`` in a subprocess: its output lines (read as they come) and its descendants, recorded."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(DSMATH), *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self.started: dict[int, tuple[float, str]] = {}  # pid -> (start time, command line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def record(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:  # the latest command line: Ray renames its processes (ray::DashboardAgent) once they run
                self.started[child.pid] = (child.create_time(), " ".join(child.cmdline()))
            except psutil.Error:
                continue

    def run_until(self, done, timeout_s: float) -> None:
        """Record descendants until ``done()`` or the driver ends (the test fails after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not done() and self.proc.poll() is None:
            assert time.monotonic() < deadline, "\n".join(self.lines[-40:])
            self.record()
            time.sleep(0.3)  # polling another process's state; nothing here to wait on

    def output(self) -> list[str]:
        self._reader.join(timeout=30)
        return list(self.lines)

    def survivors(self) -> list[str]:
        """Recorded processes still running (same pid and start time), after waiting up to GONE_WITHIN_S."""
        deadline = time.monotonic() + GONE_WITHIN_S
        while True:
            left = []
            for pid, (born, cmd) in self.started.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == born and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"{pid} {cmd[:120]}")
                except psutil.Error:
                    continue
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


def _train_args(run: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["train", *TINY_LOOP, "eval_size=8", f"bootstrap.data_dir={cache_dir}", f"run_dir={run}", *extra]


# Each kind of process, by its command line: Ray's agents rename themselves (ray::DashboardAgent) only once they
# have started, which on a loaded machine can be after a short run ended, so their scripts count too.
KINDS = {"gcs_server": ("gcs_server",), "raylet": ("raylet",),
         "ray::DashboardAgent": ("ray::DashboardAgent", "ray/dashboard/agent.py"),
         "ray::RuntimeEnvAgent": ("ray::RuntimeEnvAgent", "ray/_private/runtime_env/agent/main.py"),
         "ray::Generator": ("ray::Generator",), "ray::LearnerRank": ("ray::LearnerRank",),
         "dsmath.reaper": ("dsmath.reaper",)}


def _kinds(started: dict[int, tuple[float, str]]) -> set[str]:
    return {kind for kind, marks in KINDS.items() for _, cmd in started.values() if any(m in cmd for m in marks)}


@pytest.mark.slow
def test_quiet_run_keeps_library_lines_in_its_log_folder_and_leaves_no_process(tmp_path, cache_dir):
    run = tmp_path / "run"
    driver = Driver(*_train_args(run, cache_dir, "steps=1"))
    driver.run_until(lambda: False, timeout_s=900)
    lines = driver.output()
    assert driver.proc.wait() == 0, "\n".join(lines[-40:])
    text = "\n".join(lines)
    assert "held-out greedy accuracy on 8 problems" in text
    assert f"[dsmath] library logs (vLLM, Ray, transformers, DeepSpeed, ...): {run}/logs/driver.log" in text
    assert "grpo:" in text  # our progress bar stays
    library = [line for line in lines if LIBRARY_LINE.search(line)]
    assert library == [], library
    ours = ("[dsmath] ", "held-out greedy accuracy", "grpo:", "bootstrap sft:")  # lines and our progress bars
    foreign = [line for line in lines if line.strip() and not line.lstrip("\r").startswith(ours)]
    assert len(foreign) <= 2, foreign  # a C++ library's own stderr line may pass (nothing can catch it)

    driver_log = (run / "logs" / "driver.log").read_text()
    assert re.search(r" INFO ray[\w.]*: Started a local Ray instance", driver_log), driver_log[:2000]
    workers = {p.name: p.read_text(errors="replace") for p in (run / "logs").glob("worker-*.log")}
    vllm_info = [line for t in workers.values() for line in t.splitlines() if re.search(r" INFO vllm[\w.]*: ", line)]
    assert len(vllm_info) >= 5, {k: v[:500] for k, v in workers.items()}

    assert {"raylet", "ray::DashboardAgent", "ray::Generator", "dsmath.reaper"} <= _kinds(driver.started)
    assert driver.survivors() == []


@pytest.mark.slow
def test_verbose_prints_library_lines_and_a_killed_driver_leaves_no_process(tmp_path, cache_dir):
    run = tmp_path / "run"
    driver = Driver(*_train_args(run, cache_dir, "steps=50", "--verbose", "--no-progress"))
    # vLLM's INFO lines on the terminal (three: what is asserted below), and Ray's agents running: then the driver
    # dies without a word
    driver.run_until(lambda: sum(bool(VLLM_INFO.search(line)) for line in driver.lines) >= 3
                     and "ray::DashboardAgent" in _kinds(driver.started), timeout_s=900)
    assert driver.proc.poll() is None, "\n".join(driver.lines[-40:])
    driver.record()
    driver.proc.send_signal(signal.SIGKILL)
    driver.proc.wait(timeout=60)
    lines = driver.output()
    assert sum(bool(VLLM_INFO.search(line)) for line in lines) >= 3, lines[-40:]
    assert any("Started a local Ray instance" in line for line in lines)
    assert not (run / "logs").exists()  # verbose: nothing is diverted

    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= _kinds(driver.started)
    assert driver.survivors() == []


# ------------------------------------------------------------------------------------ the parts, in this process


def test_quiet_routes_library_records_to_the_file_and_keeps_errors_and_our_warnings_on_the_terminal(tmp_path, capsys):
    import logging
    import warnings

    from dsmath.logs import log_to, quiet

    lib = logging.getLogger("vllm.engine.test_quiet")  # made before: routed too
    path = tmp_path / "logs" / "driver.log"
    with quiet():
        log_to(path)
        assert not path.exists()  # opened at its first line: a command that refuses first leaves no folder
        lib.info("engine ready")
        logging.getLogger("ray.data.test_quiet").warning("dataset slow")
        lib.error("engine died")
        warnings.warn_explicit("ours: check the config", UserWarning, str(REPO / "wiring" / "x.py"), 1)
        warnings.warn_explicit("theirs: deprecated", FutureWarning, "/site-packages/lib/y.py", 2)
    out, err = capsys.readouterr()
    text = path.read_text()
    assert " INFO vllm.engine.test_quiet: engine ready" in text and " WARNING ray.data.test_quiet: dataset slow" in text
    assert "engine died" in text and "theirs: deprecated" in text
    assert out.count("[dsmath] library logs") == 1 and str(path) in out
    assert err.splitlines() == ["ERROR vllm.engine.test_quiet: engine died", f"{REPO}/wiring/x.py:1: UserWarning: "
                                "ours: check the config"]
    # undone: a record reaches the logger's own handlers again, nothing goes to the file
    handler = logging.Handler()
    seen = []
    handler.emit = seen.append
    lib.addHandler(handler)
    lib.warning("after")
    lib.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["after"] and "after" not in path.read_text()


def test_a_command_without_a_folder_writes_a_temporary_log_only_for_a_warning(tmp_path, capsys, monkeypatch):
    import logging

    from dsmath.logs import quiet

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with quiet():
        logging.getLogger("transformers.test_quiet").info("chatter")
    assert list(tmp_path.glob("dsmath-*.log")) == [] and capsys.readouterr().out == ""
    with quiet():
        logging.getLogger("transformers.test_quiet").warning("weights missing")
    (log,) = tmp_path.glob("dsmath-*.log")
    assert "weights missing" in log.read_text() and str(log) in capsys.readouterr().out


def test_reaper_ends_what_a_killed_process_started_and_nothing_else(tmp_path):
    """A parent starts the watchdog and a child in a session of its own (as Ray's agents are out of reach of a
    process-group kill); SIGKILL the parent: the child is ended, an unrelated process is not."""
    script = ("import subprocess, sys, time\n"
              "from dsmath.reaper import start_reaper\n"
              "start_reaper(interval_s=0.1)\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
              "print(c.pid, flush=True)\n"
              "time.sleep(120)\n")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    parent = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)  # the watchdog records the child (every 0.1 s)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        child.wait(timeout=GONE_WITHIN_S)  # psutil.TimeoutExpired fails the test
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()

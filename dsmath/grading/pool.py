"""Hang-proof grading: fast path in the caller, sympy in killable worker processes.

``GradingPool`` is the reusable piece (a Ray reward worker holds one and may call it from any thread):

* the fast path (extraction, normalisation, exact numbers, strings) runs in the calling thread — no sympy,
  no IPC — and decides most pairs;
* undecided pairs go to one of ``workers`` processes, each driven by its own manager thread that waits on the
  pipe with a wall-clock deadline and SIGKILLs the process when it passes (``signal.alarm`` would only work in
  the main thread); the timeout is a verdict of its own (``timed_out=True``), counted in ``stats()``;
* a worker that dies (killed from outside, out of memory) or fails to start is replaced and its job retried
  on a fresh worker, up to ``ATTEMPTS`` workers per job; every death and failed start is counted
  (``worker_deaths``, ``start_failures``), idle deaths included;
* infrastructure failures are never verdicts: a job no worker could answer comes back as a *failed*
  verdict (``Verdict.failed``, ``correct=None``, ``path="failed"``, counted in ``failures``) that is never
  cached, so the same pair is graded afresh next time; ``math_equal`` raises ``GradingFailure`` instead;
* symbolic results are cached by (normalised pred, normalised gold), LRU-bounded; identical in-flight pairs
  share one job.

Workers are plain ``python -m dsmath.grading.worker`` subprocesses (nothing of the caller is inherited:
safe from threads, Ray actors and unguarded scripts), started lazily, replaced right after a kill, and held
to an address-space limit (``memory_mb``).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

from dsmath.grading.compare import compare, fast_scalar, kind_of
from dsmath.grading.extract import extract_answer, gold_is_letter, last_boxed
from dsmath.grading.normalize import MAX_ANSWER_CHARS, parse_structure, prepare

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Verdict:
    """One grading, explained. ``path`` says who decided: fast | symbolic | cache | none | failed.

    ``failed``: the grader itself failed (no worker could answer); then ``correct`` is None, not False: the
    answer was not judged, and callers must re-grade or drop the sample, never score it as wrong."""

    correct: bool | None
    extracted: str | None  # the answer as the completion states it
    pred: str | None  # normalised prediction
    gold: str  # normalised gold
    kind: str  # answer kind of the gold: number, expression, interval, tuple, set, matrix, ...
    reason: str
    timed_out: bool = False
    seconds: float = 0.0
    path: str = "fast"
    failed: bool = False

    def explain(self) -> str:
        mark = "GRADER FAILED" if self.failed else (
            "CORRECT" if self.correct else ("TIMEOUT" if self.timed_out else "WRONG"))
        return (f"{mark}: {self.reason}\n  extracted: {self.extracted!r}\n  pred (normalised): {self.pred!r}\n"
                f"  gold (normalised): {self.gold!r}\n  kind: {self.kind}  path: {self.path}  time: {self.seconds * 1e3:.2f} ms")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ worker process

_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core box can take a few seconds
ATTEMPTS = 3  # fresh workers tried per job before it is reported as a grader failure


class _WorkerDied(Exception):
    pass


class GradingFailure(RuntimeError):
    """The grader could not judge a pair (its workers kept dying or failing to start): not a verdict."""


def _worker_command(memory_mb: int) -> list[str]:
    """The worker's argv (a seam for tests that need a worker which fails to start)."""
    return [sys.executable, "-m", "dsmath.grading.worker", str(memory_mb)]


def _read_frame(fd: int, deadline: float) -> object | None:
    """One frame from ``fd``; None when the deadline passes first; _WorkerDied on EOF."""
    buf = b""
    need = 4
    length = None
    while True:
        while len(buf) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, max(need - len(buf), 65536) if length is None else need - len(buf))
            if not chunk:
                raise _WorkerDied("worker closed its output")
            buf += chunk
        if length is None:
            length = struct.unpack(">I", buf[:4])[0]
            buf = buf[4:]
            need = length
            continue
        return json.loads(buf[:length])


class _Worker:
    """One worker subprocess and the manager thread that feeds it."""

    def __init__(self, pool: "GradingPool", index: int):
        self.pool = pool
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._loop, name=f"grading-worker-{index}", daemon=True)

    def start_process(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        # the worker imports dsmath from wherever this process did (an uninstalled checkout, a Ray working_dir)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(_worker_command(self.pool.memory_mb), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        except OSError as exc:
            self.pool._count("start_failures")
            raise _WorkerDied(f"grading worker could not be started: {exc}") from exc
        self.proc = proc
        self.pool._started.add(self.index)
        try:
            hello = _read_frame(proc.stdout.fileno(), time.monotonic() + _STARTUP_TIMEOUT_S)
        except (_WorkerDied, OSError, ValueError):
            hello = None
        if not (isinstance(hello, dict) and hello.get("ready")):
            self.pool._count("start_failures")
            try:  # closed its output: it is exiting; let stop_process see (and count) the death
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            self.stop_process(kill=True)
            raise _WorkerDied("grading worker failed to start (python -m dsmath.grading.worker)")

    def stop_process(self, *, kill: bool) -> None:
        """Stop the worker; a process that had already exited without being asked is counted as a death."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            self.pool._count("worker_deaths")
        if kill:
            proc.kill()
        try:
            proc.stdin.close()  # EOF: a healthy worker exits by itself
        except OSError:
            pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _send(self, job: tuple[str, str]) -> None:
        body = json.dumps(list(job)).encode("utf-8")
        self.proc.stdin.write(struct.pack(">I", len(body)) + body)
        self.proc.stdin.flush()

    def _run_job(self, job: tuple[str, str], timeout_s: float) -> tuple[bool | None, str, bool]:
        """(correct, reason, timed_out); correct is None when ``ATTEMPTS`` fresh workers all failed."""
        why = ""
        for _ in range(ATTEMPTS):
            try:
                if self.proc is None or self.proc.poll() is not None:
                    if self.proc is not None:  # found dead between jobs (killed from outside)
                        self.stop_process(kill=True)
                        self.pool._count("worker_restarts")
                    self.start_process()
                self._send(job)
                result = _read_frame(self.proc.stdout.fileno(), time.monotonic() + timeout_s)
            except (_WorkerDied, OSError, ValueError) as exc:
                # died under us, or would not start: replace it and retry on a fresh one
                why = str(exc) or type(exc).__name__
                if self.proc is not None:
                    try:  # it is dying or dead: let stop_process see it as a death
                        self.proc.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        pass  # alive but broken (garbled reply): killed below, not a death
                self.stop_process(kill=True)
                self.pool._count("worker_restarts")
                continue
            if result is None:
                self.stop_process(kill=True)  # deadline passed: SIGKILL; a fresh worker starts below
                self.pool._count("timeouts")
                self.pool._count("worker_restarts")
                return False, f"sympy did not finish within {timeout_s:g} s (worker killed)", True
            correct, reason = result
            return bool(correct), str(reason), False
        self.pool._count("failures")
        return None, f"grading failed: no worker answered after {ATTEMPTS} attempts ({why})", False

    def _check_idle(self) -> None:
        """Between jobs: a worker that died while idle (or while starting) is counted and replaced now."""
        if self.pool._closed:
            return
        if self.proc is not None and self.proc.poll() is not None:
            self.stop_process(kill=True)
            self.pool._count("worker_restarts")
        if self.proc is None and self.index in self.pool._started:
            try:
                self.start_process()
            except Exception:  # noqa: BLE001 - retried by the next job
                pass

    def _loop(self) -> None:
        jobs = self.pool._jobs
        while True:
            try:
                item = jobs.get(timeout=1.0)
            except queue.Empty:
                self._check_idle()
                continue
            if item is None:
                break
            future, job, timeout_s = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = self._run_job(job, timeout_s)
            except Exception as exc:  # noqa: BLE001 - never leave a caller waiting; never a verdict
                self.pool._count("failures")
                result = (None, f"grading failed: {type(exc).__name__}: {exc}", False)
            future.set_result(result)
            if self.proc is None and not self.pool._closed:
                try:  # replace a killed worker now, off the next caller's clock
                    self.start_process()
                except Exception:  # noqa: BLE001 - retried on the next job
                    pass
        self.stop_process(kill=False)


# ------------------------------------------------------------------ the pool


class GradingPool:
    """Grades (completion, gold) pairs; thread-safe; use as a context manager or call ``close()``.

    Guaranteed: every call returns, within roughly ``timeout_s`` per symbolic pair plus queueing (times
    ``ATTEMPTS`` when workers die); a timeout is a verdict with its reason; a grader failure is a *failed*
    verdict (``correct=None``), never cached; ``close()`` leaves no worker processes behind.
    """

    def __init__(self, workers: int = 2, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = 2048,
                 cache_size: int = 100_000, mode: str = "strict"):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.mode = mode
        self.cache_size = cache_size
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], tuple[bool, str, bool]] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future] = {}
        self._stats = {"graded": 0, "fast": 0, "symbolic": 0, "cache_hits": 0, "timeouts": 0,
                       "worker_restarts": 0, "worker_deaths": 0, "start_failures": 0, "failures": 0,
                       "no_answer": 0}
        self._closed = False
        self._started: set[int] = set()  # workers started at least once (lazy start stays lazy)
        self._workers = [_Worker(self, i) for i in range(workers)]
        for w in self._workers:
            w.thread.start()

    # -- bookkeeping
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + n

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
            out["cache_size"] = len(self._cache)
        return out

    def worker_pids(self) -> list[int]:
        """Live worker process ids (for tests and monitoring)."""
        pids = []
        for w in self._workers:
            proc = w.proc
            if proc is not None and proc.poll() is None:
                pids.append(proc.pid)
        return pids

    # -- symbolic comparison with a deadline
    def _submit(self, key: tuple[str, str], job: tuple[str, str], timeout_s: float) -> tuple[Future, bool]:
        """(future of (correct, reason, timed_out), from_cache). ``key``: the normalised pair; ``job``: the
        prepared (structure-keeping) pair the worker re-parses."""
        with self._lock:
            if self._closed:
                raise RuntimeError("GradingPool is closed")
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._stats["cache_hits"] += 1
                done: Future = Future()
                done.set_result(hit)
                return done, True
            inflight = self._inflight.get(key)
            if inflight is not None:
                self._stats["cache_hits"] += 1
                return inflight, True
            future: Future = Future()
            self._inflight[key] = future
            self._stats["symbolic"] += 1

        def remember(f: Future) -> None:
            with self._lock:
                self._inflight.pop(key, None)
                if not f.cancelled() and f.exception() is None and f.result()[0] is not None:
                    self._cache[key] = f.result()  # grader failures are never cached
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)

        future.add_done_callback(remember)
        self._jobs.put((future, job, timeout_s))
        return future, False

    def symbolic_equal(self, pred_prepared: str, gold_prepared: str, *,
                       timeout_s: float | None = None) -> tuple[bool | None, str, bool]:
        """(correct, reason, timed_out) of two ``prepare``-d answers, computed in a worker with a deadline;
        correct is None when the grader failed (see ``Verdict.failed``)."""
        key = (parse_structure(pred_prepared).text, parse_structure(gold_prepared).text)
        future, _ = self._submit(key, (pred_prepared, gold_prepared), self.timeout_s if timeout_s is None else timeout_s)
        return future.result()

    # -- grading
    def _fast(self, completion: str, gold: str, mode: str, t0: float):
        """A finished Verdict, or (partial fields) when sympy must decide."""
        gold_text = gold
        if "\\boxed" in gold or "\\fbox" in gold:
            gold_text = last_boxed(gold) or gold
        elif "####" in gold:
            gold_text = gold.rsplit("####", 1)[1]
        gold_prepared = prepare(gold_text) if len(gold_text) <= MAX_ANSWER_CHARS else gold_text
        gold_node = parse_structure(gold_prepared)
        kind = "choice" if gold_is_letter(gold_prepared) else kind_of(gold_node)
        extracted = extract_answer(completion, mode=mode, gold=gold_prepared if kind == "choice" else gold_text)
        if extracted is None:
            self._count("no_answer")
            why = "no stated answer (strict mode needs \\boxed{}, 'the answer is' or ####)" if mode == "strict" else "no answer found"
            return Verdict(False, None, None, gold_node.text, kind, why, seconds=time.perf_counter() - t0, path="none")
        if len(extracted) > MAX_ANSWER_CHARS:
            ok = extracted.strip() == gold_text.strip()
            return Verdict(ok, extracted[:200] + "…", None, gold_node.text, kind,
                           f"answer longer than {MAX_ANSWER_CHARS} characters: only an exact match counts",
                           seconds=time.perf_counter() - t0)
        pred_prepared = prepare(extracted)
        if kind == "choice":
            letter = gold_prepared.strip().strip("()").strip(".").strip()
            ok = pred_prepared.strip().strip("()").strip() == letter
            return Verdict(ok, extracted, pred_prepared, letter, kind, "same choice" if ok else "different choice",
                           seconds=time.perf_counter() - t0)
        pred_node = parse_structure(pred_prepared)
        result = compare(pred_node, gold_node, fast_scalar)
        if result is not None:
            self._count("fast")
            reason = ("equal after normalisation" if result else "different after normalisation")
            return Verdict(result, extracted, pred_node.text, gold_node.text, kind, reason,
                           seconds=time.perf_counter() - t0)
        return extracted, pred_prepared, gold_prepared, pred_node.text, gold_node.text, kind

    def grade_many(self, pairs: Iterable[tuple[str, str]], *, mode: str | None = None,
                   timeout_s: float | None = None, progress: Callable[[int], None] | None = None) -> list[Verdict]:
        """One Verdict per (completion, gold) pair, in order. ``progress(n)`` is called as pairs finish."""
        mode = mode or self.mode
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        slots: list = []
        for completion, gold in pairs:
            t0 = time.perf_counter()
            out = self._fast(str(completion), str(gold), mode, t0)
            if isinstance(out, Verdict):
                slots.append(out)
                if progress:
                    progress(1)
                continue
            future, cached = self._submit((out[3], out[4]), (out[1], out[2]), timeout_s)
            slots.append((future, cached, out, t0))
        verdicts: list[Verdict] = []
        for slot in slots:
            if isinstance(slot, Verdict):
                verdicts.append(slot)
                continue
            future, cached, (extracted, _, _, pred_norm, gold_norm, kind), t0 = slot
            correct, reason, timed_out = future.result()
            failed = correct is None
            path = "failed" if failed else ("cache" if cached else "symbolic")
            verdicts.append(Verdict(None if failed else bool(correct), extracted, pred_norm, gold_norm, kind, reason,
                                    timed_out=timed_out, seconds=time.perf_counter() - t0, path=path, failed=failed))
            if progress:
                progress(1)
        self._count("graded", len(verdicts))
        return verdicts

    def grade(self, completion: str, gold: str, *, mode: str | None = None, timeout_s: float | None = None) -> Verdict:
        return self.grade_many([(completion, gold)], mode=mode, timeout_s=timeout_s)[0]

    # -- lifecycle
    def close(self) -> None:
        """Stop the workers (graceful, then SIGKILL); idempotent. Queued jobs still finish first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        for w in self._workers:
            w.thread.join()

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; close() is the contract
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------ module-level conveniences

_default_lock = threading.Lock()
_default: GradingPool | None = None


def default_pool() -> GradingPool:
    """A process-wide pool (one worker) used by ``grade``/``math_equal`` when no pool is given."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = GradingPool(workers=1)
            atexit.register(_default.close)
        return _default


def grade(completion: str, gold: str, *, mode: str = "strict", timeout_s: float = DEFAULT_TIMEOUT_S,
          pool: GradingPool | None = None) -> Verdict:
    """Grade one completion against its gold answer; never hangs (sympy runs under a deadline)."""
    return (pool or default_pool()).grade(completion, gold, mode=mode, timeout_s=timeout_s)


def grade_batch(pairs: Sequence[tuple[str, str]], *, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
                mode: str = "strict", progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """Grade many pairs with a fresh pool of ``workers`` processes, closed before returning."""
    with GradingPool(workers, timeout_s=timeout_s, mode=mode) as pool:
        return pool.grade_many(pairs, progress=progress)


def math_equal(pred: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, pool: GradingPool | None = None) -> bool:
    """Are two final answers mathematically equal? Fast path in-process; sympy under a deadline (a timeout
    is False here — use ``grade`` to see it). Raises GradingFailure when the grader itself failed."""
    p, g = prepare(pred), prepare(gold)
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
        return p == g
    result = compare(parse_structure(p), parse_structure(g), fast_scalar)
    if result is not None:
        return result
    correct, reason, _ = (pool or default_pool()).symbolic_equal(p, g, timeout_s=timeout_s)
    if correct is None:
        raise GradingFailure(reason)
    return correct

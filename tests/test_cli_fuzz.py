"""Damaged files in, one clear line out: every command that reads a user file, run as a real ``dsmath``
subprocess on the same set of damaged inputs, ends with exit 0 (what could be skipped counted and said) or
exit 2 and exactly one line on stderr — never a traceback, never exit 1.

Commands are chosen to fail or finish in a second: no model is loaded (``eval`` and ``sft`` read their data
before they look at ``--model``, which here does not exist), ``corpus run`` reads its inputs before it writes
anything. Runs go two at a time; the whole module takes well under a minute.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

DSMATH = Path(sys.executable).parent / "dsmath"
REPO = Path(__file__).resolve().parents[1]
# the subprocesses run this checkout's code, whatever checkout the venv's editable install points at
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "PYTHONWARNINGS": "ignore", "DSMATH_OVERRIDES": "", "DSMATH_STATUS_TOKEN": ""}
N_RECORDS = 40


def _good_bytes() -> bytes:
    rows = []
    for i in range(N_RECORDS):
        rows.append(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i), "pred": str(2 * i),
                                "gold": str(2 * i), "prompt": f"Add {i} and {i}.", "response": f"\\boxed{{{2 * i}}}",
                                "url": f"https://example.org/page/{i}", "text": f"page {i} about sums " * 8}))
    return ("\n".join(rows) + "\n").encode()


def _mid_line(data: bytes, fraction: float) -> int:
    """An offset near ``fraction`` of ``data`` that cuts a line (never right after a newline)."""
    off = int(len(data) * fraction)
    while data[off - 1 : off] == b"\n" or data[off : off + 1] == b"\n":
        off += 1
    return off


def _flip_high_bits(data: bytes, fractions: tuple[float, ...]) -> bytes:
    b = bytearray(data)
    for f in fractions:
        b[int(len(b) * f)] ^= 0x80  # ASCII byte -> not UTF-8; inside a deflate stream -> corrupt or CRC error
    return bytes(b)


@dataclass(frozen=True)
class Damaged:
    name: str  # also the file name: its suffix is what the readers see
    content: bytes | None  # None: a directory
    certainly_bad: bool = True  # every reader must notice (False: empty, still a valid file)
    damage_in_name: bool = False  # the damage is the .gz name: under a fixed file name the content reads fine


def damaged_inputs() -> list[Damaged]:
    good = _good_bytes()
    gz = gzip.compress(good, mtime=0)
    latin = good.decode().replace("sums", "sümé").encode("latin-1")
    return [
        *(Damaged(f"trunc{int(f * 100)}.jsonl", good[: _mid_line(good, f)]) for f in (0.02, 0.5)),
        *(Damaged(f"trunc{int(f * 100)}.jsonl.gz", gz[: int(len(gz) * f)]) for f in (0.1, 0.6)),
        Damaged("bitflip.jsonl", _flip_high_bits(good, (0.3, 0.7))),
        Damaged("bitflip.jsonl.gz", _flip_high_bits(gz, (0.5,))),
        Damaged("latin1.jsonl", latin),
        Damaged("utf16.jsonl", good.decode().encode("utf-16")),
        Damaged("plain_named_gz.jsonl.gz", good, damage_in_name=True),
        Damaged("bz2_named_gz.jsonl.gz", bz2.compress(good), damage_in_name=True),
        Damaged("empty.jsonl", b"", certainly_bad=False),
        Damaged("directory.jsonl", None),
        Damaged("huge_line.jsonl", b'{"question": "' + b"7" * 10_000_000 + b"\n"),
    ]


def _place(d: Damaged, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if d.content is None:
        path.mkdir()
    else:
        path.write_bytes(d.content)
    return path


@dataclass(frozen=True)
class Case:
    command: str  # an id: which reader
    skip_bad: bool
    names_file: bool  # with a certainly bad input and no skip, the error line names the damaged file
    fixed_name: bool = False  # the input is placed under the name the command looks for, not the damaged one


NOMODEL = "no-such-model-folder"


def _argv(case: Case, d: Damaged, work: Path) -> tuple[list[str], Path]:
    """The dsmath argv for ``case`` on the damaged input placed under ``work``, and that input's path."""
    skip = ["--skip-bad"] if case.skip_bad else []
    if case.command == "grade":
        f = _place(d, work / d.name)
        return ["grade", "--file", str(f), "--workers", "1", *skip], f
    if case.command == "eval":
        f = _place(d, work / d.name)
        return ["eval", "--model", str(work / NOMODEL), "--data", str(f), "--k", "0", *skip], f
    if case.command == "sft":
        f = _place(d, work / d.name)
        return ["sft", "--data", str(f), "--model", str(work / NOMODEL), "--out", str(work / "sft_out"), *skip], f
    if case.command == "corpus-decontam":
        f = _place(d, work / d.name)
        return ["corpus", "decontam", str(f), "--out", str(work / "clean.jsonl")], f
    if case.command == "corpus-run":
        f = _place(d, work / d.name)
        return ["corpus", "run", f"input.paths=[{f}]", "input.demo_data_dir=", "runner.progress=false",
                "--out-dir", str(work / "corpus_out")], f
    if case.command == "corpus-build-index":
        f = _place(d, work / "bench" / "gsm8k_test.jsonl")
        return ["corpus", "build-index", str(work / "bench"), "--out", str(work / "index.npz")], f
    if case.command.startswith("status-"):
        name = {"status-metrics": "metrics.jsonl", "status-json": "status.json",
                "status-address": "status_address"}[case.command]
        f = _place(d, work / "run" / name)
        return ["status", str(work / "run"), "--timeout", "0.5"], f
    if case.command == "config-yaml":
        f = _place(d, work / "config.yaml")
        return ["pretrain", "--config", str(f)], f
    raise AssertionError(case.command)


CASES = [
    Case("grade", False, True), Case("grade", True, True),
    Case("eval", False, True), Case("eval", True, True),
    Case("sft", False, True), Case("sft", True, True),
    Case("corpus-decontam", False, True), Case("corpus-run", False, True),
    Case("corpus-build-index", False, True, fixed_name=True),
    Case("status-metrics", False, False, fixed_name=True), Case("status-json", False, True, fixed_name=True),
    Case("status-address", False, True, fixed_name=True), Case("config-yaml", False, True, fixed_name=True),
]


@dataclass
class Outcome:
    case: Case
    damaged: Damaged
    path: Path
    work: Path
    rc: int
    stdout: str
    stderr: str


def _run_one(case: Case, d: Damaged, root: Path) -> Outcome:
    work = root / f"{case.command}{'-skip' if case.skip_bad else ''}" / d.name.replace(".", "_")
    work.mkdir(parents=True)
    argv, path = _argv(case, d, work)
    p = subprocess.run([str(DSMATH), *argv], capture_output=True, text=True, errors="replace", timeout=60,
                       cwd=work, env=ENV, stdin=subprocess.DEVNULL)
    return Outcome(case, d, path, work, p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[Outcome]:
    root = tmp_path_factory.mktemp("fuzz")
    jobs = [(c, d) for c in CASES for d in damaged_inputs()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: _run_one(*job, root), jobs))


def _stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_every_damaged_input_ends_in_exit_0_or_one_line_exit_2(outcomes):
    assert len(outcomes) == len(CASES) * len(damaged_inputs())
    problems = []
    for o in outcomes:
        what = f"dsmath {o.case.command}{' --skip-bad' if o.case.skip_bad else ''} on {o.damaged.name}"
        if "Traceback" in o.stderr or "Traceback" in o.stdout or o.rc not in (0, 2):
            problems.append(f"{what}: exit {o.rc}: {o.stderr[-600:]}")
        elif o.rc == 2 and len(_stderr_lines(o.stderr)) != 1:
            problems.append(f"{what}: exit 2 with {len(_stderr_lines(o.stderr))} stderr lines: {o.stderr[-600:]}")
        elif o.rc == 2 and ": error: " not in o.stderr:
            problems.append(f"{what}: exit 2 without a 'dsmath CMD: error:' line: {o.stderr!r}")
    assert not problems, "\n".join(problems)


def test_without_skip_bad_a_damaged_file_is_refused_naming_it(outcomes):
    """No silent success on damage: each certainly damaged input, read without --skip-bad, is exit 2 with a line
    naming the file — except the readers that by design count damaged records and go on (corpus: read errors
    in the report; status: a torn last line of metrics.jsonl), which must then say so."""
    problems = []
    for o in outcomes:
        if o.case.skip_bad or not o.damaged.certainly_bad or (o.case.fixed_name and o.damaged.damage_in_name):
            continue
        what = f"dsmath {o.case.command} on {o.damaged.name}"
        counted = "SKIPPED" in o.stdout  # corpus: damaged records are read errors, counted, and the run goes on
        if o.rc == 2:
            if o.case.names_file and o.path.name not in o.stderr and not (o.case.command == "corpus-run" and counted):
                problems.append(f"{what}: the error does not name {o.path.name}: {o.stderr!r}")
        elif o.case.command in ("corpus-decontam",):
            if "SKIPPED" not in o.stdout or "read error: " not in o.stdout:
                problems.append(f"{what}: exit 0 without counting the read errors: {o.stdout[-400:]!r}")
        elif o.case.command != "status-metrics":
            problems.append(f"{what}: exit {o.rc} on a damaged file: {o.stdout[-300:]!r} {o.stderr[-300:]!r}")
    assert not problems, "\n".join(problems)


def test_skip_bad_counts_what_it_skipped(outcomes):
    """With --skip-bad a damaged file either still fails in one line (nothing usable, or the missing model
    after the data was read) or the skipped lines are counted in the output."""
    problems = []
    for o in outcomes:
        if not o.case.skip_bad or not o.damaged.certainly_bad:
            continue
        said = o.stdout + o.stderr
        dirlike = o.damaged.content is None or o.damaged.name in ("utf16.jsonl", "plain_named_gz.jsonl.gz",
                                                                  "bz2_named_gz.jsonl.gz")
        if dirlike:  # nothing to skip line by line: the file cannot be opened
            if o.rc != 2 or o.path.name not in o.stderr:
                problems.append(f"{o.case.command} --skip-bad on {o.damaged.name}: {o.rc} {o.stderr!r}")
        elif "SKIPPED" not in said and "no usable" not in said and "no problems" not in said:
            problems.append(f"{o.case.command} --skip-bad on {o.damaged.name}: skips not said: {said[-400:]!r}")
    assert not problems, "\n".join(problems)


def test_grade_skip_bad_keeps_every_good_line_before_a_truncated_gzip(outcomes):
    """The exact count: a gzip cut at 60% keeps the complete lines before the cut, and the rest is one skip."""
    [o] = [o for o in outcomes if o.case == Case("grade", True, True) and o.damaged.name == "trunc60.jsonl.gz"]
    assert o.rc == 0, o.stderr
    text = gzip.GzipFile(fileobj=io.BytesIO(o.damaged.content))
    got = b""
    try:
        while chunk := text.read1(1):
            got += chunk
    except EOFError:
        pass
    complete = got.count(b"\n")
    assert 0 < complete < N_RECORDS
    assert f"{complete}/{complete} correct" in o.stdout
    assert "SKIPPED 1 bad lines" in o.stdout and "truncated" in o.stdout


def test_corpus_run_refusing_its_input_leaves_no_folder(outcomes):
    for o in outcomes:
        if o.case.command == "corpus-run" and o.rc == 2:
            out = o.work / "corpus_out"
            assert not out.exists() or sorted(p.name for p in out.iterdir()) != ["config.yaml"], o.damaged.name
            if "no input pages" in o.stderr or o.path.name in o.stderr:
                assert not out.exists(), f"{o.damaged.name}: {sorted(out.iterdir())}"


def test_no_half_written_output_is_left(outcomes):
    """Outputs go to a temporary name and are renamed when complete: no '.tmp' file survives any run."""
    leftovers = [str(p) for o in outcomes for p in o.work.rglob("*.tmp*")]
    assert not leftovers, leftovers
    for o in outcomes:  # every decontam that exited 0 wrote both of its outputs
        if o.case.command == "corpus-decontam" and o.rc == 0:
            assert (o.work / "clean.jsonl").is_file() and (o.work / "clean.dropped.jsonl").is_file()


# ---------------------------------------------------------------------- dsmath status --address: service errors
import socket  # noqa: E402
import threading  # noqa: E402


class _TcpServer:
    """A real TCP listener on 127.0.0.1 that is not a status server: it sends ``reply`` (junk) to whoever
    connects, or nothing at all (a peer that never answers), and keeps the connection open."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                conn.sendall(self.reply)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["dead port", "junk server", "silent server", "bad address", "bad port"])
def test_status_address_failures_are_one_line_saying_what_to_do(kind):
    server = None
    if kind == "dead port":
        address, expect = f"127.0.0.1:{_free_port()}", "no status server answers"
    elif kind == "junk server":
        server = _TcpServer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + bytes(range(256)))
        address, expect = f"127.0.0.1:{server.port}", "or HOST:PORT is another service"
    elif kind == "silent server":
        server = _TcpServer(None)
        address, expect = f"127.0.0.1:{server.port}", "did not answer in time (raise --timeout"
    elif kind == "bad address":
        address, expect = "localhost", "must be HOST:PORT"
    else:
        address, expect = "127.0.0.1:99999", "must be HOST:PORT"
    try:
        p = subprocess.run([str(DSMATH), "status", "--address", address, "--timeout", "1.5"], capture_output=True,
                           text=True, timeout=60, env=ENV)
    finally:
        if server is not None:
            server.close()
    lines = _stderr_lines(p.stderr)
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("dsmath status: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in p.stderr

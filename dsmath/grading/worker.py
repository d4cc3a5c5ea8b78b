"""The symbolic grading worker process: ``python -m dsmath.grading.worker MEMORY_MB``.

Protocol on stdin/stdout: frames of a 4-byte big-endian length and a UTF-8 JSON body. The worker first
sends ``{"ready": true}`` (after importing sympy, so the parent's deadlines never include start-up), then
answers each ``[pred, gold]`` with ``[correct, reason]``. EOF on stdin (the parent closed or died) ends it.
A plain subprocess rather than multiprocessing: nothing of the caller (its ``__main__``, threads, CUDA or
Ray state) is inherited or re-imported.
"""

from __future__ import annotations

import json
import os
import struct
import sys


def write_frame(fh, obj) -> None:
    body = json.dumps(obj).encode("utf-8")
    fh.write(struct.pack(">I", len(body)) + body)
    fh.flush()


def _read_exact(fh, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = fh.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main(argv: list[str]) -> int:
    memory_mb = int(argv[1]) if len(argv) > 1 else 0
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    sys.setrecursionlimit(5000)
    from dsmath.grading.symbolic import symbolic_equal

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    write_frame(out, {"ready": True, "pid": os.getpid()})
    while True:
        head = _read_exact(inp, 4)
        if head is None:
            return 0
        body = _read_exact(inp, struct.unpack(">I", head)[0])
        if body is None:
            return 0
        pred, gold = json.loads(body)
        try:
            result = list(symbolic_equal(pred, gold))
        except MemoryError:
            result = [False, "sympy ran out of memory"]
        except RecursionError:
            result = [False, "expression nested too deeply"]
        except Exception as exc:  # noqa: BLE001 - any sympy failure is 'not equal', with the reason
            result = [False, f"sympy error: {type(exc).__name__}"]
        try:
            write_frame(out, result)
        except (BrokenPipeError, OSError):
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

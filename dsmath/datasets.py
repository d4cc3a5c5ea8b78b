"""JSONL reading that never drops data silently.

A malformed line is a :class:`DataError` naming the file and line. With ``skip_bad=True`` bad lines
are skipped, but counted in the returned :class:`ReadReport` and reported by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dsmath.records import Problem
from dsmath.userfiles import BadLine, FileError, StreamError, atomic_path, iter_lines, until_broken


class DataError(FileError):
    """A record that cannot be read: names the file and the 1-based line."""


@dataclass
class ReadReport:
    path: str
    lines_read: int = 0
    records: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: {self.records} records from {self.lines_read} lines"
        if self.skipped:
            first = ", ".join(f"line {n} ({why})" for n, why in self.skipped[:3])
            s += f"; SKIPPED {len(self.skipped)} bad lines: {first}{' …' if len(self.skipped) > 3 else ''}"
        return s


def iter_jsonl(
    path: str | Path,
    *,
    required: tuple[str, ...] = (),
    skip_bad: bool = False,
    report: ReadReport | None = None,
) -> Iterator[dict]:
    """Yield each JSON object of a JSONL file (gzip/bz2/xz by magic bytes); blank lines are ignored.

    ``required`` keys must be present (one of the alternatives ``"a|b"`` is enough). Reading goes through
    :mod:`dsmath.userfiles`: a missing file, a directory, damaged compression or a file that is not UTF-8 is a
    one-line :class:`dsmath.userfiles.FileError` (a ``UserError``). With ``skip_bad`` a bad line (not JSON, not
    UTF-8, too long, a missing key) is skipped and counted in ``report``; a compressed stream that breaks
    mid-file keeps the lines read before the break and counts the rest of the file as one skipped entry.
    """
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))

    def on_break(exc: StreamError) -> None:
        if not skip_bad:
            raise exc
        report.skipped.append((exc.lines_read + 1, f"rest of the file unreadable: {exc}"))

    for lineno, line in until_broken(iter_lines(path, "JSONL file"), on_break):
        report.lines_read += 1
        if isinstance(line, str) and not line.strip():
            continue
        obj, why = (None, line.why) if isinstance(line, BadLine) else _parse_record(line, required)
        if why is not None:
            if not skip_bad:
                raise DataError(f"{path}:{lineno}: {why}")
            report.skipped.append((lineno, why))
            continue
        report.records += 1
        yield obj


def _parse_record(line: str, required: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a usable JSONL line, ``(None, why)`` for one that is not."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    for key in required:
        options = key.split("|")
        if not any(k in obj for k in options):
            return None, f"missing key {' or '.join(repr(k) for k in options)}"
    return obj, None


def _first(obj: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


QUESTION_KEYS = ("question", "problem", "prompt", "input")
ANSWER_KEYS = ("answer", "gold", "golden", "final_answer", "solution")


def gold_from_record(obj: dict) -> str:
    """The gold final answer of a GSM8K/MATH/CMATH-style record, as a string."""
    ans = _first(obj, ("final_answer", "answer", "golden", "gold"))
    if ans is None and "solution" in obj:
        from dsmath.grading import extract_answer  # MATH: the answer is the solution's last \boxed{}

        ans = extract_answer(obj["solution"]) or ""
    ans = "" if ans is None else str(ans)
    if "####" in ans:  # GSM8K: the rationale, then '#### 42'
        ans = ans.rsplit("####", 1)[1]
    return ans.strip()


def load_problems(path: str | Path, *, limit: int | None = None, skip_bad: bool = False) -> tuple[list[Problem], ReadReport]:
    """Read question/answer JSONL (GSM8K, MATH or our own format) into :class:`Problem` records."""
    report = ReadReport(str(path))
    problems: list[Problem] = []
    required = ("|".join(QUESTION_KEYS), "|".join(ANSWER_KEYS))
    for i, obj in enumerate(iter_jsonl(path, required=required, skip_bad=skip_bad, report=report)):
        if limit is not None and len(problems) >= limit:
            break
        meta = {k: obj[k] for k in ("level", "type", "subject") if k in obj}
        uid = str(obj.get("uid", obj.get("id", f"{Path(path).stem}-{i}")))
        problems.append(Problem(uid=uid, question=str(_first(obj, QUESTION_KEYS)), answer=gold_from_record(obj), meta=meta))
    return problems, report


def write_jsonl(path: str | Path, rows) -> int:
    """Write rows atomically (temp file + rename, see :func:`dsmath.userfiles.atomic_path`); returns the count."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n

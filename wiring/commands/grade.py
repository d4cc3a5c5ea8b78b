"""``dsmath grade``: check one answer (explained) or a JSONL file of pairs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "check answers against gold answers (one pair, explained, or a JSONL file)"
DESCRIPTION = """Check answers the way training rewards do: extract the stated final answer, normalise the
LaTeX, compare exactly/numerically, then symbolically (sympy, in a killable worker with a deadline).

  dsmath grade --pred '\\frac{\\sqrt{2}}{2}' --gold '\\dfrac{1}{\\sqrt2}'
  dsmath grade --file pairs.jsonl --workers 2 --out verdicts.jsonl

A file holds one JSON object per line: {"pred": ANSWER | "completion": MODEL_OUTPUT, "gold": ANSWER}.
A "pred" without a stated answer (\\boxed{}, "the answer is", ####) is graded as the answer itself.

Mode (default lenient, what evaluating a model needs): a completion's answer is what a human grader would read —
a box, a stated answer ("Final Answer: The largest $n$ is 34." -> 34), else the last LaTeX math span, else the
last number of a text without math (never a digit of a LaTeX expression). --mode strict is the training reward's
rule: the completion must state its answer (box, "the answer is", "Final Answer", ####), so a policy learns to.
Exit status 0 when every pair is correct for a single pair; for a file, 0 unless it cannot be read."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="an answer or a whole completion")
    src.add_argument("--file", help="JSONL of {pred|completion, gold} objects")
    p.add_argument("--gold", help="the gold answer (with --pred)")
    p.add_argument("--mode", choices=("strict", "lenient"), default="lenient",
                   help="lenient (default, for evaluation): a completion's answer is also its last math span, or "
                        "the last number of a text without math; strict (training rewards): it must state its answer")
    p.add_argument("--timeout-s", type=float, default=5.0, help="wall-clock limit per symbolic check (default 5)")
    p.add_argument("--workers", type=int, default=2, help="sympy worker processes for --file (default 2)")
    p.add_argument("--out", help="write one verdict per line to this JSONL file (with --file)")
    p.add_argument("--skip-bad", action="store_true",
                   help="with --file: skip malformed lines (not JSON, not UTF-8, a missing key), counted and reported")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _as_completion(pred: str) -> str:
    from dsmath.grading import extract_answer

    # a bare answer ("0.5", "1, 2") is graded as itself; a completion keeps its own stated answer
    return pred if extract_answer(pred, mode="strict") is not None else "\\boxed{" + pred + "}"


def _one(args) -> int:
    from dsmath.errors import UserError
    from dsmath.grading import GradingPool

    if args.gold is None:
        raise UserError("--pred needs --gold")
    with GradingPool(1, timeout_s=args.timeout_s, mode=args.mode) as pool:
        verdict = pool.grade(_as_completion(args.pred), args.gold)
    print(json.dumps(verdict.to_dict(), ensure_ascii=False) if args.json else verdict.explain())
    return 0 if verdict.correct else 1


def _file(args) -> int:
    from tqdm import tqdm

    from dsmath.datasets import ReadReport, iter_jsonl, write_jsonl
    from dsmath.errors import UserError
    from dsmath.grading import GradingPool

    if args.gold is not None:
        raise UserError("--gold goes with --pred; in --file mode each line carries its own gold")
    if args.out and Path(args.out).resolve() == Path(args.file).resolve():
        raise UserError(f"--out {args.out} is the input file; write the verdicts elsewhere")
    pairs = []
    report = ReadReport(args.file)
    for obj in iter_jsonl(args.file, required=("pred|completion", "gold"), skip_bad=args.skip_bad, report=report):
        if "completion" in obj:
            pairs.append((str(obj["completion"]), str(obj["gold"])))
        else:
            pairs.append((_as_completion(str(obj["pred"])), str(obj["gold"])))
    with GradingPool(max(1, args.workers), timeout_s=args.timeout_s, mode=args.mode) as pool:
        with tqdm(total=len(pairs), desc="grading", unit="pair", file=sys.stderr, disable=None) as bar:
            verdicts = pool.grade_many(pairs, progress=bar.update)
        stats = pool.stats()
    by_kind: dict[str, dict[str, int]] = {}
    for v in verdicts:
        row = by_kind.setdefault(v.kind, {"pairs": 0, "correct": 0, "timed_out": 0, "no_answer": 0})
        row["pairs"] += 1
        row["correct"] += bool(v.correct)  # a failed grading (correct None) is not a right answer: counted apart
        row["timed_out"] += v.timed_out
        row["no_answer"] += v.extracted is None
    if args.out:
        write_jsonl(args.out, (v.to_dict() for v in verdicts))
    total = len(verdicts)
    correct = sum(bool(v.correct) for v in verdicts)
    failed = sum(v.failed for v in verdicts)
    skipped = len(report.skipped)
    summary = {"file": args.file, "mode": args.mode, "pairs": total, "skipped_bad_lines": skipped,
               "correct": correct, "grader_failed": failed,
               "accuracy": round(correct / total, 4) if total else 0.0,
               "timeouts": stats["timeouts"], "worker_restarts": stats["worker_restarts"], "by_kind": by_kind}
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    print(f"{args.file}: {correct}/{total} correct ({summary['accuracy']:.2%}, {args.mode} mode); "
          f"{stats['timeouts']} timed out, {stats['fast']} decided on the fast path, {stats['symbolic']} by sympy"
          + (f"; {failed} NOT graded (the grader failed: rerun them)" if failed else ""))
    if skipped:
        print(f"  {report.summary()}")
    print(f"  {'kind':<12} {'pairs':>6} {'correct':>8} {'timeouts':>9} {'no answer':>10}")
    for kind, row in sorted(by_kind.items(), key=lambda kv: -kv[1]["pairs"]):
        print(f"  {kind:<12} {row['pairs']:>6} {row['correct']:>8} {row['timed_out']:>9} {row['no_answer']:>10}")
    if args.out:
        print(f"verdicts written to {args.out}")
    return 0


def run(args) -> int:
    return _file(args) if args.file else _one(args)

"""dsmath.grading vs math-verify on a labelled set built from real benchmark solutions.

Labels: each MATH test solution (its last ``\\boxed{}``) and each GSM8K test answer (``#### N``) graded
against its own final answer must be CORRECT; against another problem's different answer, WRONG.
Both graders see the same pairs in the same run; math-verify runs in the main thread (it uses
signal.alarm). Prints a card, then one line of JSON. Not a test.

    python bench/grading_vs_math_verify.py --pairs 3000 --workers 1 --show 10
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

DATA = Path("/work/shared/data/decontam_benchmarks")


def _key(ans: str) -> str:
    return "".join(ans.split())


def build_pairs(n: int, seed: int) -> list[dict]:
    from dsmath.grading.extract import last_boxed

    rng = random.Random(seed)
    sets = []
    math_rows = [json.loads(l) for l in (DATA / "math_test.jsonl").open()]
    math_items = [(r["solution"], last_boxed(r["solution"])) for r in math_rows]
    sets.append(("math", [(c, a) for c, a in math_items if a]))
    gsm_rows = [json.loads(l) for l in (DATA / "gsm8k_test.jsonl").open()]
    sets.append(("gsm8k", [(r["answer"], r["answer"].rsplit("####", 1)[1].strip()) for r in gsm_rows]))
    pairs = []
    per_set = n // len(sets)
    for name, items in sets:
        picks = rng.sample(range(len(items)), min(len(items), per_set // 2 + 1))
        for k, i in enumerate(picks):
            completion, answer = items[i]
            pairs.append({"set": name, "completion": completion, "gold": answer, "label": True})
            while True:  # another problem's different answer
                other = items[rng.randrange(len(items))][1]
                if _key(other) != _key(answer):
                    break
            pairs.append({"set": name, "completion": completion, "gold": other, "label": False, "own": answer})
    return pairs[:n] if len(pairs) > n else pairs


def rewrite(answer: str, rng: random.Random) -> str:
    """An equivalent way to write ``answer`` (a model's style differs from the reference's)."""
    import re
    from fractions import Fraction

    a = answer.strip()
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", a)
    if m and rng.random() < 0.7:
        value = Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
        den = value.denominator
        while den % 2 == 0:
            den //= 2
        while den % 5 == 0:
            den //= 5
        if den == 1 and value.denominator != 1:
            return str(float(value))
        return f"{value.numerator}/{value.denominator}"
    if re.fullmatch(r"-?\d+", a):
        n = int(a)
        choice = rng.randrange(4)
        if choice == 0 and abs(n) >= 1000:
            return f"{n:,}"
        if choice == 1:
            return f"{n}.0"
        if choice == 2:
            return f"x = {n}"
        return f"{n} \\text{{ units}}"
    out = a.replace("\\frac", "\\dfrac")
    out = re.sub(r"(?<!\\left)\(", r"\\left(", out)
    out = re.sub(r"(?<!\\right)\)", r"\\right)", out)
    out = out.replace("+", " + ").replace(",", ", ")
    return out


def build_variant_pairs(n: int, seed: int) -> list[dict]:
    """Completions that state an equivalent rewrite of their gold (positives) or of another answer."""
    rng = random.Random(seed + 1)
    out = []
    for p in build_pairs(n, seed):
        stated = rewrite(p["gold"] if p["label"] else p["gold"], rng)
        # positives: our own answer rewritten; negatives: the other answer rewritten, graded against our own
        if p["label"]:
            completion, gold = f"Working omitted. Therefore the final answer is $\\boxed{{{stated}}}$.", p["gold"]
        else:
            own = p["own"]
            completion, gold = f"Working omitted. Therefore the final answer is $\\boxed{{{stated}}}$.", own
        out.append({"set": p["set"], "completion": completion, "gold": gold, "label": p["label"]})
    return out


def run_dsmath(pairs: list[dict], workers: int, timeout_s: float) -> tuple[list[bool], float, dict]:
    from dsmath.grading import GradingPool

    with GradingPool(workers, timeout_s=timeout_s) as pool:
        pool.symbolic_equal("1", "1")  # start the worker before the clock (math-verify's import is also excluded)
        t0 = time.perf_counter()
        verdicts = pool.grade_many([(p["completion"], p["gold"]) for p in pairs])
        seconds = time.perf_counter() - t0
        stats = pool.stats()
    return [v.correct for v in verdicts], seconds, stats


def run_math_verify(pairs: list[dict]) -> tuple[list[bool], float]:
    from math_verify import parse, verify

    parse("$1$"), verify(parse("$1$"), parse("$1$"))  # warm imports and caches outside the clock
    out = []
    t0 = time.perf_counter()
    for p in pairs:
        try:
            gold = parse(f"${p['gold']}$")
            pred = parse(p["completion"])
            out.append(bool(verify(gold, pred)))
        except Exception:  # noqa: BLE001 - math-verify errors count as 'wrong'
            out.append(False)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3000, help="labelled pairs (half MATH, half GSM8K; half positive)")
    ap.add_argument("--workers", type=int, default=1, help="dsmath sympy worker processes")
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=5, help="print this many dsmath mistakes")
    ap.add_argument("--variants", action="store_true",
                    help="completions state an equivalent rewrite of the answer (\\dfrac, \\left(, x =, 0.5 for 1/2, "
                         "1,000, units) instead of the reference's own text")
    args = ap.parse_args(argv)

    pairs = build_variant_pairs(args.pairs, args.seed) if args.variants else build_pairs(args.pairs, args.seed)
    ours, our_s, stats = run_dsmath(pairs, args.workers, args.timeout_s)
    theirs, their_s = run_math_verify(pairs)

    def agreement(pred, subset=None):
        idx = [i for i, p in enumerate(pairs) if subset is None or subset(p)]
        return sum(pred[i] == pairs[i]["label"] for i in idx) / max(1, len(idx)), len(idx)

    rows = [("all", None), ("MATH", lambda p: p["set"] == "math"), ("GSM8K", lambda p: p["set"] == "gsm8k"),
            ("positives", lambda p: p["label"]), ("negatives", lambda p: not p["label"])]
    print(f"grading vs math-verify — {len(pairs)} labelled pairs (seed {args.seed}{', rewritten answers' if args.variants else ''}), "
          f"dsmath workers={args.workers}")
    print(f"{'subset':<10} {'n':>6} {'dsmath':>9} {'math-verify':>12}")
    for name, sub in rows:
        a, n = agreement(ours, sub)
        b, _ = agreement(theirs, sub)
        print(f"{name:<10} {n:>6} {a:>9.2%} {b:>12.2%}")
    ours_pps, theirs_pps = len(pairs) / our_s, len(pairs) / their_s
    print(f"throughput  dsmath {ours_pps:,.0f} pairs/s ({our_s:.2f} s)   math-verify {theirs_pps:,.0f} pairs/s "
          f"({their_s:.2f} s)   speed-up {ours_pps / theirs_pps:.1f}x")
    print(f"dsmath pool: {stats}")
    shown = 0
    for i, p in enumerate(pairs):
        if ours[i] != p["label"] and shown < args.show:
            shown += 1
            from dsmath.grading import extract_answer

            print(f"  MISS label={p['label']} gold={p['gold']!r} extracted={extract_answer(p['completion'])!r} "
                  f"math-verify={theirs[i]}")
    a_all, _ = agreement(ours)
    b_all, _ = agreement(theirs)
    print(json.dumps({"pairs": len(pairs), "variants": args.variants, "dsmath_agreement": round(a_all, 4), "math_verify_agreement": round(b_all, 4),
                      "dsmath_pairs_per_s": round(ours_pps, 1), "math_verify_pairs_per_s": round(theirs_pps, 1),
                      "speedup": round(ours_pps / theirs_pps, 2), "timeouts": stats["timeouts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

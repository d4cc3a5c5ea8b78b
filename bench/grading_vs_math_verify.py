"""dsmath.grading vs math-verify, both graders on the same pairs in one run: agreement with the labels by set
and by answer kind, and throughput.

Sets: (1) MATH/GSM8K pairs built from real benchmark solutions — each MATH test solution (its last ``\\boxed{}``)
and each GSM8K test answer (``#### N``) graded against its own final answer must be CORRECT; against another
problem's different answer, WRONG (``--variants``: the completion states an equivalent rewrite instead);
(2) generated answer forms (``tests/grading_forms.py``: paraphrased final-answer sentences, every LaTeX
delimiter, chat tokens, relations, sets, tuples, labelled answers, matrices, percents, units), each against its
gold and a wrong gold. dsmath grades in ``--mode`` (default lenient, as ``dsmath eval`` does); math-verify runs
in the main thread (it uses signal.alarm). Prints a card, then one line of JSON. Not a test.

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
ROOT = Path(__file__).resolve().parents[1]


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


def build_generated(seed: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from grading_forms import TEMPLATES, generated_cases

    return [{"set": "generated", "kind": c["family"], "completion": c["completion"], "gold": c["gold"],
             "label": c["label"]} for c in generated_cases(seed, per_answer=len(TEMPLATES))]


def run_dsmath(pairs: list[dict], workers: int, timeout_s: float, mode: str):
    from dsmath.grading import GradingPool

    with GradingPool(workers, timeout_s=timeout_s, mode=mode) as pool:
        pool.symbolic_equal("1", "1")  # start the worker before the clock (math-verify's import is also excluded)
        t0 = time.perf_counter()
        verdicts = pool.grade_many([(p["completion"], p["gold"]) for p in pairs])
        seconds = time.perf_counter() - t0
        stats = pool.stats()
    return verdicts, seconds, stats


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


def _table(pairs, ours, theirs, key) -> list[tuple[str, int, float, float]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(key(p), []).append(i)
    rows = []
    for name, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        a = sum(ours[i] == pairs[i]["label"] for i in idx) / len(idx)
        b = sum(theirs[i] == pairs[i]["label"] for i in idx) / len(idx)
        rows.append((name, len(idx), a, b))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3000, help="MATH/GSM8K labelled pairs (half each; half positive)")
    ap.add_argument("--workers", type=int, default=1, help="dsmath sympy worker processes")
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("strict", "lenient"), default="lenient", help="dsmath extraction mode")
    ap.add_argument("--show", type=int, default=5, help="print this many dsmath mistakes")
    ap.add_argument("--variants", action="store_true",
                    help="MATH/GSM8K completions state an equivalent rewrite of the answer (\\dfrac, \\left(, x =, 0.5 "
                         "for 1/2, 1,000, units) instead of the reference's own text")
    args = ap.parse_args(argv)

    bench_pairs = build_variant_pairs(args.pairs, args.seed) if args.variants else build_pairs(args.pairs, args.seed)
    pairs = bench_pairs + build_generated(args.seed)
    verdicts, our_s, stats = run_dsmath(pairs, args.workers, args.timeout_s, args.mode)
    ours = [v.correct for v in verdicts]
    for p, v in zip(pairs, verdicts):
        p.setdefault("kind", v.kind)  # MATH/GSM8K: the gold's answer kind as dsmath reads it
    theirs, their_s = run_math_verify(pairs)

    print(f"grading vs math-verify — {len(bench_pairs)} MATH/GSM8K pairs (seed {args.seed}"
          f"{', rewritten answers' if args.variants else ''}) + {len(pairs) - len(bench_pairs)} generated forms; "
          f"dsmath mode={args.mode}, workers={args.workers}")
    print(f"{'':<22} {'n':>6} {'dsmath':>9} {'math-verify':>12}")
    report = {}
    for title, key in (("set", lambda p: p["set"]), ("label", lambda p: "positives" if p["label"] else "negatives"),
                       ("MATH/GSM8K by kind", lambda p: p["kind"] if p["set"] != "generated" else None),
                       ("generated by kind", lambda p: p["kind"] if p["set"] == "generated" else None)):
        print(f"-- {title}")
        for name, n, a, b in _table(pairs, ours, theirs, key):
            if name is None:
                continue
            print(f"   {name:<19} {n:>6} {a:>9.2%} {b:>12.2%}")
            report[f"{title}:{name}"] = {"n": n, "dsmath": round(a, 4), "math_verify": round(b, 4)}
    a_all = sum(o == p["label"] for o, p in zip(ours, pairs)) / len(pairs)
    b_all = sum(t == p["label"] for t, p in zip(theirs, pairs)) / len(pairs)
    print(f"   {'all':<19} {len(pairs):>6} {a_all:>9.2%} {b_all:>12.2%}")
    wrong_yes = sum(o and not p["label"] for o, p in zip(ours, pairs))
    their_wrong_yes = sum(t and not p["label"] for t, p in zip(theirs, pairs))
    print(f"wrong 'yes' verdicts: dsmath {wrong_yes}, math-verify {their_wrong_yes}")
    ours_pps, theirs_pps = len(pairs) / our_s, len(pairs) / their_s
    print(f"throughput  dsmath {ours_pps:,.0f} pairs/s ({our_s:.2f} s)   math-verify {theirs_pps:,.0f} pairs/s "
          f"({their_s:.2f} s)   speed-up {ours_pps / theirs_pps:.1f}x")
    print(f"dsmath pool: {stats}")
    shown = 0
    for i, p in enumerate(pairs):
        if ours[i] != p["label"] and shown < args.show:
            shown += 1
            print(f"  MISS [{p['set']}/{p['kind']}] label={p['label']} gold={p['gold']!r} "
                  f"extracted={verdicts[i].extracted!r} math-verify={theirs[i]}")
    print(json.dumps({"pairs": len(pairs), "mode": args.mode, "variants": args.variants,
                      "dsmath_agreement": round(a_all, 4), "math_verify_agreement": round(b_all, 4),
                      "dsmath_wrong_yes": wrong_yes, "math_verify_wrong_yes": their_wrong_yes,
                      "dsmath_pairs_per_s": round(ours_pps, 1), "math_verify_pairs_per_s": round(theirs_pps, 1),
                      "speedup": round(ours_pps / theirs_pps, 2), "timeouts": stats["timeouts"], "by": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dsmath samples``: one training step's samples from ``RUN_DIR/samples/`` (written by :mod:`wiring.lineage`)."""

from __future__ import annotations

import argparse

HELP = "show a training step's samples (question, completion, answer, verdict, reward, advantage, lineage)"
DESCRIPTION = """\
Show the samples trained at one step of a run, as written to RUN_DIR/samples/step-NNNNNN.parquet: per
sample its question, token counts, extracted answer, verdict and reason, reward, advantage, generator and
weight version, grader time, whether it was reissued after a failure, the verifier audit's finding, and the
completion text (older steps than lineage.keep_full_steps keep everything but the text).

  dsmath samples runs/latest                       the last step's samples
  dsmath samples runs/latest --step 7 --verdict wrong --limit 5
  dsmath samples runs/latest --step 7 --min-reward 0.5 --question tiny-123
  dsmath samples runs/latest --step 7 --disagreements   only samples the verifier audit disagreed on

The files are plain Parquet: pandas.read_parquet(RUN_DIR + "/samples") reads every step at once.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (holds samples/)")
    parser.add_argument("--step", type=int, default=None, help="the step (default: the last written)")
    parser.add_argument("--verdict", choices=("right", "wrong", "failed"), default=None,
                        help="only samples with this verdict (failed: the grader timed out or could not judge)")
    parser.add_argument("--min-reward", type=float, default=None, metavar="X", help="only samples with reward >= X")
    parser.add_argument("--question", default=None, metavar="ID", help="only samples of this question id")
    parser.add_argument("--disagreements", action="store_true",
                        help="only samples on which the verifier audit's second check disagreed")
    parser.add_argument("--limit", type=int, default=20, metavar="K", help="show at most K samples (default 20; 0: all)")
    parser.add_argument("--chars", type=int, default=400, metavar="N",
                        help="completion text shown per sample, in characters (default 400; 0: all)")


def select(rows: list[dict], *, verdict: str | None = None, min_reward: float | None = None,
           question: str | None = None, disagreements: bool = False) -> list[dict]:
    """The rows passing every given filter, in file order."""
    return [r for r in rows
            if (verdict is None or r["verdict"] == verdict)
            and (min_reward is None or r["reward"] >= min_reward)
            and (question is None or r["question_id"] == question)
            and (not disagreements or r["audit_disagrees"])]


def _summary(run_dir: str, step: int, rows: list[dict], shown: int, matched: int) -> str:
    count = {v: sum(r["verdict"] == v for r in rows) for v in ("right", "wrong", "failed")}
    audited = sum(r["audited"] for r in rows)
    disagree = sum(r["audit_disagrees"] for r in rows)
    mean = sum(r["reward"] for r in rows) / len(rows) if rows else 0.0
    return (f"{run_dir} step {step}: {len(rows)} samples, {len({r['question_id'] for r in rows})} questions, "
            f"reward mean {mean:.3f} | right {count['right']} wrong {count['wrong']} failed {count['failed']} | "
            f"no answer {sum(r['no_answer'] for r in rows)} | audited {audited}, disagreed {disagree} | "
            f"reissued {sum(r['reissued'] for r in rows)}\nshowing {shown} of {matched} matching")


def _one(r: dict, chars: int, text_kept: bool) -> str:
    flags = [f for f, on in (("REISSUED", r["reissued"]), ("TIMED OUT", r["timed_out"]),
                             ("AUDIT DISAGREES", r["audit_disagrees"])) if on]
    head = (f"[{r['request_id']}#{r['sample_index']}]  {r['verdict'].upper()}  "
            f"reward {r['reward']:+.3f}  advantage {r['advantage']:+.3f}  {r['generator_id']} "
            f"v{r['weight_version']}  tokens {r['prompt_tokens']}+{r['completion_tokens']} ({r['finish_reason']})  "
            f"grader {r['grader_seconds'] * 1e3:.1f} ms" + (f"  {' '.join(flags)}" if flags else ""))
    lines = [head, f"  question {r['question_id']}: {r['question']}", f"  gold {r['gold']!r}  extracted {r['extracted']!r}  reason: {r['reason']}"]
    if r["audited"]:
        lines.append(f"  audit: {r['audit_reason']}")
    if not text_kept:
        lines.append("  (completion text dropped: this step is older than lineage.keep_full_steps)")
    else:
        text = r["completion"] if chars <= 0 or len(r["completion"]) <= chars else r["completion"][:chars] + " …"
        lines.extend("  | " + line for line in text.splitlines() or [""])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsmath.errors import UserError
    from wiring.lineage import SAMPLES_DIR, available_steps, read_step

    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir}: no such run directory")
    steps = available_steps(args.run_dir)
    if not steps:
        raise UserError(f"{args.run_dir}: no {SAMPLES_DIR}/ files (a run from before sample lineage, "
                        "or one with lineage.enabled=false)")
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise UserError(f"{args.run_dir}: no samples of step {step} (steps written: {steps[0]}..{steps[-1]})")
    if args.limit < 0:
        raise UserError("--limit must be >= 0")
    rows, text_kept = read_step(args.run_dir, step)
    matched = select(rows, verdict=args.verdict, min_reward=args.min_reward, question=args.question,
                     disagreements=args.disagreements)
    shown = matched if args.limit == 0 else matched[:args.limit]
    print(_summary(args.run_dir, step, rows, len(shown), len(matched)))
    for r in shown:
        print()
        print(_one(r, args.chars, text_kept))
    return 0

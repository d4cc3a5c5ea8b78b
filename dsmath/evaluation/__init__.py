"""Evaluation: greedy pass@1, maj@k and pass@k with per-level / per-subject breakdowns (DeepSeekMath §5).

* ``aggregate`` — pure counting over graded completions (``summarize``, ``majority_vote``, ``pass_at_k``);
* ``fewshot`` — few-shot prompts for base models (``load_shots``, ``fewshot_prefix``);
* ``harness`` — the loop (``run_eval``) with generation injected, grading by ``dsmath.grading`` / the sandbox.

Nothing here imports Ray, vLLM or DeepSpeed; ``dsmath eval`` (``wiring.commands.eval``) wires in a vLLM engine.
"""

from dsmath.evaluation.aggregate import (SampleVerdict, Vote, group_by_problem, majority_vote, pass_at_k,
                                         summarize)
from dsmath.evaluation.fewshot import Shot, fewshot_prefix, load_shots
from dsmath.evaluation.harness import EvalOutput, EvalSettings, format_table, run_eval, score_completions

__all__ = ["EvalOutput", "EvalSettings", "SampleVerdict", "Shot", "Vote", "fewshot_prefix", "format_table", "group_by_problem",
           "load_shots", "majority_vote", "pass_at_k", "run_eval", "score_completions", "summarize"]
